"""Readers for :func:`trainguard.checks.data.validate_data`: every supported source, read once, as a stream of rows.

Each reader turns one source into *parts* (one per file, split or in-memory collection). A part yields *chunks*,
``(locations, values)`` of up to about a thousand records it could parse, where a location is the 1-based physical
line in a text file, or the 0-based record index in Parquet and in-memory data (chunks rather than single records
keep the per-record cost of the hot loop low). Anything that cannot be
parsed (unreadable file, invalid UTF-8, invalid JSON, a CSV row of the wrong width, an empty line) is handed to the
``problem`` callback with its line number and a short excerpt, and reading goes on with the next line: one bad line
never hides the others.

No reader raises for bad *content*. They raise only for a source that cannot be used at all: a path that does not
exist (``FileNotFoundError``) or an object of a type no reader knows (``TypeError``).

Memory: JSON Lines, CSV and Parquet are streamed (a line, a CSV record or a Parquet batch at a time). A JSON file
holding one array is loaded whole, because the standard library has no streaming JSON parser; a ``.json`` file
that holds JSON Lines is recognised and streamed like one.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = ["SUPPORTED_SUFFIXES", "Chunk", "Part", "ProblemSink", "iter_parts"]

#: File name endings read in a folder (anything else there is skipped and counted).
SUPPORTED_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")

_EXCERPT = 80  # characters of a bad line shown in a report: enough to recognise it, short enough for a table
_WS = re.compile(r"[ \t\n\r]*")
_JSON_COLUMNS = frozenset({"messages", "input_ids", "labels", "attention_mask", "completion_mask", "assistant_masks"})
_MAX_UTF8_REPORTS = 20  # per JSON-array file: after that the rest is decoded with replacement characters


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
_CHUNK = 1024


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
    if center is not None and len(text) > _EXCERPT:
        start = max(0, min(center - _EXCERPT // 2, len(text) - _EXCERPT))
        piece = text[start : start + _EXCERPT]
        piece = ("…" if start > 0 else "") + piece + ("…" if start + _EXCERPT < len(text) else "")
    else:
        piece = text if len(text) <= _EXCERPT else text[:_EXCERPT] + "…"
    return piece.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def _bytes_excerpt(raw: bytes, pos: int) -> str:
    start = max(0, pos - 24)
    return repr(raw[start : pos + 24])[2:-1] + f" (byte {pos + 1} of the line)"


# ------------------------------------------------------------------------------------------------------- sources
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
        if len(values) >= _CHUNK:
            yield list(range(start, start + len(values))), values
            if progress is not None:
                progress(len(values))
            start += len(values)
            values = []
    if values:
        yield list(range(start, start + len(values))), values


def _chunks(rows: Iterator[tuple[int | None, int, Any]]) -> Iterator[Chunk]:
    """Group ``(line, row, value)`` records into chunks; the location is the line when there is one."""
    locs: list[int] = []
    values: list[Any] = []
    for line, row, value in rows:
        locs.append(line if line is not None else row)
        values.append(value)
        if len(locs) >= _CHUNK:
            yield locs, values
            locs, values = [], []
    if locs:
        yield locs, values


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
    for path in sorted(folder.rglob("*")):
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
        chunks = _jsonl_file_rows(path, label, problem, progress)
    elif name.endswith(".json"):
        chunks = _json_file_rows(path, label, problem, progress)
    elif name.endswith(".csv"):
        chunks = _chunks(_csv_rows(path, label, problem, progress))
    elif name.endswith(".parquet"):
        chunks = _chunks(_parquet_rows(path, label, problem, progress))
    else:
        chunks = _sniffed_rows(path, label, problem, progress)
    return Part(label, "row" if name.endswith(".parquet") else "line", chunks, size)


def _open(path: Path, label: str, problem: ProblemSink) -> Any:
    try:
        return path.open("rb")
    except OSError as err:
        problem("unreadable_file", "error", f"cannot open the file: {err.strerror or err}", file=label)
        return None


def _read_error(err: OSError, label: str, line: int | None, problem: ProblemSink) -> None:
    problem(
        "unreadable_file",
        "error",
        f"reading stopped with an I/O error: {err.strerror or err}; the rest of the file was not checked",
        file=label,
        line=line,
    )


def _sniffed_rows(path: Path, label: str, problem: ProblemSink, progress: Progress | None) -> Iterator[Chunk]:
    """A file with an unknown ending: JSON (``[`` first) or JSON Lines (``{`` first), else refused."""
    handle = _open(path, label, problem)
    if handle is None:
        return
    try:
        with handle:
            head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError as err:
        _read_error(err, label, None, problem)
        return
    if head.startswith(b"["):
        yield from _json_file_rows(path, label, problem, progress)
    elif head.startswith(b"{"):
        yield from _jsonl_file_rows(path, label, problem, progress)
    else:
        problem(
            "unsupported_file",
            "error",
            f"not a supported data file (supported endings: {', '.join(SUPPORTED_SUFFIXES)}), "
            "and its content is neither a JSON array nor JSON Lines",
            file=label,
        )


# ---------------------------------------------------------------------------------------------------- JSON Lines
def _jsonl_file_rows(path: Path, label: str, problem: ProblemSink, progress: Progress | None) -> Iterator[Chunk]:
    handle = _open(path, label, problem)
    if handle is None:
        return
    with handle:
        yield from jsonl_lines(handle, label, problem, progress, tell=handle.tell)


def jsonl_lines(
    lines: Iterable[bytes],
    label: str,
    problem: ProblemSink,
    progress: Progress | None = None,
    first_line: int = 1,
    tell: Callable[[], int] | None = None,
) -> Iterator[Chunk]:
    """Parse JSON Lines from raw byte lines; every bad line is reported with its number and an excerpt.

    ``tell`` (the file's position) lets the progress bar advance every few thousand lines at no per-line cost.
    """
    loads = json.loads
    # The C scanner behind json.loads, called directly: the same parser without three Python-level wrappers.
    scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
    locs: list[int] = []
    values: list[Any] = []
    done = 0
    line = first_line - 1
    report = progress is not None and tell is not None
    try:
        for raw in lines:
            line += 1
            if report and not line & 4095:
                position = tell()  # type: ignore[misc]
                progress(position - done)  # type: ignore[misc]
                done = position
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problem(
                    "invalid_utf8",
                    "error",
                    f"invalid UTF-8 at byte {err.start + 1} of the line ({err.reason})",
                    file=label,
                    line=line,
                    excerpt=_bytes_excerpt(raw, err.start),
                )
                continue
            try:
                value, end = scan(text, 0)
                n = len(text)
                # Usually only the newline follows the record; anything else must be whitespace.
                if end != n and not (end == n - 1 and text[end] == "\n") and not text[end:].isspace():
                    raise ValueError("extra data")
            except (StopIteration, ValueError, RecursionError):
                # Leading whitespace, a byte-order mark, or an error: json.loads gives the value or the message.
                if line == 1 and text.startswith("\ufeff"):
                    text = text[1:]  # a UTF-8 byte-order mark, as some Windows editors write
                try:
                    value = loads(text)
                except (ValueError, RecursionError) as err:
                    if not text.strip():
                        problem("empty_line", "warning", "empty line", file=label, line=line)
                        continue
                    _json_problem(err, text, label, line, problem)
                    continue
            locs.append(line)
            values.append(value)
            if len(locs) >= _CHUNK:
                yield locs, values
                locs, values = [], []
    except OSError as err:  # a read error mid-file (a failing disk or network filesystem)
        _read_error(err, label, line + 1, problem)
    if locs:
        yield locs, values
    if report:
        progress(tell() - done)  # type: ignore[misc]


def _json_problem(err: BaseException, text: str, label: str, line: int, problem: ProblemSink) -> None:
    stripped = text.rstrip("\r\n")
    if isinstance(err, json.JSONDecodeError):
        # The error may point past the end of the line's content (an unterminated record): report the line's end.
        column = min(err.pos, len(stripped))
        center: int | None = column
        message = f"invalid JSON: {err.msg} at column {column + 1}"
        if err.pos >= len(stripped):
            message += " (the line ends before the record does: truncated?)"
    elif isinstance(err, RecursionError):
        message, center = "invalid JSON: nested too deeply to parse", None
    else:
        message, center = f"invalid JSON: {err}", None
    problem("invalid_json", "error", message, file=label, line=line, excerpt=excerpt(stripped, center))


# ---------------------------------------------------------------------------------------------------------- JSON
def _decode_reporting(data: bytes, label: str, problem: ProblemSink) -> str:
    """Decode UTF-8, reporting each invalid sequence with its line, and replacing it so the rest can be checked."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    pieces: list[str] = []
    pos = 0
    reports = 0
    view = memoryview(data)
    while pos < len(data):
        try:
            pieces.append(bytes(view[pos:]).decode("utf-8"))
            break
        except UnicodeDecodeError as err:
            start, end = pos + err.start, pos + err.end
            pieces.append(bytes(view[pos:start]).decode("utf-8"))
            pieces.append("\ufffd")
            line_start = data.rfind(b"\n", 0, start) + 1
            line_end = data.find(b"\n", start)
            raw_line = data[line_start : line_end if line_end >= 0 else len(data)]
            problem(
                "invalid_utf8",
                "error",
                f"invalid UTF-8 at byte {start - line_start + 1} of the line ({err.reason})",
                file=label,
                line=data.count(b"\n", 0, start) + 1,
                excerpt=_bytes_excerpt(raw_line, start - line_start),
            )
            reports += 1
            pos = end
            if reports >= _MAX_UTF8_REPORTS:
                pieces.append(bytes(view[pos:]).decode("utf-8", errors="replace"))
                break
    return "".join(pieces)


def _json_file_rows(path: Path, label: str, problem: ProblemSink, progress: Progress | None) -> Iterator[Chunk]:
    handle = _open(path, label, problem)
    if handle is None:
        return
    try:
        with handle:
            data = handle.read()
    except OSError as err:
        _read_error(err, label, None, problem)
        return
    if progress is not None:
        progress(len(data))
    text = _decode_reporting(data, label, problem)
    if text.startswith("\ufeff"):
        text = text[1:]
    start = _WS.match(text).end()  # type: ignore[union-attr]  # the pattern matches the empty string
    if start == len(text):
        problem("empty_file", "error", "the file is empty", file=label)
        return
    if text[start] == "{":
        yield from _json_object_file(data, text, start, label, problem)
    elif text[start] == "[":
        yield from _chunks(_json_array(text, start, label, problem))
    else:
        line = text.count("\n", 0, start) + 1
        problem(
            "invalid_json",
            "error",
            "expected a JSON array of records (or JSON Lines)",
            file=label,
            line=line,
            excerpt=excerpt(text[start : start + _EXCERPT]),
        )


def _json_object_file(data: bytes, text: str, start: int, label: str, problem: ProblemSink) -> Iterator[Chunk]:
    decoder = json.JSONDecoder()
    try:
        value, end = decoder.raw_decode(text, start)
    except (ValueError, RecursionError):
        value, end = None, -1
    rest = _WS.match(text, end).end() if end >= 0 else -1  # type: ignore[union-attr]
    if end >= 0 and rest == len(text):
        yield [text.count("\n", 0, start) + 1], [value]  # one object: a single record
        return
    # More than one top-level value, or a first line that does not parse: read the file as JSON Lines, which is
    # what a ``.json`` file that starts with ``{`` almost always is.
    yield from jsonl_lines(data.split(b"\n"), label, problem)


def _json_array(text: str, start: int, label: str, problem: ProblemSink) -> Iterator[tuple[int | None, int, Any]]:
    decoder = json.JSONDecoder()
    match = _WS.match
    pos = match(text, start + 1).end()  # type: ignore[union-attr]
    line = text.count("\n", 0, pos) + 1
    last = pos
    row = 0
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line += text.count("\n", last, pos)
        last = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as err:
            _array_problem(err, text, pos, label, problem)
            return
        yield line, row, value
        row += 1
        pos = match(text, end).end()  # type: ignore[union-attr]
        if pos < len(text) and text[pos] == ",":
            pos = match(text, pos + 1).end()  # type: ignore[union-attr]
            continue
        if pos < len(text) and text[pos] == "]":
            tail = match(text, pos + 1).end()  # type: ignore[union-attr]
            if tail != len(text):
                _array_problem(json.JSONDecodeError("Extra data", text, tail), text, tail, label, problem)
            return
        reason = "Expecting ',' or ']' (the file may be truncated)" if pos >= len(text) else "Expecting ',' or ']'"
        _array_problem(json.JSONDecodeError(reason, text, pos), text, pos, label, problem)
        return


def _array_problem(err: BaseException, text: str, pos: int, label: str, problem: ProblemSink) -> None:
    if isinstance(err, json.JSONDecodeError):
        pos = err.pos
        message = f"invalid JSON: {err.msg} at column {err.colno}; the rest of the file was not checked"
    else:
        message = "invalid JSON: nested too deeply to parse; the rest of the file was not checked"
    line_start = text.rfind("\n", 0, pos) + 1
    line_end = text.find("\n", pos)
    line_text = text[line_start : line_end if line_end >= 0 else len(text)]
    problem(
        "invalid_json",
        "error",
        message,
        file=label,
        line=text.count("\n", 0, pos) + 1,
        excerpt=excerpt(line_text, pos - line_start),
    )


# ----------------------------------------------------------------------------------------------------------- CSV
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
                    excerpt=_bytes_excerpt(raw, err.start),
                )
                text = raw.decode("utf-8", errors="replace")
            if counter[0] == 1 and text.startswith("\ufeff"):
                text = text[1:]
            yield text
    except OSError as err:
        _read_error(err, label, counter[0] + 1, problem)
    if progress is not None and pending:
        progress(pending)


def _csv_rows(
    path: Path, label: str, problem: ProblemSink, progress: Progress | None
) -> Iterator[tuple[int | None, int, Any]]:
    handle = _open(path, label, problem)
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
def _parquet_rows(
    path: Path, label: str, problem: ProblemSink, progress: Progress | None
) -> Iterator[tuple[int | None, int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        problem(
            "unreadable_file", "error", "reading Parquet needs pyarrow (pip install pyarrow)", file=label
        )
        return
    row = 0
    try:
        parquet = pq.ParquetFile(path)
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
