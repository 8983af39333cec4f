"""Record formats and the checks on each record's fields (the *schema* checks), as the rows are read.

The formats are chat (``messages``), prompt/completion (plain or TRL's conversational form), alpaca
(instruction/input/output), text and tokenized (``input_ids``/``labels``); :func:`detect_format` picks the one most
of the first records have. :class:`RecordChecker` checks one record at a time: empty records, missing or empty
fields, wrong types, unknown chat roles, rows with no answer, labels that do not match ``input_ids``. Each valid
row is recorded in the pass's :class:`~trainguard.checks.data.rows.RowTable` (content hashes, location, length) and
queued for token counting; for the common formats, well-typed rows take a batched fast path
(:meth:`RecordChecker.fast_batch`).
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from typing import Any

from .parts import Chunk, Part, excerpt
from .report import Issues
from .rows import WHITESPACE, RowTable, content_text, norm
from .tokenized import IGNORE_INDEX
from .tokens import TokenCounter

__all__ = [
    "CHAT_ROLES",
    "DETECT_ROWS",
    "FAST_KEYS",
    "FORMATS",
    "RecordChecker",
    "a_or_an",
    "detect_format",
    "type_name",
    "value_excerpt",
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

DETECT_ROWS = 100  # records looked at to detect the format: enough to outvote a few odd rows at the top

# Formats with a batched fast path: (prompt key or None, answer key). Rows whose fields are plain non-empty strings
# are collected and hashed a batch at a time (one lower/encode/translate over the joined batch, hashing in C via
# map); anything else takes the per-row path, which reports what is wrong.
FAST_KEYS: dict[str, tuple[str | None, str]] = {
    "prompt_completion": ("prompt", "completion"),
    "text": (None, "text"),
}


def type_name(value: Any) -> str:
    """A value's JSON type name, for messages (``null``, ``object``, ``array``, ``string``...)."""
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}.get(
        type(value), type(value).__name__
    )


def value_excerpt(value: Any) -> str:
    """A short excerpt of a value, as JSON when it can be written as JSON."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, TypeError, RecursionError):
        text = repr(value)
    return excerpt(text[:200])


def a_or_an(noun: str) -> str:
    """``noun`` with its indefinite article."""
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def detect_format(buffer: list[tuple[Part, Chunk]], issues: Issues) -> str:
    """The format most of the first records have, or ``"unknown"`` after reporting the fields seen."""
    votes: dict[str, int] = {}
    keys_seen: set[str] = set()
    first: tuple[Part, int] | None = None
    looked = 0
    for part, (locs, values) in buffer:
        for loc, value in zip(locs, values, strict=True):
            if not isinstance(value, dict) or looked >= DETECT_ROWS:
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
        return max(votes, key=lambda n: votes[n])
    if first is not None:
        part, loc = first
        shown = ", ".join(sorted(keys_seen)[:10])
        issues(
            "unknown_format",
            "error",
            f"no known record format in the first records (fields seen: {shown}); expected one of: "
            + "; ".join(f"{n} ({', '.join(f)})" for n, f in FORMATS.items())
            + ". Name the format with format=... if the fields are named differently",
            file=part.label,
            line=loc if part.kind == "line" else None,
            row=None if part.kind == "line" else loc,
        )
    return "unknown"


Extractor = Callable[[dict[str, Any], str, int | None, int, bool], None]


class RecordChecker:
    """Checks records of one pass field by field; records the valid ones in ``rows`` and queues them in ``tokens``.

    Each format has an extractor, ``_x_<format>(record, label, line, row, kind_line)``: it reports what is wrong
    with the record's fields, or records the row (its hashes, location and length) and queues its text for counting.
    """

    def __init__(
        self,
        issues: Issues,
        rows: RowTable,
        tokens: TokenCounter,
        render: Callable[[dict[str, Any]], tuple[str, str]] | None,
    ) -> None:
        self.issues = issues
        self.rows = rows
        self.tokens = tokens
        self.render = render

    def extractor(self, fmt: str) -> Extractor | None:
        """The extractor of format ``fmt`` (None for a format with none: ``"unknown"``)."""
        return getattr(self, f"_x_{fmt}", None)

    def fast_batch(self, fmt: str, ps: list[str], cs: list[str], locs: list[int], label: str, kind_line: bool) -> None:
        """Hash a batch of well-typed rows at once; the lists are emptied."""
        text_only = fmt == "text"
        n = len(locs)
        ncs = "\x00".join(cs).lower().encode("utf-8", "surrogatepass").translate(None, WHITESPACE).split(b"\x00")
        nps = (
            ncs
            if text_only
            else ("\x00".join(ps).lower().encode("utf-8", "surrogatepass").translate(None, WHITESPACE).split(b"\x00"))
        )
        if len(ncs) != n or len(nps) != n or b"" in ncs or b"" in nps:
            # A NUL inside a text breaks the split, an empty normalized field needs a report: go row by row.
            extract = getattr(self, f"_x_{fmt}")
            key = "text" if text_only else "completion"
            for p, c, loc in zip(ps, cs, locs, strict=True):
                rec = {key: c} if text_only else {"prompt": p, "completion": c}
                extract(rec, label, loc if kind_line else None, loc, kind_line)
        else:
            rows = self.rows
            start = len(rows.exact)
            if text_only:
                rows.exact.extend(map(hash, cs))
                rows.normal.extend(map(hash, ncs))
                rows.prompt.extend([0] * n)
                rows.answer.extend([0] * n)
                rows.chars.extend(map(len, cs))
            else:
                rows.exact.extend(map(hash, zip(ps, cs, strict=True)))
                rows.normal.extend(map(hash, zip(nps, ncs, strict=True)))
                rows.prompt.extend(map(hash, nps))
                rows.answer.extend(map(hash, ncs))
                rows.chars.extend(map(operator.add, map(len, ps), map(len, cs)))
            rows.locs.extend(locs)
            tokens = self.tokens
            if tokens.encoder is not None:
                for i in range(n):
                    if not tokens.wanted():
                        break
                    tokens.add(start + i, ("text", cs[i]) if text_only else ("pair", ps[i], cs[i]))
        ps.clear()
        cs.clear()
        locs.clear()

    def _bad(
        self,
        code: str,
        level: str,
        message: str,
        label: str,
        line: int | None,
        row: int,
        field_name: str,
        value: Any = None,
    ) -> None:
        self.issues(
            code,
            level,
            message,
            file=label,
            line=line,
            row=None if line is not None else row,
            field=field_name,
            excerpt=value_excerpt(value) if value is not None else None,
        )

    def _need_str(
        self, rec: dict[str, Any], key: str, label: str, line: int | None, row: int, required: bool = True
    ) -> str | None:
        """The field as a string, or None after reporting what is wrong with it."""
        value = rec.get(key)
        if value is None:
            if required:
                self._bad("missing_field", "error", f"'{key}' is missing or null", label, line, row, key)
            return None
        if type(value) is not str:
            self._bad(
                "wrong_type", "error", f"'{key}' must be a string, got {type_name(value)}", label, line, row, key, value
            )
            return None
        return value

    def _x_prompt_completion(
        self, rec: dict[str, Any], label: str, line: int | None, row: int, kind_line: bool
    ) -> None:
        p, c = rec.get("prompt"), rec.get("completion")
        if type(p) is str and type(c) is str and c and not c.isspace():
            if not p or p.isspace():
                self._bad("empty_field", "warning", "'prompt' is empty", label, line, row, "prompt")
            np_, nc = norm(p), norm(c)
            ordinal = self.rows.add(
                hash((p, c)),
                hash((np_, nc)),
                hash(np_),
                hash(nc),
                line if kind_line else row,  # type: ignore[arg-type]
                len(p) + len(c),
            )
            if self.tokens.wanted():
                if self.render is not None:
                    self._pend_rendered(ordinal, rec, label, line, row)
                else:
                    self.tokens.add(ordinal, ("pair", p, c))
            return
        if isinstance(p, list) or isinstance(c, list):  # TRL's conversational prompt-completion
            self._conversational_pc(rec, label, line, row, kind_line)
            return
        self._need_str(rec, "prompt", label, line, row)
        ok_c = self._need_str(rec, "completion", label, line, row)
        if ok_c is not None and (not ok_c or ok_c.isspace()):
            self._bad(
                "empty_field",
                "error",
                "'completion' is empty: the row has nothing to learn",
                label,
                line,
                row,
                "completion",
            )

    def _conversational_pc(self, rec: dict[str, Any], label: str, line: int | None, row: int, kind_line: bool) -> None:
        prompt, completion = rec.get("prompt"), rec.get("completion")
        msgs_p = self._messages(prompt, "prompt", label, line, row)
        msgs_c = self._messages(completion, "completion", label, line, row)
        if msgs_p is None or msgs_c is None:
            return
        if not any(m.get("role") == "assistant" and content_text(m.get("content")).strip() for m in msgs_c):
            self._bad(
                "no_answer",
                "error",
                "'completion' has no assistant message with content: the row has nothing to learn",
                label,
                line,
                row,
                "completion",
            )
            return
        self._add_chat(msgs_p + msgs_c, len(msgs_p), label, line, row, kind_line)

    def _x_alpaca(self, rec: dict[str, Any], label: str, line: int | None, row: int, kind_line: bool) -> None:
        ins, inp, out = rec.get("instruction"), rec.get("input", ""), rec.get("output")
        if inp is None:
            inp = ""
        if type(ins) is str and type(inp) is str and type(out) is str and ins.strip() and out.strip():
            n_ins, n_inp, n_out = norm(ins), norm(inp), norm(out)
            ordinal = self.rows.add(
                hash((ins, inp, out)),
                hash((n_ins, n_inp, n_out)),
                hash((n_ins, n_inp)),
                hash(n_out),
                line if kind_line else row,  # type: ignore[arg-type]
                len(ins) + len(inp) + len(out),
            )
            if self.tokens.wanted():
                if self.render is not None:
                    self._pend_rendered(ordinal, rec, label, line, row)
                else:
                    prompt = ins + ("\n\n" + inp if inp else "") + "\n\n"
                    self.tokens.add(ordinal, ("pair", prompt, out))
            return
        ok_ins = self._need_str(rec, "instruction", label, line, row)
        if ok_ins is not None and not ok_ins.strip():
            self._bad("empty_field", "error", "'instruction' is empty", label, line, row, "instruction")
        if type(inp) is not str:
            self._bad(
                "wrong_type", "error", f"'input' must be a string, got {type_name(inp)}", label, line, row, "input", inp
            )
        ok_out = self._need_str(rec, "output", label, line, row)
        if ok_out is not None and not ok_out.strip():
            self._bad(
                "empty_field", "error", "'output' is empty: the row has nothing to learn", label, line, row, "output"
            )

    def _x_text(self, rec: dict[str, Any], label: str, line: int | None, row: int, kind_line: bool) -> None:
        t = rec.get("text")
        if type(t) is str and t.strip():
            nt = norm(t)
            ordinal = self.rows.add(hash(t), hash(nt), 0, 0, line if kind_line else row, len(t))  # type: ignore[arg-type]
            if self.tokens.wanted():
                self.tokens.add(ordinal, ("text", t))
            return
        ok = self._need_str(rec, "text", label, line, row)
        if ok is not None:
            self._bad("empty_field", "error", "'text' is empty", label, line, row, "text")

    def _x_tokenized(self, rec: dict[str, Any], label: str, line: int | None, row: int, kind_line: bool) -> None:
        ids, labels = rec.get("input_ids"), rec.get("labels")
        if not isinstance(ids, list) or not all(type(x) is int for x in ids):
            what = "missing or null" if ids is None else f"must be a list of integers, got {type_name(ids)}"
            self._bad(
                "missing_field" if ids is None else "wrong_type",
                "error",
                f"'input_ids' {what}",
                label,
                line,
                row,
                "input_ids",
                ids,
            )
            return
        if not ids:
            self._bad("empty_field", "error", "'input_ids' is empty", label, line, row, "input_ids")
            return
        if labels is not None and not _label_shape_ok(labels):
            self._bad(
                "wrong_type",
                "error",
                "'labels' must be a class id or target (a number), or a list of numbers: a token-level list as long as "
                f"input_ids ({len(ids)}), target ids of an encoder-decoder, or multi-label values",
                label,
                line,
                row,
                "labels",
                labels,
            )
            return
        if isinstance(labels, list) and len(labels) != len(ids) and all(type(x) is int for x in labels):
            # Target ids of an encoder-decoder (or multi-hot classes) differ in length; a causal LM's do not.
            self._bad(
                "labels_length_differs",
                "warning",
                f"'labels' holds {len(labels)} ids and input_ids {len(ids)}: right for an encoder-decoder's targets, "
                "a crash in a causal LM's loss",
                label,
                line,
                row,
                "labels",
            )
        key = hash(tuple(ids))
        ordinal = self.rows.add(key, key, 0, 0, line if kind_line else row, 0)  # type: ignore[arg-type]
        self.tokens.record(ordinal, len(ids))
        limit = self.tokens.max_length or len(ids)
        # A class id of -100 is ignored by the loss as a token label is (float targets ignore no value).
        masked = [labels] if type(labels) is int else labels if isinstance(labels, list) else []
        if masked and all(type(x) is int and x == IGNORE_INDEX for x in masked[:limit]):
            self.tokens.cut(ordinal)

    def _x_chat(self, rec: dict[str, Any], label: str, line: int | None, row: int, kind_line: bool) -> None:
        msgs = self._messages(rec.get("messages"), "messages", label, line, row)
        if msgs is None:
            return
        first = next(
            (i for i, m in enumerate(msgs) if m.get("role") == "assistant" and content_text(m.get("content")).strip()),
            -1,
        )
        if first < 0:
            self._bad(
                "no_answer",
                "error",
                "no assistant message with content: the row has nothing to learn",
                label,
                line,
                row,
                "messages",
            )
            return
        self._add_chat(msgs, first, label, line, row, kind_line)

    def _messages(self, value: Any, key: str, label: str, line: int | None, row: int) -> list[dict[str, Any]] | None:
        """Validated chat messages, or None after reporting what is wrong."""
        if value is None:
            self._bad("missing_field", "error", f"'{key}' is missing or null", label, line, row, key)
            return None
        if not isinstance(value, list):
            self._bad(
                "wrong_type",
                "error",
                f"'{key}' must be a list of {{role, content}} messages, got {type_name(value)}",
                label,
                line,
                row,
                key,
                value,
            )
            return None
        if not value:
            self._bad("empty_field", "error", f"'{key}' is an empty list", label, line, row, key)
            return None
        good = True
        for i, m in enumerate(value):
            if not isinstance(m, dict):
                self._bad(
                    "wrong_type",
                    "error",
                    f"{key}[{i}] must be an object with role and content, got {type_name(m)}",
                    label,
                    line,
                    row,
                    f"{key}[]",
                    m,
                )
                good = False
                continue
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or role not in CHAT_ROLES:
                what = "missing" if role is None else repr(role) if isinstance(role, str) else type_name(role)
                self._bad(
                    "invalid_role",
                    "error",
                    f"{key}[{i}].role is {what}; known roles: {', '.join(sorted(CHAT_ROLES))}",
                    label,
                    line,
                    row,
                    f"{key}[].role",
                )
                good = False
            if isinstance(content, str):
                if not content.strip() and role != "assistant":
                    self._bad(
                        "empty_field", "warning", f"{key}[{i}].content is empty", label, line, row, f"{key}[].content"
                    )
            elif isinstance(content, list):
                if not all(isinstance(p, dict) for p in content):
                    self._bad(
                        "wrong_type",
                        "error",
                        f"{key}[{i}].content must be a string or a list of parts",
                        label,
                        line,
                        row,
                        f"{key}[].content",
                        content,
                    )
                    good = False
            elif content is None and role == "assistant" and m.get("tool_calls"):
                pass  # an assistant turn that only calls tools
            else:
                self._bad(
                    "wrong_type",
                    "error",
                    f"{key}[{i}].content must be a string, got {type_name(content)}",
                    label,
                    line,
                    row,
                    f"{key}[].content",
                    content,
                )
                good = False
        return value if good else None

    def _add_chat(
        self, msgs: list[dict[str, Any]], first_answer: int, label: str, line: int | None, row: int, kind_line: bool
    ) -> None:
        last = max(i for i, m in enumerate(msgs) if m.get("role") == "assistant")
        texts = [content_text(m.get("content")) for m in msgs]
        roles = [str(m.get("role")) for m in msgs]
        norms = [norm(t) for t in texts]
        exact = hash(tuple(zip(roles, texts, strict=False)))
        normal = hash(tuple(zip(roles, norms, strict=False)))
        prompt = hash(tuple(zip(roles[:last], norms[:last], strict=False)))
        ordinal = self.rows.add(
            exact,
            normal,
            prompt,
            hash(norms[last]),
            line if kind_line else row,  # type: ignore[arg-type]
            sum(len(t) for t in texts),
        )
        if self.tokens.wanted():
            self.tokens.add(ordinal, ("chat", msgs, first_answer, label, line, row))

    def _pend_rendered(self, ordinal: int, rec: dict[str, Any], label: str, line: int | None, row: int) -> None:
        assert self.render is not None
        try:
            prompt, answer = self.render(rec)
        except Exception as err:  # a user's render function: report, never crash the scan
            self._bad(
                "render_error", "error", f"render() failed: {type(err).__name__}: {err}", label, line, row, "render"
            )
            return
        self.tokens.add(ordinal, ("pair", str(prompt), str(answer)))


def _label_shape_ok(labels: Any) -> bool:
    """A label the Trainer trains: a class id or a float target, or a non-empty list of numbers (bools excluded)."""
    if type(labels) in (int, float):
        return True
    return isinstance(labels, list) and bool(labels) and all(type(x) in (int, float) for x in labels)
