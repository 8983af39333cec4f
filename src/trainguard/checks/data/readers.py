"""Readers for :func:`trainguard.checks.data.validate_data`: every supported source, read once, as a stream of rows.

Each reader turns one source (a file or a folder of files, a ``datasets`` object, a DataFrame, a list of dicts)
into :class:`~trainguard.checks.data.parts.Part` objects (one per file, split or in-memory collection). Anything
that cannot be parsed (unreadable file, invalid UTF-8, invalid JSON, a CSV row of the wrong width, an empty line)
is handed to the ``problem`` callback with its line number and a short excerpt, and reading goes on with the next
line: one bad line never hides the others. The file formats themselves are parsed in ``json_files`` (JSON Lines,
JSON) and ``table_files`` (CSV, Parquet).

No reader raises for bad *content*. They raise only for a source that cannot be used at all: a path that does not
exist (``FileNotFoundError``) or an object of a type no reader knows (``TypeError``).

Memory: JSON Lines, CSV and Parquet are streamed (a line, a CSV record or a Parquet batch at a time). A JSON file
holding one array is loaded whole, because the standard library has no streaming JSON parser; a ``.json`` file
that holds JSON Lines is recognised and streamed like one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sized
from pathlib import Path
from typing import Any

from ...safe_fs import iter_files
from .json_files import json_file_rows, jsonl_file_rows
from .parts import (
    CHUNK_ROWS,
    SUPPORTED_SUFFIXES,
    Chunk,
    Part,
    ProblemSink,
    Progress,
    group_chunks,
    open_file,
    read_error,
)
from .table_files import csv_rows, parquet_rows

__all__ = ["eval_split", "iter_parts"]


def iter_parts(
    source: Any, problem: ProblemSink, progress: Progress | None = None, label: str | None = None
) -> Iterator[Part]:
    """The parts of ``source``: a path (file or folder), a ``datasets`` object, a DataFrame, or rows.

    ``label`` names an in-memory source in reports (default: ``dataset``, ``dataframe`` or ``list``).

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        TypeError: ``source`` is of a type no reader knows.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        if path.is_dir():
            yield from _folder_parts(path, problem, progress)
        else:
            yield _file_part(path, str(path), problem, progress)
        return
    if isinstance(source, (bytes, bytearray)):
        raise TypeError("validate_data() takes a path, a datasets.Dataset, a DataFrame or a list of dicts, not bytes")
    # DatasetDict is a dict subclass: test it before the generic Mapping refusal below.
    if _is_dataset_dict(source):
        for split in _train_splits(source):
            yield _dataset_part(source[split], split, progress)
        return
    if hasattr(source, "column_names") and hasattr(source, "iter"):
        yield _dataset_part(source, label or "dataset", progress)
        return
    if hasattr(source, "to_dict") and hasattr(source, "columns") and hasattr(source, "iloc"):  # pandas.DataFrame
        records = source.to_dict(orient="records")
        yield Part(label or "dataframe", "row", _enumerate_rows(records, progress), len(records))
        return
    if isinstance(source, Mapping):
        raise TypeError(
            "validate_data() takes a list of records, not one mapping; wrap a single record in a list "
            "(or pass a datasets.DatasetDict)"
        )
    if isinstance(source, Iterable):
        size = len(source) if isinstance(source, Sized) else None
        yield Part(label or "list", "row", _enumerate_rows(source, progress), size)
        return
    raise TypeError(f"validate_data() cannot read a {type(source).__name__}")


def _is_dataset_dict(source: Any) -> bool:
    return type(source).__name__ in {"DatasetDict", "IterableDatasetDict"}


_EVAL_SPLITS = ("validation", "valid", "eval", "test", "dev")


def _train_splits(source: Any) -> list[str]:
    """The splits validated as training data: ``train`` when present, else every split."""
    return ["train"] if "train" in source else list(source)


def eval_split(source: Any) -> str | None:
    """The split of a DatasetDict used as eval data for the overlap check when no eval source is given."""
    if not _is_dataset_dict(source) or "train" not in source:
        return None
    return next((name for name in _EVAL_SPLITS if name in source), None)


def _enumerate_rows(rows: Iterable[Any], progress: Progress | None) -> Iterator[Chunk]:
    values: list[Any] = []
    start = 0
    for value in rows:
        values.append(value)
        if len(values) >= CHUNK_ROWS:
            yield list(range(start, start + len(values))), values
            if progress is not None:
                progress(len(values))
            start += len(values)
            values = []
    if values:
        yield list(range(start, start + len(values))), values


def _dataset_part(dataset: Any, label: str, progress: Progress | None) -> Part:
    try:
        size: int | None = len(dataset)
    except TypeError:  # streaming IterableDataset
        size = None
    return Part(label, "row", _dataset_rows(dataset, progress), size)


def _dataset_rows(dataset: Any, progress: Progress | None) -> Iterator[Chunk]:
    # A torch/numpy format would hand back tensors; the checks want plain Python values.
    if hasattr(dataset, "with_format"):
        dataset = dataset.with_format(None)
    i = 0
    for batch in dataset.iter(batch_size=1000):
        keys = list(batch)
        columns = [batch[k] for k in keys]
        n = len(columns[0]) if columns else 0
        yield list(range(i, i + n)), [dict(zip(keys, values, strict=True)) for values in zip(*columns, strict=True)]
        i += n
        if progress is not None:
            progress(n)


def _folder_parts(folder: Path, problem: ProblemSink, progress: Progress | None) -> Iterator[Part]:
    files: list[Path] = []
    skipped: list[str] = []
    for path in sorted(iter_files(folder)):
        rel = path.relative_to(folder)
        if any(piece.startswith(".") for piece in rel.parts) or not path.is_file():
            continue  # hidden files (.git, editor swap files) are never data
        if path.name.lower().endswith(SUPPORTED_SUFFIXES):
            files.append(path)
        else:
            skipped.append(str(rel))
    if skipped:
        problem(
            "skipped_files",
            "warning",
            f"{len(skipped)} file(s) in the folder are not a supported data file and were skipped "
            f"(supported: {', '.join(SUPPORTED_SUFFIXES)}): {', '.join(skipped[:5])}"
            + (" …" if len(skipped) > 5 else ""),
            file=str(folder),
        )
    if not files:
        problem(
            "no_data_files",
            "error",
            f"the folder holds no data file (supported: {', '.join(SUPPORTED_SUFFIXES)})",
            file=str(folder),
        )
        return
    for path in files:
        yield _file_part(path, str(path), problem, progress)


def _file_part(path: Path, label: str, problem: ProblemSink, progress: Progress | None) -> Part:
    try:
        size: int | None = path.stat().st_size
    except OSError:
        size = None
    name = path.name.lower()
    chunks: Iterator[Chunk]
    if name.endswith((".jsonl", ".ndjson")):
        chunks = jsonl_file_rows(path, label, problem, progress)
    elif name.endswith(".json"):
        chunks = json_file_rows(path, label, problem, progress)
    elif name.endswith(".csv"):
        chunks = group_chunks(csv_rows(path, label, problem, progress))
    elif name.endswith(".parquet"):
        chunks = group_chunks(parquet_rows(path, label, problem, progress))
    else:
        chunks = _sniffed_rows(path, label, problem, progress)
    return Part(label, "row" if name.endswith(".parquet") else "line", chunks, size)


def _sniffed_rows(path: Path, label: str, problem: ProblemSink, progress: Progress | None) -> Iterator[Chunk]:
    """A file with an unknown ending: JSON (``[`` first) or JSON Lines (``{`` first), else refused."""
    handle = open_file(path, label, problem)
    if handle is None:
        return
    try:
        with handle:
            head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError as err:
        read_error(err, label, None, problem)
        return
    if head.startswith(b"["):
        yield from json_file_rows(path, label, problem, progress)
    elif head.startswith(b"{"):
        yield from jsonl_file_rows(path, label, problem, progress)
    else:
        problem(
            "unsupported_file",
            "error",
            f"not a supported data file (supported endings: {', '.join(SUPPORTED_SUFFIXES)}), "
            "and its content is neither a JSON array nor JSON Lines",
            file=label,
        )
