"""JSON Lines and JSON files, parsed into chunks of records; every line that does not parse is reported.

JSON Lines is streamed a line at a time, each line parsed by the C scanner behind ``json.loads``; a bad line (invalid
UTF-8, invalid JSON, an empty line) is reported with its number and an excerpt, and reading goes on with the next.
A JSON file holding one array is loaded whole, because the standard library has no streaming JSON parser; a
``.json`` file that holds JSON Lines is recognised and streamed like one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .parts import (
    CHUNK_ROWS,
    EXCERPT_CHARS,
    Chunk,
    ProblemSink,
    Progress,
    bytes_excerpt,
    excerpt,
    group_chunks,
    open_file,
    read_error,
)

__all__ = ["json_file_rows", "jsonl_file_rows", "jsonl_lines"]

_WS = re.compile(r"[ \t\n\r]*")
_MAX_UTF8_REPORTS = 20  # per JSON-array file: after that the rest is decoded with replacement characters


def jsonl_file_rows(path: Path, label: str, problem: ProblemSink, progress: Progress | None) -> Iterator[Chunk]:
    handle = open_file(path, label, problem)
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
                    excerpt=bytes_excerpt(raw, err.start),
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
            if len(locs) >= CHUNK_ROWS:
                yield locs, values
                locs, values = [], []
    except OSError as err:  # a read error mid-file (a failing disk or network filesystem)
        read_error(err, label, line + 1, problem)
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
                excerpt=bytes_excerpt(raw_line, start - line_start),
            )
            reports += 1
            pos = end
            if reports >= _MAX_UTF8_REPORTS:
                pieces.append(bytes(view[pos:]).decode("utf-8", errors="replace"))
                break
    return "".join(pieces)


def json_file_rows(path: Path, label: str, problem: ProblemSink, progress: Progress | None) -> Iterator[Chunk]:
    handle = open_file(path, label, problem)
    if handle is None:
        return
    try:
        with handle:
            data = handle.read()
    except OSError as err:
        read_error(err, label, None, problem)
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
        yield from group_chunks(_json_array(text, start, label, problem))
    else:
        line = text.count("\n", 0, start) + 1
        problem(
            "invalid_json",
            "error",
            "expected a JSON array of records (or JSON Lines)",
            file=label,
            line=line,
            excerpt=excerpt(text[start : start + EXCERPT_CHARS]),
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
