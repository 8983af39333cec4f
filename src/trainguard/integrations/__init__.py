"""Integrations with the tools users already run: axolotl, LLaMA-Factory, W&B, MLflow, TensorBoard.

Each module imports its tool lazily and only when used, so ``import trainguard`` never pulls them in.
"""
