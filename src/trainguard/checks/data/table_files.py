"""CSV and Parquet files, read into chunks of records; a CSV row that does not fit is reported with its line.

CSV is streamed a record at a time (a quoted field may span lines: a record is located by its first line); the
first line names the columns. Structured columns (chat ``messages``, token ids) travel through CSV as JSON text and
are parsed back. Parquet is read a batch at a time with pyarrow, and located by record index.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .parts import ProblemSink, Progress, bytes_excerpt, excerpt, open_file, read_error

__all__ = ["csv_rows", "parquet_rows"]

_JSON_COLUMNS = frozenset({"messages", "input_ids", "labels", "attention_mask", "completion_mask", "assistant_masks"})


def _decoded_lines(
    handle: Any, label: str, problem: ProblemSink, progress: Progress | None, counter: list[int]
) -> Iterator[str]:
    pending = 0
    try:
        for raw in handle:
            counter[0] += 1
            pending += len(raw)
            if pending >= 1 << 20 and progress is not None:
                progress(pending)
                pending = 0
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problem(
                    "invalid_utf8",
                    "error",
                    f"invalid UTF-8 at byte {err.start + 1} of the line ({err.reason})",
                    file=label,
                    line=counter[0],
                    excerpt=bytes_excerpt(raw, err.start),
                )
                text = raw.decode("utf-8", errors="replace")
            if counter[0] == 1 and text.startswith("\ufeff"):
                text = text[1:]
            yield text
    except OSError as err:
        read_error(err, label, counter[0] + 1, problem)
    if progress is not None and pending:
        progress(pending)


def csv_rows(
    path: Path, label: str, problem: ProblemSink, progress: Progress | None
) -> Iterator[tuple[int | None, int, Any]]:
    handle = open_file(path, label, problem)
    if handle is None:
        return
    counter = [0]  # physical lines read so far; a quoted field may span lines
    old_limit = csv.field_size_limit()
    # Long documents are normal training data; csv's 128 KiB default would reject them.
    csv.field_size_limit(2**31 - 1)
    try:
        with handle:
            reader = csv.reader(_decoded_lines(handle, label, problem, progress, counter))
            header: list[str] | None = None
            row = 0
            while True:
                start_line = counter[0] + 1
                try:
                    cells = next(reader)
                except StopIteration:
                    break
                except csv.Error as err:
                    problem("invalid_csv", "error", f"invalid CSV: {err}", file=label, line=start_line)
                    continue
                if header is None:
                    header = [h.strip() for h in cells]
                    if not any(header):
                        problem("invalid_csv", "error", "the first line holds no column names", file=label, line=1)
                        return
                    continue
                if not cells:
                    problem("empty_line", "warning", "empty line", file=label, line=start_line)
                    continue
                if len(cells) != len(header):
                    problem(
                        "invalid_csv",
                        "error",
                        f"the row has {len(cells)} field(s), the header has {len(header)}",
                        file=label,
                        line=start_line,
                        excerpt=excerpt(",".join(cells)),
                    )
                    continue
                record: dict[str, Any] = {}
                for key, cell in zip(header, cells, strict=False):
                    record[key] = _csv_value(key, cell)
                yield start_line, row, record
                row += 1
            if header is None:
                problem("empty_file", "error", "the file is empty", file=label)
    finally:
        csv.field_size_limit(old_limit)


def _csv_value(key: str, cell: str) -> Any:
    # Structured columns (chat messages, token ids) can only travel through CSV as JSON text.
    if key in _JSON_COLUMNS and cell[:1] in "[{":
        try:
            return json.loads(cell)
        except (ValueError, RecursionError):
            return cell
    return cell


# ------------------------------------------------------------------------------------------------------- Parquet
def parquet_rows(
    path: Path, label: str, problem: ProblemSink, progress: Progress | None
) -> Iterator[tuple[int | None, int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        problem("unreadable_file", "error", "reading Parquet needs pyarrow (pip install pyarrow)", file=label)
        return
    handle = open_file(path, label, problem)  # a regular file only: pyarrow would block on a FIFO
    if handle is None:
        return
    row = 0
    try:
        parquet = pq.ParquetFile(handle)
        total = max(parquet.metadata.num_rows, 1)
        size = path.stat().st_size
        for batch in parquet.iter_batches(batch_size=1024):
            for value in batch.to_pylist():
                yield None, row, value
                row += 1
            if progress is not None:
                progress(size * batch.num_rows // total)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError and others for a damaged file
        where = f" after row {row - 1}" if row else ""
        problem(
            "unreadable_file",
            "error",
            f"cannot read the Parquet file{where}: {err}; the rest of the file was not checked",
            file=label,
            row=row if row else None,
        )
    finally:
        handle.close()
