"""The checks: plain functions and small classes on plain inputs (paths, Datasets, configs, tensors)."""
