"""Data validation: the raw training data read once (:func:`validate_data`), and tokenized rows checked before step 1.

:func:`validate_data` reads JSON, JSON Lines, CSV and Parquet files (or a folder of them), ``datasets`` objects,
DataFrames and lists of dicts in one streaming pass and returns a :class:`DataReport` naming every problem with
its file, line and field. :func:`check_tokenized_dataset` checks an already tokenized dataset
(``input_ids``/``labels``) with vectorised Arrow/numpy work, and :func:`judge_tokenized` decides from its result
whether to refuse; :class:`~trainguard.callbacks.data_guard.DataGuard` runs both before the first training step.

The modules, each one concern:

- ``validate``: the :func:`validate_data` entry point and the pass that drives the checks over one source;
- ``readers`` (with ``parts``, ``json_files`` and ``table_files``): every supported source and file format, read as
  a stream of records, with what cannot be read reported by line;
- ``fields``: the record formats and the schema checks on each record's fields;
- ``tokens``: tokenizers, batched token counting, truncation and rows whose answer it cuts off;
- ``content``: diversity, duplicates, contradictory labels, train/eval overlap;
- ``rows``: what a pass keeps per row (content hashes, locations), and the normalization behind the hashes;
- ``report``: :class:`DataReport`, :class:`DataIssue`, their rendering, and the issue collector;
- ``progress``: the progress bar for large inputs;
- ``tokenized``: :func:`check_tokenized_dataset` on already tokenized rows;
- ``verdict``: the policy on its result (what to report, whether to refuse).

Importing this package imports neither torch, transformers nor datasets; numpy, pyarrow and rich are imported
where used.

Example::

    report = trainguard.validate_data("train.jsonl", tokenizer=tok, max_length=2048)
    report.print(); report.raise_for_errors()
"""

from __future__ import annotations

from .fields import CHAT_ROLES, FORMATS
from .parts import SUPPORTED_SUFFIXES, Chunk, Part, ProblemSink
from .readers import iter_parts
from .report import DataIssue, DataReport
from .tokenized import IGNORE_INDEX, TokenizedCheck, check_tokenized_dataset
from .tokens import load_tokenizer
from .validate import sniff_format, validate_data
from .verdict import Verdict, judge_tokenized

__all__ = [
    "CHAT_ROLES",
    "FORMATS",
    "IGNORE_INDEX",
    "SUPPORTED_SUFFIXES",
    "Chunk",
    "DataIssue",
    "DataReport",
    "Part",
    "ProblemSink",
    "TokenizedCheck",
    "Verdict",
    "check_tokenized_dataset",
    "iter_parts",
    "judge_tokenized",
    "load_tokenizer",
    "sniff_format",
    "validate_data",
]
