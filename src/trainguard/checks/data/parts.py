"""What the readers hand to the validator: a source as *parts*, each a stream of *chunks*, and where problems go.

A part is one file, split or in-memory collection. It yields chunks, ``(locations, values)`` of up to about a
thousand records it could parse, where a location is the 1-based physical line in a text file, or the 0-based
record index in Parquet and in-memory data (chunks rather than single records keep the per-record cost of the hot
loop low). What cannot be parsed goes to a :class:`ProblemSink` with its line number and a short excerpt.

Also here: the helpers every file reader shares (opening a file, reporting a read error, excerpts, grouping records
into chunks) and the file endings that are read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ...errors import UnsafeFileError
from ...safe_fs import open_read

__all__ = [
    "CHUNK_ROWS",
    "EXCERPT_CHARS",
    "SUPPORTED_SUFFIXES",
    "Chunk",
    "Part",
    "ProblemSink",
    "Progress",
    "bytes_excerpt",
    "excerpt",
    "group_chunks",
    "open_file",
    "read_error",
]

#: File name endings read in a folder (anything else there is skipped and counted).
SUPPORTED_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")

EXCERPT_CHARS = 80  # characters of a bad line shown in a report: enough to recognise it, short enough for a table
CHUNK_ROWS = 1024  # records per chunk


class ProblemSink(Protocol):
    """Where readers report what they could not read (implemented by the validator's issue collector)."""

    def __call__(
        self,
        code: str,
        level: str,
        message: str,
        *,
        file: str | None,
        line: int | None = None,
        row: int | None = None,
        field: str | None = None,
        excerpt: str | None = None,
    ) -> None: ...


Progress = Callable[[int], None]  # advance by this many bytes (files) or rows (in-memory data)
Chunk = tuple[list[int], list[Any]]  # (locations, values): lines for text files, record indices otherwise


@dataclass
class Part:
    """One file, split or collection of a source.

    Attributes:
        label: How the part is named in reports (the file path as given, or ``"list"``, ``"train"``...).
        kind: ``"line"`` when locations are physical line numbers, ``"row"`` when they are record indices.
        chunks: The records, as ``(locations, values)`` chunks.
        size: The part's size for a progress bar: bytes for files, rows for collections (None when unknown).
    """

    label: str
    kind: str
    chunks: Iterator[Chunk]
    size: int | None


def excerpt(text: str, center: int | None = None) -> str:
    """A short one-line excerpt of ``text`` (around ``center`` when given)."""
    if center is not None and len(text) > EXCERPT_CHARS:
        start = max(0, min(center - EXCERPT_CHARS // 2, len(text) - EXCERPT_CHARS))
        piece = text[start : start + EXCERPT_CHARS]
        piece = ("…" if start > 0 else "") + piece + ("…" if start + EXCERPT_CHARS < len(text) else "")
    else:
        piece = text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"
    return piece.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def bytes_excerpt(raw: bytes, pos: int) -> str:
    """An excerpt of the raw bytes around ``pos`` (an undecodable byte), and where in the line it is."""
    start = max(0, pos - 24)
    return repr(raw[start : pos + 24])[2:-1] + f" (byte {pos + 1} of the line)"


def group_chunks(rows: Iterator[tuple[int | None, int, Any]]) -> Iterator[Chunk]:
    """Group ``(line, row, value)`` records into chunks; the location is the line when there is one."""
    locs: list[int] = []
    values: list[Any] = []
    for line, row, value in rows:
        locs.append(line if line is not None else row)
        values.append(value)
        if len(locs) >= CHUNK_ROWS:
            yield locs, values
            locs, values = [], []
    if locs:
        yield locs, values


def open_file(path: Path, label: str, problem: ProblemSink) -> Any:
    """The file opened for binary reading, or None after reporting why it cannot be opened."""
    try:
        # A FIFO, device or socket is refused without blocking (safe_fs), and reported like any unreadable file.
        return os.fdopen(open_read(path), "rb")
    except UnsafeFileError as err:
        problem("unreadable_file", "error", err.what, file=label)
        return None
    except OSError as err:
        problem("unreadable_file", "error", f"cannot open the file: {err.strerror or err}", file=label)
        return None


def read_error(err: OSError, label: str, line: int | None, problem: ProblemSink) -> None:
    """Report an I/O error that stopped reading a file part way."""
    problem(
        "unreadable_file",
        "error",
        f"reading stopped with an I/O error: {err.strerror or err}; the rest of the file was not checked",
        file=label,
        line=line,
    )
