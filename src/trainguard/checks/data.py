"""Data validation: the whole training set, read once, every problem with its file and line.

:func:`validate_data` reads JSON, JSON Lines, CSV and Parquet files (or a folder of them), ``datasets.Dataset`` /
``DatasetDict`` objects, DataFrames and lists of dicts, in one streaming pass, and returns a :class:`DataReport`:

- *readability*: unreadable files, invalid UTF-8, invalid JSON (line number and an excerpt), empty lines;
- *schema*: empty records, missing or empty fields, wrong types, unknown chat roles, rows with no answer;
- *lengths* (with a tokenizer): token-length percentiles over every row (batched fast tokenization, the chat
  template when there is one), rows over ``max_length``, and rows whose supervised part (completion, output,
  assistant turns) truncation would cut away entirely, so they teach nothing;
- *content*: the unique ratio (diversity), exact and normalized duplicates, contradictory labels (the same prompt
  with different answers) and train/eval overlap.

Memory grows with the number of rows, never with the size of the text: a row costs about 40 bytes (four 8-byte
content hashes, its line number and its lengths); duplicate, contradiction and overlap analysis runs on those
arrays at the end (numpy sort/unique), so no text is kept.

:func:`check_tokenized_dataset` checks an already tokenized dataset (``input_ids``/``labels``) with vectorised
Arrow/numpy work; :class:`~trainguard.callbacks.data_guard.DataGuard` runs it before the first training step.

Example::

    report = trainguard.validate_data("train.jsonl", tokenizer=tok, max_length=2048)
    report.print(); report.raise_for_errors()
"""

from __future__ import annotations

import bisect
import json
import operator
import os
import sys
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import IO, Any

from ..errors import DataValidationError, _jsonable
from .data_readers import SUPPORTED_SUFFIXES, Chunk, Part, eval_split, excerpt, iter_parts

__all__ = [
    "CHAT_ROLES",
    "FORMATS",
    "DataIssue",
    "DataReport",
    "TokenizedCheck",
    "check_tokenized_dataset",
    "load_tokenizer",
    "validate_data",
]

#: Record formats and the fields that identify them (checked in this order when detecting).
FORMATS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
    "tokenized": ("input_ids",),
}
#: Roles a chat message may have (OpenAI/Hugging Face chat format).
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function", "ipython"})
IGNORE_INDEX = -100

_DETECT_ROWS = 100  # records looked at to detect the format: enough to outvote a few odd rows at the top
_WHITESPACE = b" \t\n\r\x0b\x0c"
_PROGRESS_MIN_BYTES = 32 << 20  # a bar only for inputs that take more than a second or two to read
_PROGRESS_MIN_ROWS = 200_000


# ---------------------------------------------------------------------------------------------------- the report
@dataclass
class DataIssue:
    """One kind of problem in one file, with how often it occurred and where first.

    Attributes:
        code: A stable machine name (``invalid_json``, ``missing_field``, ``duplicates``...).
        level: ``"error"`` or ``"warning"``.
        message: What was found, for a person.
        file: The file (or split, or ``"list"``) it was found in.
        line: The 1-based line of the first occurrence in a text file.
        row: The 0-based record index of the first occurrence (Parquet, datasets, lists).
        field: The field concerned (``completion``, ``messages[].role``...).
        count: How many times it occurred (rows, lines or groups, as the message says).
        excerpt: A short excerpt of the first offending line or value.
        examples: More occurrences: dicts with ``file``, ``line``/``row`` and sometimes ``excerpt`` or ``also``.
    """

    code: str
    level: str
    message: str
    file: str | None = None
    line: int | None = None
    row: int | None = None
    field: str | None = None
    count: int = 1
    excerpt: str | None = None
    examples: list[dict[str, Any]] = dc_field(default_factory=list)

    @property
    def where(self) -> str:
        """``file:line``, ``file row N`` or the file alone."""
        return _where(self.file, self.line, self.row)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "level": self.level,
            "message": self.message,
            "file": self.file,
            "line": self.line,
            "row": self.row,
            "field": self.field,
            "count": self.count,
            "excerpt": self.excerpt,
            "examples": [{k: _jsonable(v) for k, v in e.items()} for e in self.examples],
        }


def _where(file: str | None, line: int | None, row: int | None) -> str:
    if file is None:
        return "-"
    if line is not None:
        return f"{file}:{line}"
    if row is not None:
        return f"{file} row {row}"
    return file


@dataclass
class DataReport:
    """What :func:`validate_data` found: ``errors``, ``warnings`` and ``stats``.

    ``ok`` is true when there is no error (warnings allowed). ``str(report)`` and :meth:`print` render a table;
    :meth:`to_dict` / :meth:`to_json` give the machine-readable form; :meth:`raise_for_errors` raises
    :class:`~trainguard.errors.DataValidationError` naming the first problems.

    Example::

        report = validate_data("train.jsonl")
        if not report.ok: print(report)
    """

    errors: list[DataIssue] = dc_field(default_factory=list)
    warnings: list[DataIssue] = dc_field(default_factory=list)
    stats: dict[str, Any] = dc_field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def issues(self) -> list[DataIssue]:
        return [*self.errors, *self.warnings]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": [i.to_dict() for i in self.errors],
            "warnings": [i.to_dict() for i in self.warnings],
            "stats": _jsonable(self.stats),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def raise_for_errors(self) -> None:
        """Raise :class:`DataValidationError` when the report has errors; do nothing otherwise.

        Raises:
            DataValidationError: Names the first problems (file:line, field) and the counts of all.
        """
        if self.ok:
            return
        first = self.errors[0]
        total = sum(i.count for i in self.errors)
        lines = [f"{i.code} at {i.where}" + (f" ({i.field})" if i.field else "") + f" x{i.count}: {i.message}"
                 for i in self.errors[:5]]
        more = f"; and {len(self.errors) - 5} more kind(s)" if len(self.errors) > 5 else ""
        where: dict[str, Any] = {"file": first.file}
        if first.line is not None:
            where["line"] = first.line
        if first.row is not None:
            where["row"] = first.row
        if first.field:
            where["field"] = first.field
        raise DataValidationError(
            f"data validation failed: {len(self.errors)} kind(s) of error, {total} occurrence(s): "
            + "; ".join(lines) + more,
            where=where,
            evidence={
                "errors": [i.to_dict() for i in self.errors[:10]],
                "error_count": total,
                "warning_count": sum(i.count for i in self.warnings),
            },
        )

    # --------------------------------------------------------------------------------------------- rendering
    def _summary_lines(self) -> list[str]:
        s = self.stats
        status = "OK" if self.ok else "FAILED"
        head = (
            f"{', '.join(s.get('sources', [])) or 'data'}: {status} "
            f"({len(self.errors)} error kind(s), {len(self.warnings)} warning kind(s))"
        )
        out = [head]
        fmt = s.get("format")
        if fmt:
            how = "detected" if s.get("format_detected") else "given"
            out.append(f"format: {fmt} ({how})" + (f"; rendering: {s['rendering']}" if s.get("rendering") else ""))
        out.append(
            f"records: {s.get('records', 0)} read, {s.get('valid_rows', 0)} valid"        )
        tok = s.get("tokens")
        if tok:
            line = (f"tokens p50/p90/p99/max: {tok['p50']}/{tok['p90']}/{tok['p99']}/{tok['max']} "
                    f"over {tok['tokenized_rows']} row(s)")
            if tok.get("max_length"):
                line += (f"; over max_length {tok['max_length']}: {tok['over_max_length']}, "
                         f"answer cut off entirely: {tok['answer_cut_off']}")
            out.append(line)
        elif s.get("chars"):
            c = s["chars"]
            out.append(f"characters p50/p90/p99/max: {c['p50']}/{c['p90']}/{c['p99']}/{c['max']} (no tokenizer)")
        if "unique_ratio" in s:
            out.append(
                f"unique ratio: {s['unique_ratio']:.3f}; exact duplicates: {s.get('exact_duplicates', 0)}, "
                f"normalized duplicates: {s.get('normalized_duplicates', 0)}; "
                f"contradictory prompts: {s.get('contradictory_prompts', 0)}"
            )
        if "eval_overlap" in s:
            out.append(f"eval rows also in train: {s['eval_overlap']}")
        return out

    def _rows(self) -> list[tuple[str, str, str, str, str, str]]:
        rows = []
        for issue in self.issues:
            msg = issue.message
            if issue.excerpt:
                msg += f"  | {issue.excerpt}"
            more = [_where(e.get("file"), e.get("line"), e.get("row")) for e in issue.examples]
            if more:
                msg += "  | also: " + ", ".join(more)
            rows.append((issue.level, issue.code, issue.where, issue.field or "-", str(issue.count), msg))
        return rows

    def __str__(self) -> str:
        out = self._summary_lines()
        rows = self._rows()
        if rows:
            header = ("level", "code", "where", "field", "count", "message")
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
            out.append("")
            for r in [header, *rows]:
                out.append("  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5])
        return "\n".join(out)

    def print(self, file: IO[str] | None = None) -> None:
        """Print the report: a ``rich`` table on a terminal, plain text otherwise."""
        stream = file if file is not None else sys.stdout
        if not _isatty(stream):
            stream.write(str(self) + "\n")
            return
        from rich.console import Console
        from rich.table import Table

        console = Console(file=stream, highlight=False)
        for i, line in enumerate(self._summary_lines()):
            if i == 0:
                console.print(line, style="bold green" if self.ok else "bold red", markup=False)
            else:
                console.print(line, markup=False)
        rows = self._rows()
        if rows:
            table = Table(show_lines=False)
            for name in ("level", "code", "where", "field", "count", "message"):
                table.add_column(name, overflow="fold", justify="right" if name == "count" else "left")
            for r in rows:
                style = "red" if r[0] == "error" else "yellow"
                table.add_row(*r, style=style)
            console.print(table)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------- issue collection
class _Issues:
    """Aggregates problems by (code, file, field): one :class:`DataIssue` each, with a count and examples."""

    def __init__(self, max_examples: int) -> None:
        self.max_examples = max_examples
        self.items: dict[tuple[str, str | None, str | None], DataIssue] = {}

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
        count: int = 1,
        examples: list[dict[str, Any]] | None = None,
    ) -> None:
        key = (code, file, field)
        item = self.items.get(key)
        if item is None:
            self.items[key] = DataIssue(
                code, level, message, file, line, row, field, count, excerpt, list(examples or [])
            )
            return
        item.count += count
        if len(item.examples) < self.max_examples:
            example: dict[str, Any] = {"file": file, "line": line, "row": row}
            if excerpt:
                example["excerpt"] = excerpt
            if message != item.message:
                example["message"] = message
            item.examples.append(example)

    def report(self, stats: dict[str, Any]) -> DataReport:
        items = list(self.items.values())
        return DataReport(
            errors=[i for i in items if i.level == "error"],
            warnings=[i for i in items if i.level != "error"],
            stats=stats,
        )


# ------------------------------------------------------------------------------------------------- tokenizers
def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load a tokenizer from a local folder (never from the network).

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        OSError: The folder holds no tokenizer ``transformers`` can load (the cause is in the message).

    Example::

        tok = load_tokenizer("out/checkpoint-500")
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError... for a folder it cannot use
        raise OSError(f"cannot load a tokenizer from {folder}: {type(err).__name__}: {err}") from err


class _Encoder:
    """Batched token counting on the fastest path the tokenizer offers.

    A fast tokenizer's Rust backend is called directly (``encode_batch``), as ``tokenizer(...)`` does internally,
    minus building Python lists of ids we do not need; offsets give the position of the answer in the same pass.
    A slow tokenizer falls back to ``tokenizer(texts)``.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None and hasattr(tokenizer, "encode_batch"):  # a raw ``tokenizers.Tokenizer``
            backend = tokenizer
        if backend is not None and (getattr(backend, "truncation", None) or getattr(backend, "padding", None)):
            import copy

            # A previous call with truncation=True leaves the backend truncating; lengths must be the real ones.
            backend = copy.deepcopy(backend)
            backend.no_truncation()
            backend.no_padding()
        self.backend = backend
        self.has_template = bool(getattr(tokenizer, "chat_template", None)) and hasattr(
            tokenizer, "apply_chat_template"
        )

    def encode(self, texts: list[str], add_special_tokens: bool) -> list[Any]:
        """One entry per text: a backend ``Encoding`` (fast) or a list of ids (slow)."""
        if self.backend is not None:
            return list(self.backend.encode_batch(texts, add_special_tokens=add_special_tokens))
        out = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        return list(out)

    def answer_survives(self, enc: Any, prefix_chars: int, prefix_text: str, max_length: int,
                        add_special_tokens: bool, text_length: int) -> bool:
        """Whether any token of the answer (which starts at character ``prefix_chars``) is within ``max_length``."""
        char_to_token = getattr(enc, "char_to_token", None)
        if char_to_token is not None:
            # The token holding the answer's first character; characters no token covers (the space a whitespace
            # pre-tokenizer drops) are skipped. A Rust lookup: no list of offsets is built.
            for pos in range(prefix_chars, text_length):
                index = char_to_token(pos)
                if index is not None:
                    return bool(index < max_length)
            return False
        prefix_len = len(self.encode([prefix_text], add_special_tokens)[0])
        return prefix_len < max_length


def _render_plain(messages: list[dict[str, Any]]) -> tuple[str, int]:
    """``role: content`` lines, and where the first assistant content starts (chars)."""
    parts: list[str] = []
    first = -1
    pos = 0
    for m in messages:
        head = f"{m.get('role')}: "
        if first < 0 and m.get("role") == "assistant":
            first = pos + len(head)
        piece = head + _content_text(m.get("content")) + "\n"
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), (first if first >= 0 else pos)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal content parts: only the text parts count
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


# ----------------------------------------------------------------------------------------------- one pass
def _norm(text: str) -> bytes:
    """The normalized form used for near-duplicates, contradictions and overlap: case and whitespace ignored.

    Removing all whitespace (rather than collapsing it) is one C-level ``bytes.translate``, about twice as fast as
    ``" ".join(text.split())``; it also equates ``"a bc"`` with ``"ab c"``, which is rare and still a near-duplicate.
    """
    return text.lower().encode("utf-8", "surrogatepass").translate(None, _WHITESPACE)


def _percentiles(values: Any) -> dict[str, Any]:
    import numpy as np

    if len(values) == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99], method="higher")
    return {
        "p50": int(p50),
        "p90": int(p90),
        "p99": int(p99),
        "max": int(values.max()),
        "mean": round(float(values.mean()), 1),
    }


# Formats with a batched fast path: (prompt key or None, answer key). Rows whose fields are plain non-empty strings
# are collected and hashed a batch at a time (one lower/encode/translate over the joined batch, hashing in C via
# map); anything else takes the per-row path, which reports what is wrong.
_FAST_KEYS: dict[str, tuple[str | None, str]] = {
    "prompt_completion": ("prompt", "completion"),
    "text": (None, "text"),
}
_FAST_BATCH = 2048


class _Pass:
    """One streaming pass over one source (the train data or the eval data)."""

    def __init__(
        self,
        name: str,
        issues: _Issues,
        *,
        fmt: str,
        encoder: _Encoder | None,
        max_length: int | None,
        render: Callable[[dict[str, Any]], tuple[str, str]] | None,
        max_tokenized_rows: int | None,
        batch_size: int,
        max_examples: int,
    ) -> None:
        self.name = name
        self.issues = issues
        self.fmt = fmt  # "auto" until detected
        self.detected = fmt == "auto"
        self.encoder = encoder
        self.max_length = max_length
        self.render = render
        self.max_tokenized_rows = max_tokenized_rows
        self.batch_size = batch_size
        self.max_examples = max_examples
        # Per valid row (by ordinal): content hashes, location, characters; per tokenized row: length, ordinal.
        self.exact = array("q")
        self.normal = array("q")
        self.prompt = array("q")
        self.answer = array("q")
        self.locs = array("q")
        self.chars = array("q")
        self.tok_len = array("q")
        self.tok_ord = array("q")
        self.part_starts: list[int] = []
        self.part_info: list[tuple[str, str]] = []
        self.records = 0
        self.cut_off = 0
        self.cut_examples: list[int] = []
        self.template_used = False
        self.pending: list[tuple[int, Any]] = []
        self.labels: list[str] = []
        self._current: Part | None = None

    # ----------------------------------------------------------------------------------------- locations
    def location(self, ordinal: int) -> dict[str, Any]:
        i = bisect.bisect_right(self.part_starts, ordinal) - 1
        label, kind = self.part_info[i]
        loc = self.locs[ordinal]
        return {"file": label, "line": loc} if kind == "line" else {"file": label, "row": loc}

    # --------------------------------------------------------------------------------------------- reading
    def run(self, parts: Iterator[Part]) -> None:
        buffer: list[tuple[Part, Chunk]] = []
        dicts = 0
        for part in parts:
            self.labels.append(part.label)
            if self.fmt == "auto":
                # Hold the first chunks until the format is known, then replay them in order.
                for chunk in part.chunks:
                    buffer.append((part, chunk))
                    dicts += sum(type(v) is dict for v in chunk[1])
                    if dicts >= _DETECT_ROWS or len(buffer) >= 20:
                        break
                else:
                    continue  # the part ended first: keep buffering from the next part
                self._detect(buffer)
                self._replay(buffer)
                buffer = []
            self._consume(part, part.chunks)  # the rest of the part (all of it once the format is known)
        if self.fmt == "auto":
            self._detect(buffer)
            self._replay(buffer)
        self._flush()

    def _replay(self, buffer: list[tuple[Part, Chunk]]) -> None:
        i = 0
        while i < len(buffer):
            part = buffer[i][0]
            j = i
            while j < len(buffer) and buffer[j][0] is part:
                j += 1
            self._consume(part, iter([b[1] for b in buffer[i:j]]))
            i = j

    def _detect(self, buffer: list[tuple[Part, Chunk]]) -> None:
        votes: dict[str, int] = {}
        keys_seen: set[str] = set()
        first: tuple[Part, int] | None = None
        looked = 0
        for part, (locs, values) in buffer:
            for loc, value in zip(locs, values, strict=True):
                if not isinstance(value, dict) or looked >= _DETECT_ROWS:
                    continue
                looked += 1
                if first is None and value:
                    first = (part, loc)
                keys_seen.update(str(k) for k in value)
                for name, needed in FORMATS.items():
                    if all(k in value for k in needed):
                        votes[name] = votes.get(name, 0) + 1
                        break
        if votes:
            self.fmt = max(votes, key=lambda n: votes[n])
            return
        self.fmt = "unknown"
        if first is not None:
            part, loc = first
            shown = ", ".join(sorted(keys_seen)[:10])
            self.issues(
                "unknown_format",
                "error",
                f"no known record format in the first records (fields seen: {shown}); expected one of: "
                + "; ".join(f"{n} ({', '.join(f)})" for n, f in FORMATS.items())
                + ". Name the format with format=... if the fields are named differently",
                file=part.label,
                line=loc if part.kind == "line" else None,
                row=None if part.kind == "line" else loc,
            )

    def _consume(self, part: Part, chunks: Iterator[Chunk]) -> None:
        if self._current is not part:
            # Ordinals are assigned in reading order, so a part's rows are one contiguous range.
            self._current = part
            self.part_starts.append(len(self.exact))
            self.part_info.append((part.label, part.kind))
        label = part.label
        kind_line = part.kind == "line"
        extract = getattr(self, f"_x_{self.fmt}", None)
        keys = _FAST_KEYS.get(self.fmt)
        kp, kc = keys if keys is not None else (None, "")
        issues = self.issues
        ps: list[str] = []
        cs: list[str] = []
        locs: list[int] = []
        for chunk_locs, values in chunks:
            self.records += len(values)
            for loc, value in zip(chunk_locs, values, strict=True):
                if keys is not None and type(value) is dict:
                    c = value.get(kc)
                    p = value.get(kp) if kp is not None else ""
                    if type(c) is str and type(p) is str and c and (p or kp is None):
                        ps.append(p)
                        cs.append(c)
                        locs.append(loc)
                        continue
                if locs:  # keep reading order: the rows before this one get their ordinals first
                    self._fast_batch(ps, cs, locs, label, kind_line)
                line = loc if kind_line else None
                if type(value) is not dict:
                    issues("not_an_object", "error",
                           f"the record is not an object with fields (it is {_a(_type_name(value))})",
                           file=label, line=line, row=None if kind_line else loc, excerpt=_value_excerpt(value))
                    continue
                if not value:
                    issues("empty_record", "error", "empty record: no fields", file=label, line=line,
                           row=None if kind_line else loc)
                    continue
                if extract is None:
                    continue
                extract(value, label, line, loc, kind_line)
                if len(self.pending) >= self.batch_size:
                    self._flush()
            if len(locs) >= _FAST_BATCH:
                self._fast_batch(ps, cs, locs, label, kind_line)
        if locs:
            self._fast_batch(ps, cs, locs, label, kind_line)

    def _fast_batch(self, ps: list[str], cs: list[str], locs: list[int], label: str, kind_line: bool) -> None:
        """Hash a batch of well-typed rows at once; the lists are emptied."""
        text_only = self.fmt == "text"
        n = len(locs)
        ncs = "\x00".join(cs).lower().encode("utf-8", "surrogatepass").translate(None, _WHITESPACE).split(b"\x00")
        nps = ncs if text_only else (
            "\x00".join(ps).lower().encode("utf-8", "surrogatepass").translate(None, _WHITESPACE).split(b"\x00")
        )
        if len(ncs) != n or len(nps) != n or b"" in ncs or b"" in nps:
            # A NUL inside a text breaks the split, an empty normalized field needs a report: go row by row.
            extract = getattr(self, f"_x_{self.fmt}")
            key = "text" if text_only else "completion"
            for p, c, loc in zip(ps, cs, locs, strict=True):
                rec = {key: c} if text_only else {"prompt": p, "completion": c}
                extract(rec, label, loc if kind_line else None, loc, kind_line)
                if len(self.pending) >= self.batch_size:
                    self._flush()
        else:
            start = len(self.exact)
            if text_only:
                self.exact.extend(map(hash, cs))
                self.normal.extend(map(hash, ncs))
                self.prompt.extend([0] * n)
                self.answer.extend([0] * n)
                self.chars.extend(map(len, cs))
            else:
                self.exact.extend(map(hash, zip(ps, cs, strict=True)))
                self.normal.extend(map(hash, zip(nps, ncs, strict=True)))
                self.prompt.extend(map(hash, nps))
                self.answer.extend(map(hash, ncs))
                self.chars.extend(map(operator.add, map(len, ps), map(len, cs)))
            self.locs.extend(locs)
            if self.encoder is not None:
                for i in range(n):
                    if not self._tokenize_this():
                        break
                    self.pending.append((start + i, ("text", cs[i]) if text_only else ("pair", ps[i], cs[i])))
                    if len(self.pending) >= self.batch_size:
                        self._flush()
        ps.clear()
        cs.clear()
        locs.clear()

    # -------------------------------------------------------------------------------------- field problems
    def _bad(self, code: str, level: str, message: str, label: str, line: int | None, row: int,
             field_name: str, value: Any = None) -> None:
        self.issues(code, level, message, file=label, line=line, row=None if line is not None else row,
                    field=field_name, excerpt=_value_excerpt(value) if value is not None else None)

    def _need_str(self, rec: dict[str, Any], key: str, label: str, line: int | None, row: int,
                  required: bool = True) -> str | None:
        """The field as a string, or None after reporting what is wrong with it."""
        value = rec.get(key)
        if value is None:
            if required:
                self._bad("missing_field", "error", f"'{key}' is missing or null", label, line, row, key)
            return None
        if type(value) is not str:
            self._bad("wrong_type", "error", f"'{key}' must be a string, got {_type_name(value)}", label, line,
                      row, key, value)
            return None
        return value

    def _add(self, e: int, n: int, p: int, a: int, loc: int, chars: int) -> int:
        ordinal = len(self.exact)
        self.exact.append(e)
        self.normal.append(n)
        self.prompt.append(p)
        self.answer.append(a)
        self.locs.append(loc)
        self.chars.append(chars)
        return ordinal

    def _tokenize_this(self) -> bool:
        return self.encoder is not None and (
            self.max_tokenized_rows is None or len(self.tok_ord) + len(self.pending) < self.max_tokenized_rows
        )

    # ---------------------------------------------------------------------------------------- the formats
    def _x_prompt_completion(self, rec: dict[str, Any], label: str, line: int | None, row: int,
                             kind_line: bool) -> None:
        p, c = rec.get("prompt"), rec.get("completion")
        if type(p) is str and type(c) is str and c and not c.isspace():
            if not p or p.isspace():
                self._bad("empty_field", "warning", "'prompt' is empty", label, line, row, "prompt")
            np_, nc = _norm(p), _norm(c)
            ordinal = self._add(hash((p, c)), hash((np_, nc)), hash(np_), hash(nc),
                                line if kind_line else row, len(p) + len(c))  # type: ignore[arg-type]
            if self._tokenize_this():
                if self.render is not None:
                    self._pend_rendered(ordinal, rec, label, line, row)
                else:
                    self.pending.append((ordinal, ("pair", p, c)))
            return
        if isinstance(p, list) or isinstance(c, list):  # TRL's conversational prompt-completion
            self._conversational_pc(rec, label, line, row, kind_line)
            return
        self._need_str(rec, "prompt", label, line, row)
        ok_c = self._need_str(rec, "completion", label, line, row)
        if ok_c is not None and (not ok_c or ok_c.isspace()):
            self._bad("empty_field", "error", "'completion' is empty: the row has nothing to learn", label, line,
                      row, "completion")

    def _conversational_pc(self, rec: dict[str, Any], label: str, line: int | None, row: int,
                           kind_line: bool) -> None:
        prompt, completion = rec.get("prompt"), rec.get("completion")
        msgs_p = self._messages(prompt, "prompt", label, line, row)
        msgs_c = self._messages(completion, "completion", label, line, row)
        if msgs_p is None or msgs_c is None:
            return
        if not any(m.get("role") == "assistant" and _content_text(m.get("content")).strip() for m in msgs_c):
            self._bad("no_answer", "error", "'completion' has no assistant message with content: the row has "
                      "nothing to learn", label, line, row, "completion")
            return
        self._add_chat(msgs_p + msgs_c, len(msgs_p), label, line, row, kind_line)

    def _x_alpaca(self, rec: dict[str, Any], label: str, line: int | None, row: int, kind_line: bool) -> None:
        ins, inp, out = rec.get("instruction"), rec.get("input", ""), rec.get("output")
        if inp is None:
            inp = ""
        if type(ins) is str and type(inp) is str and type(out) is str and ins.strip() and out.strip():
            n_ins, n_inp, n_out = _norm(ins), _norm(inp), _norm(out)
            ordinal = self._add(hash((ins, inp, out)), hash((n_ins, n_inp, n_out)), hash((n_ins, n_inp)),
                                hash(n_out), line if kind_line else row,  # type: ignore[arg-type]
                                len(ins) + len(inp) + len(out))
            if self._tokenize_this():
                if self.render is not None:
                    self._pend_rendered(ordinal, rec, label, line, row)
                else:
                    prompt = ins + ("\n\n" + inp if inp else "") + "\n\n"
                    self.pending.append((ordinal, ("pair", prompt, out)))
            return
        ok_ins = self._need_str(rec, "instruction", label, line, row)
        if ok_ins is not None and not ok_ins.strip():
            self._bad("empty_field", "error", "'instruction' is empty", label, line, row, "instruction")
        if type(inp) is not str:
            self._bad("wrong_type", "error", f"'input' must be a string, got {_type_name(inp)}", label, line, row,
                      "input", inp)
        ok_out = self._need_str(rec, "output", label, line, row)
        if ok_out is not None and not ok_out.strip():
            self._bad("empty_field", "error", "'output' is empty: the row has nothing to learn", label, line, row,
                      "output")

    def _x_text(self, rec: dict[str, Any], label: str, line: int | None, row: int, kind_line: bool) -> None:
        t = rec.get("text")
        if type(t) is str and t.strip():
            nt = _norm(t)
            ordinal = self._add(hash(t), hash(nt), 0, 0, line if kind_line else row, len(t))  # type: ignore[arg-type]
            if self._tokenize_this():
                self.pending.append((ordinal, ("text", t)))
            return
        ok = self._need_str(rec, "text", label, line, row)
        if ok is not None:
            self._bad("empty_field", "error", "'text' is empty", label, line, row, "text")

    def _x_tokenized(self, rec: dict[str, Any], label: str, line: int | None, row: int, kind_line: bool) -> None:
        ids, labels = rec.get("input_ids"), rec.get("labels")
        if not isinstance(ids, list) or not all(type(x) is int for x in ids):
            what = "missing or null" if ids is None else f"must be a list of integers, got {_type_name(ids)}"
            self._bad("missing_field" if ids is None else "wrong_type", "error", f"'input_ids' {what}", label, line,
                      row, "input_ids", ids)
            return
        if not ids:
            self._bad("empty_field", "error", "'input_ids' is empty", label, line, row, "input_ids")
            return
        if labels is not None and (not isinstance(labels, list) or len(labels) != len(ids)
                                   or not all(type(x) is int for x in labels)):
            self._bad("wrong_type", "error", f"'labels' must be a list of {len(ids)} integers like input_ids",
                      label, line, row, "labels", labels)
            return
        key = hash(tuple(ids))
        ordinal = self._add(key, key, 0, 0, line if kind_line else row, 0)  # type: ignore[arg-type]
        self.tok_len.append(len(ids))
        self.tok_ord.append(ordinal)
        limit = self.max_length or len(ids)
        if labels is not None and all(x == IGNORE_INDEX for x in labels[:limit]):
            self._cut(ordinal)

    def _x_chat(self, rec: dict[str, Any], label: str, line: int | None, row: int, kind_line: bool) -> None:
        msgs = self._messages(rec.get("messages"), "messages", label, line, row)
        if msgs is None:
            return
        first = next((i for i, m in enumerate(msgs)
                      if m.get("role") == "assistant" and _content_text(m.get("content")).strip()), -1)
        if first < 0:
            self._bad("no_answer", "error", "no assistant message with content: the row has nothing to learn",
                      label, line, row, "messages")
            return
        self._add_chat(msgs, first, label, line, row, kind_line)

    def _messages(self, value: Any, key: str, label: str, line: int | None, row: int) -> list[dict[str, Any]] | None:
        """Validated chat messages, or None after reporting what is wrong."""
        if value is None:
            self._bad("missing_field", "error", f"'{key}' is missing or null", label, line, row, key)
            return None
        if not isinstance(value, list):
            self._bad("wrong_type", "error", f"'{key}' must be a list of {{role, content}} messages, got "
                      f"{_type_name(value)}", label, line, row, key, value)
            return None
        if not value:
            self._bad("empty_field", "error", f"'{key}' is an empty list", label, line, row, key)
            return None
        good = True
        for i, m in enumerate(value):
            if not isinstance(m, dict):
                self._bad("wrong_type", "error", f"{key}[{i}] must be an object with role and content, got "
                          f"{_type_name(m)}", label, line, row, f"{key}[]", m)
                good = False
                continue
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or role not in CHAT_ROLES:
                what = "missing" if role is None else repr(role) if isinstance(role, str) else _type_name(role)
                self._bad("invalid_role", "error", f"{key}[{i}].role is {what}; known roles: "
                          f"{', '.join(sorted(CHAT_ROLES))}", label, line, row, f"{key}[].role")
                good = False
            if isinstance(content, str):
                if not content.strip() and role != "assistant":
                    self._bad("empty_field", "warning", f"{key}[{i}].content is empty", label, line, row,
                              f"{key}[].content")
            elif isinstance(content, list):
                if not all(isinstance(p, dict) for p in content):
                    self._bad("wrong_type", "error", f"{key}[{i}].content must be a string or a list of parts",
                              label, line, row, f"{key}[].content", content)
                    good = False
            elif content is None and role == "assistant" and m.get("tool_calls"):
                pass  # an assistant turn that only calls tools
            else:
                self._bad("wrong_type", "error", f"{key}[{i}].content must be a string, got "
                          f"{_type_name(content)}", label, line, row, f"{key}[].content", content)
                good = False
        return value if good else None

    def _add_chat(self, msgs: list[dict[str, Any]], first_answer: int, label: str, line: int | None, row: int,
                  kind_line: bool) -> None:
        last = max(i for i, m in enumerate(msgs) if m.get("role") == "assistant")
        texts = [_content_text(m.get("content")) for m in msgs]
        roles = [str(m.get("role")) for m in msgs]
        norms = [_norm(t) for t in texts]
        exact = hash(tuple(zip(roles, texts, strict=False)))
        normal = hash(tuple(zip(roles, norms, strict=False)))
        prompt = hash(tuple(zip(roles[:last], norms[:last], strict=False)))
        ordinal = self._add(exact, normal, prompt, hash(norms[last]), line if kind_line else row,  # type: ignore[arg-type]
                            sum(len(t) for t in texts))
        if self._tokenize_this():
            self.pending.append((ordinal, ("chat", msgs, first_answer, label, line, row)))

    def _pend_rendered(self, ordinal: int, rec: dict[str, Any], label: str, line: int | None, row: int) -> None:
        assert self.render is not None
        try:
            prompt, answer = self.render(rec)
        except Exception as err:  # a user's render function: report, never crash the scan
            self._bad("render_error", "error", f"render() failed: {type(err).__name__}: {err}", label, line, row,
                      "render")
            return
        self.pending.append((ordinal, ("pair", str(prompt), str(answer))))

    # ------------------------------------------------------------------------------------------ tokenizing
    def _cut(self, ordinal: int) -> None:
        self.cut_off += 1
        if len(self.cut_examples) <= self.max_examples:
            self.cut_examples.append(ordinal)

    def _flush(self) -> None:
        if not self.pending or self.encoder is None:
            self.pending = []
            return
        pending, self.pending = self.pending, []
        enc = self.encoder
        with_special: list[tuple[int, str, int, str]] = []  # ordinal, full text, prefix chars, prefix text
        templated: list[tuple[int, str, int, str]] = []
        lazy: dict[int, tuple[list[dict[str, Any]], int]] = {}
        for ordinal, payload in pending:
            kind = payload[0]
            if kind == "pair":
                _, prompt, answer = payload
                with_special.append((ordinal, prompt + answer, len(prompt), prompt))
            elif kind == "text":
                with_special.append((ordinal, payload[1], -1, ""))
            else:
                _, msgs, first, label, line, row = payload
                if enc.has_template:
                    try:
                        full = enc.tokenizer.apply_chat_template(msgs, tokenize=False)
                    except Exception as err:  # jinja2 errors, a template's raise_exception(...)
                        self._bad("template_error", "error", f"the chat template failed: {type(err).__name__}: "
                                  f"{err}", label, line, row, "messages")
                        continue
                    self.template_used = True
                    lazy[ordinal] = (msgs, first)
                    templated.append((ordinal, str(full), -2, ""))
                else:
                    full, prefix_chars = _render_plain(msgs)
                    with_special.append((ordinal, full, prefix_chars, full[:prefix_chars]))
        for group, special in ((with_special, True), (templated, False)):
            if group:
                self._count(group, special, lazy)

    def _count(self, group: list[tuple[int, str, int, str]], special: bool,
               lazy: dict[int, tuple[list[dict[str, Any]], int]]) -> None:
        enc = self.encoder
        assert enc is not None
        try:
            encodings = enc.encode([g[1] for g in group], special)
        except Exception:
            # One bad text (a lone surrogate, say) fails the whole batch: find it row by row.
            encodings = []
            kept = []
            for g in group:
                try:
                    encodings.append(enc.encode([g[1]], special)[0])
                    kept.append(g)
                except Exception as err:
                    loc = self.location(g[0])
                    self.issues("tokenizer_error", "error", f"the tokenizer failed: {type(err).__name__}: {err}",
                                file=loc["file"], line=loc.get("line"), row=loc.get("row"))
            group = kept
        max_length = self.max_length
        tok_len, tok_ord = self.tok_len, self.tok_ord
        for (ordinal, full, prefix_chars, prefix_text), e in zip(group, encodings, strict=False):
            n = len(e)
            tok_len.append(n)
            tok_ord.append(ordinal)
            if max_length is None or n <= max_length or prefix_chars == -1:
                continue
            if prefix_chars == -2:  # chat template: render the part before the first answer only now
                msgs, first = lazy[ordinal]
                try:
                    prefix_text = str(enc.tokenizer.apply_chat_template(
                        msgs[:first], tokenize=False, add_generation_prompt=True))
                except Exception:
                    prefix_text = ""
                # When the template renders the prefix differently alone, count its tokens instead (-3).
                prefix_chars = len(prefix_text) if full.startswith(prefix_text) else -3
            if prefix_chars == -3:
                if len(enc.encode([prefix_text], special)[0]) >= max_length:
                    self._cut(ordinal)
            elif not enc.answer_survives(e, prefix_chars, prefix_text, max_length, special, len(full)):
                self._cut(ordinal)

    # --------------------------------------------------------------------------------------- conclusions
    def conclude(self, stats: dict[str, Any], *, source_label: str, content_checks: bool,
                 min_unique_ratio: float | None, max_truncated_fraction: float | None,
                 max_answer_cut_fraction: float | None) -> Any:
        """Fill ``stats`` and add the dataset-level issues; return the normalized-hash array (for overlap)."""
        import numpy as np

        issues = self.issues
        n = len(self.exact)
        what = "eval " if self.name == "eval" else ""
        stats.update({
            "sources": self.labels,
            "format": self.fmt,
            "format_detected": self.detected,
            "records": self.records,
            "valid_rows": n,
        })
        if self.fmt == "chat" and self.encoder is not None:
            stats["rendering"] = ("the tokenizer's chat template" if self.encoder.has_template
                                  else "plain 'role: content' lines (the tokenizer has no chat template)")
        elif self.fmt == "alpaca" and self.encoder is not None and self.render is None:
            stats["rendering"] = "instruction, input and output joined by blank lines (pass render= for yours)"
        if n == 0:
            issues("empty_dataset", "error", f"the {what}data has no valid row", file=source_label)
            return np.zeros(0, dtype=np.int64)
        chars = np.frombuffer(self.chars, dtype=np.int64)
        if self.fmt != "tokenized":
            stats["chars"] = _percentiles(chars)
        # ------------------------------------------------------------------------------------ token lengths
        if len(self.tok_len):
            lengths = np.frombuffer(self.tok_len, dtype=np.int64)
            tok = _percentiles(lengths)
            tok["tokenized_rows"] = len(lengths)
            tok["max_length"] = self.max_length
            tok["over_max_length"] = 0
            tok["answer_cut_off"] = self.cut_off
            if self.max_length is not None:
                over = np.nonzero(lengths > self.max_length)[0]
                tok["over_max_length"] = len(over)
                if len(over):
                    ordinals = np.frombuffer(self.tok_ord, dtype=np.int64)[over[: self.max_examples + 1]]
                    locs = [self.location(int(o)) for o in ordinals]
                    frac = len(over) / len(lengths)
                    issues("truncated", "warning",
                           f"{len(over)} {what}row(s) ({frac:.1%}) are longer than max_length={self.max_length} "
                           f"tokens and will be truncated (longest: {tok['max']})",
                           file=locs[0]["file"], line=locs[0].get("line"), row=locs[0].get("row"),
                           count=len(over), examples=locs[1:])
                    if max_truncated_fraction is not None and frac > max_truncated_fraction:
                        issues("mostly_truncated", "error",
                               f"{frac:.1%} of the {what}rows are longer than max_length={self.max_length} "
                               f"(threshold {max_truncated_fraction:.0%}): max_length or the data is wrong",
                               file=source_label, count=len(over))
            if self.cut_off:
                cut_frac = self.cut_off / len(lengths)
                level = ("error" if max_answer_cut_fraction is not None and cut_frac > max_answer_cut_fraction
                         else "warning")
                locs = [self.location(o) for o in self.cut_examples]
                if self.fmt == "tokenized":
                    why = (f"have every label set to {IGNORE_INDEX}"
                           + (f" within the first max_length={self.max_length} tokens" if self.max_length else ""))
                else:
                    why = (f"have their whole answer after max_length={self.max_length} tokens: truncation leaves "
                           "no supervised token")
                issues("answer_cut_off", level,
                       f"{self.cut_off} {what}row(s) ({cut_frac:.1%}) {why}, so they teach nothing (loss 0 or NaN)",
                       file=locs[0]["file"], line=locs[0].get("line"), row=locs[0].get("row"),
                       field="labels" if self.fmt == "tokenized" else None,
                       count=self.cut_off, examples=locs[1:])
            stats["tokens"] = tok
        if not content_checks:
            return np.frombuffer(self.normal, dtype=np.int64)
        # ---------------------------------------------------------------------------- diversity, duplicates
        exact = np.frombuffer(self.exact, dtype=np.int64)
        normal = np.frombuffer(self.normal, dtype=np.int64)
        n_normal = _distinct(normal)
        # Equal rows are equal once normalized: with no normalized repeat there is no exact one either.
        n_exact = n if n_normal == n else _distinct(exact)
        stats["unique_ratio"] = round(n_normal / n, 4)
        stats["exact_duplicates"] = n - n_exact
        stats["normalized_duplicates"] = n_exact - n_normal
        if n - n_exact:
            self._duplicates(exact, "duplicates", "exact duplicate(s) of an earlier row", source_label)
        if n_exact - n_normal:
            dup_n = _first_repeats(normal)
            dup_e = set(_first_repeats(exact)[0].tolist())
            keep = np.array([i for i, o in enumerate(dup_n[0].tolist()) if o not in dup_e], dtype=np.int64)
            if len(keep):
                self._report_repeats(dup_n[0][keep], dup_n[1][keep], "near_duplicates",
                                     "row(s) equal to an earlier row once case and whitespace are ignored",
                                     source_label)
        if min_unique_ratio is not None and n >= 2 and n_normal / n < min_unique_ratio:
            issues("low_diversity", "error",
                   f"only {n_normal} of {n} rows are distinct ({n_normal / n:.1%}; threshold "
                   f"{min_unique_ratio:.0%}): training would mostly repeat the same examples",
                   file=source_label, count=n - n_normal)
        # ---------------------------------------------------------------------------- contradictory labels
        if self.fmt in ("prompt_completion", "alpaca", "chat"):
            self._contradictions(stats, source_label)
        return normal

    def _duplicates(self, keys: Any, code: str, text: str, source_label: str) -> None:
        repeats, firsts = _first_repeats(keys)
        self._report_repeats(repeats, firsts, code, text, source_label)

    def _report_repeats(self, repeats: Any, firsts: Any, code: str, text: str, source_label: str) -> None:
        count = len(repeats)
        examples = []
        k = self.max_examples + 1
        for r, f in zip(repeats[:k].tolist(), firsts[:k].tolist(), strict=True):
            loc = self.location(r)
            first = self.location(f)
            loc["same_as"] = _where(first["file"], first.get("line"), first.get("row"))
            examples.append(loc)
        head = examples[0]
        self.issues(code, "warning", f"{count} {text} (first: {_where(head['file'], head.get('line'), head.get('row'))}"
                    f" repeats {head['same_as']})", file=head["file"], line=head.get("line"), row=head.get("row"),
                    count=count, examples=examples[1:])

    def _contradictions(self, stats: dict[str, Any], source_label: str) -> None:
        import numpy as np

        prompt = np.frombuffer(self.prompt, dtype=np.int64)
        answer = np.frombuffer(self.answer, dtype=np.int64)
        ordered = np.sort(prompt)
        if not (ordered[1:] == ordered[:-1]).any():  # the common case: no prompt occurs twice
            stats["contradictory_prompts"] = 0
            return
        order = np.lexsort((answer, prompt))  # by prompt, then answer; stable, so ordinals ascend in ties
        p, a = prompt[order], answer[order]
        n = len(p)
        new_prompt = np.ones(n, dtype=bool)
        new_prompt[1:] = p[1:] != p[:-1]
        new_pair = new_prompt.copy()
        new_pair[1:] |= a[1:] != a[:-1]
        group = np.cumsum(new_prompt) - 1
        distinct_answers = np.bincount(group, weights=new_pair).astype(np.int64)
        bad_groups = np.nonzero(distinct_answers > 1)[0]
        stats["contradictory_prompts"] = len(bad_groups)
        if not len(bad_groups):
            return
        starts = np.nonzero(new_prompt)[0]
        ends = np.append(starts[1:], n)
        rows_in = int((ends[bad_groups] - starts[bad_groups]).sum())
        stats["contradictory_rows"] = rows_in
        # Examples: the groups whose first row comes first in the file.
        firsts = np.array([order[starts[g]:ends[g]].min() for g in bad_groups[:10_000]])
        chosen = bad_groups[np.argsort(firsts, kind="stable")[: self.max_examples + 1]]
        examples = []
        for g in chosen.tolist():
            members = np.sort(order[starts[g]:ends[g]])
            locs = [self.location(int(o)) for o in members[:6]]
            ex = dict(locs[0])
            ex["also"] = [_where(x["file"], x.get("line"), x.get("row")) for x in locs[1:]]
            ex["answers"] = int(distinct_answers[g])
            ex["rows"] = len(members)
            examples.append(ex)
        head = examples[0]
        self.issues(
            "contradictory_labels", "warning",
            f"{len(bad_groups)} prompt(s) appear with different answers ({rows_in} rows); first: "
            f"{_where(head['file'], head.get('line'), head.get('row'))} with "
            f"{', '.join(head['also'])} ({head['answers']} different answers)",
            file=head["file"], line=head.get("line"), row=head.get("row"),
            count=len(bad_groups), examples=examples[1:],
        )


def _distinct(keys: Any) -> int:
    """How many distinct values; a sort, which for int64 is several times faster than ``np.unique``'s hash table."""
    import numpy as np

    ordered = np.sort(keys)
    return int(np.count_nonzero(ordered[1:] != ordered[:-1])) + 1 if len(ordered) else 0


def _first_repeats(keys: Any) -> tuple[Any, Any]:
    """For every row equal to an earlier row: its ordinal and the ordinal of the first such row, by ordinal."""
    import numpy as np

    order = np.argsort(keys, kind="stable")
    k = keys[order]
    same = np.zeros(len(k), dtype=bool)
    same[1:] = k[1:] == k[:-1]
    starts = np.maximum.accumulate(np.where(~same, np.arange(len(k)), 0))
    repeats = order[same]
    firsts = order[starts[same]]
    by_row = np.argsort(repeats, kind="stable")
    return repeats[by_row], firsts[by_row]


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number"}.get(type(value), type(value).__name__)


def _value_excerpt(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, TypeError, RecursionError):
        text = repr(value)
    return excerpt(text[:200])


# -------------------------------------------------------------------------------------------------- progress
def _total_size(source: Any) -> tuple[int | None, str]:
    """The input's size for a progress bar: (bytes, "bytes") for paths, (rows, "rows") for collections."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            if path.is_file():
                return path.stat().st_size, "bytes"
            if path.is_dir():
                return sum(p.stat().st_size for p in path.rglob("*")
                           if p.is_file() and p.name.lower().endswith(SUPPORTED_SUFFIXES)), "bytes"
        except OSError:
            return None, "bytes"
        return None, "bytes"
    try:
        return len(source), "rows"
    except TypeError:
        return None, "rows"


class _Progress:
    """A ``rich`` progress bar on stderr, only on a terminal and only for large inputs (or when forced)."""

    def __init__(self, source: Any, enabled: bool | None, description: str) -> None:
        self.bar: Any = None
        total, unit = _total_size(source)
        if enabled is None:
            big = total is not None and total >= (_PROGRESS_MIN_BYTES if unit == "bytes" else _PROGRESS_MIN_ROWS)
            enabled = big and _isatty(sys.stderr)
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
        columns.append(DownloadColumn() if unit == "bytes" else TextColumn("{task.completed}/{task.total} rows"))
        columns.append(TimeRemainingColumn())
        self.bar = Progress(*columns, console=Console(file=sys.stderr), transient=True)
        self.task = self.bar.add_task(description, total=total)
        self.bar.start()

    def advance(self, amount: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, amount)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


# -------------------------------------------------------------------------------------------- validate_data
def _source_label(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return type(source).__name__


def validate_data(
    source: Any,
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    format: str = "auto",
    eval_source: Any = None,
    render: Callable[[dict[str, Any]], tuple[str, str]] | None = None,
    min_unique_ratio: float | None = 0.5,
    max_truncated_fraction: float | None = 0.95,
    max_answer_cut_fraction: float | None = 0.0,
    max_tokenized_rows: int | None = None,
    batch_size: int = 1000,
    max_examples: int = 5,
    progress: bool | None = None,
) -> DataReport:
    """Validate a whole dataset in one streaming pass and report every problem with its file and line.

    Args:
        source: A JSON / JSON Lines / CSV / Parquet file or a folder of them (read in sorted order), a
            ``datasets.Dataset`` / ``IterableDataset`` / ``DatasetDict`` (its ``train`` split; its ``validation``
            or ``test`` split is used as eval data for the overlap check), a DataFrame, or a list of dicts.
        tokenizer: A tokenizer, or the path of a local folder holding one. Enables the token-length checks.
        max_length: The length training truncates to. Default: the tokenizer's ``model_max_length`` when it is a
            real limit (below one million), else none (lengths are reported, nothing is judged truncated).
        format: ``"auto"`` (detected from the first 100 records), ``"prompt_completion"``, ``"alpaca"``
            (instruction/input/output), ``"chat"`` (``messages``), ``"text"`` or ``"tokenized"`` (``input_ids``).
        eval_source: Eval data, validated the same way; rows of it that also occur in the train data (after
            normalization) are reported as ``eval_overlap``.
        render: For prompt/completion and alpaca rows: ``render(record) -> (prompt_text, answer_text)``, the exact
            text your training builds, for exact token counts. Default: prompt + completion as TRL concatenates
            them; alpaca fields joined by blank lines.
        min_unique_ratio: Error when fewer than this fraction of rows are distinct after normalization. Default
            0.5, the origin's rule: below it most of the training repeats itself. ``None`` turns it off.
        max_truncated_fraction: Error when more than this fraction of rows exceed ``max_length``. Default 0.95,
            the origin's abort rule: nearly every row truncated means ``max_length`` or the data is wrong. Any
            truncated row is a warning either way.
        max_answer_cut_fraction: Error when more than this fraction of rows lose their whole supervised part
            (completion, output, assistant turns) to truncation. Default 0.0: such a row teaches nothing, and a
            batch of them gives loss 0 or NaN (trl#6668, llama-cookbook#133). ``None`` makes it a warning.
        max_tokenized_rows: Tokenize only the first N valid rows (default: all of them).
        batch_size: Rows per tokenizer call (default 1000: large enough for the Rust batch to pay off).
        max_examples: Extra locations kept per issue (default 5).
        progress: Show a progress bar on stderr. Default: only on a terminal and for large inputs.

    Returns:
        A :class:`DataReport`; ``report.ok`` is false when any error was found.

    Raises:
        FileNotFoundError: ``source`` or ``eval_source`` is a path that does not exist, or ``tokenizer`` is a
            path that is not a folder.
        OSError: ``tokenizer`` names a folder with no loadable tokenizer.
        TypeError: ``source`` is of a type no reader knows.
        ValueError: ``format`` names no known format.

    Example::

        report = validate_data("train.jsonl", tokenizer=tok, max_length=2048)
        report.raise_for_errors()
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of: auto, {', '.join(FORMATS)}")
    started = time.perf_counter()
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    encoder = _Encoder(tokenizer) if tokenizer is not None else None
    if max_length is None and tokenizer is not None:
        model_max = getattr(tokenizer, "model_max_length", None)
        if isinstance(model_max, int) and 0 < model_max < 1_000_000:
            max_length = model_max
    eval_label = None
    if eval_source is None:
        eval_label = eval_split(source)
        if eval_label is not None:
            eval_source = source[eval_label]
    for src in (source, eval_source):
        if isinstance(src, (str, os.PathLike)) and not Path(src).exists():
            raise FileNotFoundError(f"no such file or folder: {src}")
    issues = _Issues(max_examples)
    options: dict[str, Any] = {
        "encoder": encoder, "max_length": max_length, "render": render,
        "max_tokenized_rows": max_tokenized_rows, "batch_size": batch_size, "max_examples": max_examples,
    }
    stats: dict[str, Any] = {}
    bar = _Progress(source, progress, "validating")
    try:
        train = _Pass("train", issues, fmt=format, **options)
        train.run(iter_parts(source, issues, bar.advance))
    finally:
        bar.close()
    thresholds = {
        "min_unique_ratio": min_unique_ratio,
        "max_truncated_fraction": max_truncated_fraction,
        "max_answer_cut_fraction": max_answer_cut_fraction,
    }
    train_normal = train.conclude(stats, source_label=_source_label(source), content_checks=True, **thresholds)
    if eval_source is not None:
        ev = _Pass("eval", issues, fmt=train.fmt if train.fmt != "unknown" else format, **options)
        ev.detected = train.detected
        ev.run(iter_parts(eval_source, issues, label=eval_label or "eval"))
        eval_stats: dict[str, Any] = {}
        eval_normal = ev.conclude(eval_stats, source_label=eval_label or _source_label(eval_source),
                                  content_checks=False,
                                  **thresholds)
        stats["eval"] = eval_stats
        _overlap(ev, eval_normal, train, train_normal, stats, issues)
    stats["thresholds"] = thresholds
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return issues.report(stats)


def _overlap(ev: _Pass, eval_normal: Any, train: _Pass, train_normal: Any, stats: dict[str, Any],
             issues: _Issues) -> None:
    import numpy as np

    if not len(eval_normal) or not len(train_normal):
        stats["eval_overlap"] = 0
        return
    inside = np.nonzero(np.isin(eval_normal, train_normal))[0]
    stats["eval_overlap"] = len(inside)
    if not len(inside):
        return
    sorted_train = np.sort(train_normal)
    order = np.argsort(train_normal, kind="stable")
    examples = []
    for o in inside[: ev.max_examples + 1].tolist():
        loc = ev.location(o)
        t = order[np.searchsorted(sorted_train, eval_normal[o])]
        first = train.location(int(t))
        loc["same_as"] = _where(first["file"], first.get("line"), first.get("row"))
        examples.append(loc)
    head = examples[0]
    frac = len(inside) / len(eval_normal)
    issues("eval_overlap", "warning",
           f"{len(inside)} eval row(s) ({frac:.1%}) also occur in the train data, so eval scores overstate "
           f"generalisation (first: {_where(head['file'], head.get('line'), head.get('row'))} = {head['same_as']})",
           file=head["file"], line=head.get("line"), row=head.get("row"), count=len(inside),
           examples=examples[1:])


# ------------------------------------------------------------------------------------ tokenized training sets
@dataclass
class TokenizedCheck:
    """What :func:`check_tokenized_dataset` found in a tokenized dataset.

    Attributes:
        rows: Rows checked.
        empty_rows / masked_rows / over_limit_rows: Counts: no ``input_ids``; no supervised token (every label
            ignored, or the mask column all zero); longer than ``max_positions``.
        empty_examples / masked_examples / over_limit_examples: The first few row indices of each.
        supervision: Where supervision was read: ``"labels"``, ``"completion_mask"``, ``"assistant_masks"``, or
            ``None`` when the collator will make labels from ``input_ids`` (every token supervised).
        max_len: The longest row, in tokens.
        max_positions: The limit rows were compared with (None: not checked).
        skipped: Why nothing was checked, when nothing was (no ``input_ids`` column, a streaming dataset...).
    """

    rows: int = 0
    empty_rows: int = 0
    masked_rows: int = 0
    over_limit_rows: int = 0
    empty_examples: list[int] = dc_field(default_factory=list)
    masked_examples: list[int] = dc_field(default_factory=list)
    over_limit_examples: list[int] = dc_field(default_factory=list)
    supervision: str | None = None
    max_len: int = 0
    max_positions: int | None = None
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def check_tokenized_dataset(
    dataset: Any,
    *,
    max_positions: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    completion_only_loss: bool = True,
    batch_size: int = 50_000,
    max_examples: int = 5,
) -> TokenizedCheck:
    """Find the rows of a tokenized dataset that teach nothing or that the model cannot take.

    A ``datasets.Dataset`` is read as Arrow batches and checked with numpy (seconds for millions of rows); any
    other map-style dataset (a list of dicts, a torch ``Dataset`` of dicts) is read row by row.

    Args:
        dataset: Rows with ``input_ids`` and optionally ``labels``, ``completion_mask`` or ``assistant_masks``.
        max_positions: Rows longer than this are counted (the model's position limit). None: not checked.
        ignore_index: The label value the loss ignores (-100 in transformers).
        completion_only_loss: Whether a ``completion_mask`` column decides the supervised tokens (TRL's default).
        batch_size: Rows per Arrow batch.
        max_examples: Row indices kept per finding.

    Example::

        found = check_tokenized_dataset(trainer.train_dataset, max_positions=model.config.max_position_embeddings)
        print(found.masked_rows)
    """
    result = TokenizedCheck(max_positions=max_positions)
    columns = _column_names(dataset)
    if columns is None:
        result.skipped = f"cannot list the columns of a {type(dataset).__name__}"
        return result
    if "input_ids" not in columns:
        result.skipped = "the dataset has no input_ids column (it is tokenized later, by the collator)"
        return result
    if "labels" in columns:
        result.supervision = "labels"
    elif completion_only_loss and "completion_mask" in columns:
        result.supervision = "completion_mask"
    elif "assistant_masks" in columns:
        result.supervision = "assistant_masks"
    if hasattr(dataset, "with_format") and hasattr(dataset, "iter") and hasattr(dataset, "__len__"):
        _check_arrow(dataset, result, ignore_index, batch_size, max_examples)
    elif hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        _check_rows(dataset, result, ignore_index, max_examples)
    else:
        result.skipped = "a streaming dataset cannot be scanned before training without consuming it"
    return result


def _column_names(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list):
        return names
    if isinstance(dataset, Sequence) and len(dataset) and isinstance(dataset[0], dict):
        return list(dataset[0])
    try:
        first = dataset[0]
    except Exception:
        return None
    return list(first) if isinstance(first, dict) else None


def _list_stats(column: Any, ignore_index: int | None) -> tuple[Any, Any]:
    """Per row of an Arrow list column: its length, and how many values are supervised.

    Supervised means ``!= ignore_index`` (labels) or non-zero (a 0/1 mask, when ``ignore_index`` is None).
    """
    import numpy as np
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    lengths, supervised = [], []
    for chunk in chunks:
        if pa.types.is_large_list(chunk.type) or pa.types.is_list(chunk.type):
            offsets = chunk.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
            values = chunk.values.to_numpy(zero_copy_only=False)  # offsets index into the unsliced values
        else:  # fixed-size lists (a padded dataset)
            width = chunk.type.list_size
            offsets = np.arange(len(chunk) + 1, dtype=np.int64) * width + chunk.offset * width
            values = chunk.values.to_numpy(zero_copy_only=False)
        good = (values != ignore_index) if ignore_index is not None else (values != 0)
        cum = np.concatenate([[0], np.cumsum(good, dtype=np.int64)])
        lengths.append(offsets[1:] - offsets[:-1])
        supervised.append(cum[offsets[1:]] - cum[offsets[:-1]])
    if not lengths:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(lengths), np.concatenate(supervised)


def _check_arrow(dataset: Any, result: TokenizedCheck, ignore_index: int, batch_size: int,
                 max_examples: int) -> None:
    import numpy as np

    wanted = ["input_ids"] + ([result.supervision] if result.supervision else [])
    # The arrow format honours an indices mapping (after select/shuffle/filter); the raw table would not.
    view = dataset.with_format("arrow", columns=wanted)
    offset = 0
    for table in view.iter(batch_size=batch_size):
        lengths, _ = _list_stats(table.column("input_ids"), None)
        n = len(lengths)
        if result.supervision:
            sup_ignore = ignore_index if result.supervision == "labels" else None
            _, supervised = _list_stats(table.column(result.supervision), sup_ignore)
            masked = (supervised == 0) & (lengths > 0)
        else:
            masked = np.zeros(n, dtype=bool)
        empty = lengths == 0
        _tally(result, "empty", empty, offset, max_examples)
        _tally(result, "masked", masked, offset, max_examples)
        if result.max_positions is not None:
            _tally(result, "over_limit", lengths > result.max_positions, offset, max_examples)
        if n:
            result.max_len = max(result.max_len, int(lengths.max()))
        offset += n
    result.rows = offset


def _tally(result: TokenizedCheck, name: str, mask: Any, offset: int, max_examples: int) -> None:
    import numpy as np

    hits = np.nonzero(mask)[0]
    if not len(hits):
        return
    setattr(result, f"{name}_rows", getattr(result, f"{name}_rows") + len(hits))
    examples: list[int] = getattr(result, f"{name}_examples")
    room = max_examples - len(examples)
    if room > 0:
        examples.extend(int(i) + offset for i in hits[:room])


def _check_rows(dataset: Any, result: TokenizedCheck, ignore_index: int, max_examples: int) -> None:
    def note(name: str, i: int) -> None:
        setattr(result, f"{name}_rows", getattr(result, f"{name}_rows") + 1)
        examples: list[int] = getattr(result, f"{name}_examples")
        if len(examples) < max_examples:
            examples.append(i)

    n = len(dataset)
    for i in range(n):
        row = dataset[i]
        ids = row.get("input_ids") if isinstance(row, dict) else None
        length = len(ids) if ids is not None else 0
        result.max_len = max(result.max_len, length)
        if length == 0:
            note("empty", i)
            continue
        if result.supervision:
            sup = row.get(result.supervision)
            values = sup.tolist() if hasattr(sup, "tolist") else list(sup or [])
            if result.supervision == "labels":
                if all(v == ignore_index for v in values):
                    note("masked", i)
            elif not any(values):
                note("masked", i)
        if result.max_positions is not None and length > result.max_positions:
            note("over_limit", i)
    result.rows = n


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun
