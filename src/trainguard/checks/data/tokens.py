"""Token lengths: the tokenizer, batched token counting, and the rows truncation would leave with no answer.

With a tokenizer, every valid row (or the first ``max_tokenized_rows``) is counted in batches on the fastest path
the tokenizer offers, rendered the way training renders it: prompt + completion as TRL concatenates them, alpaca
fields joined by blank lines, chat rows through the tokenizer's chat template (plain ``role: content`` lines when
it has none), or the user's ``render``. :class:`TokenCounter` keeps each row's length and finds the rows whose whole
supervised part (completion, output, assistant turns) lies beyond ``max_length``; :meth:`TokenCounter.conclude`
turns them into the length percentiles and the ``truncated``, ``mostly_truncated`` and ``answer_cut_off`` issues.
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path
from typing import Any

from .report import Issues
from .rows import RowTable, content_text, percentiles
from .tokenized import IGNORE_INDEX

__all__ = ["Encoder", "TokenCounter", "load_tokenizer", "render_plain"]


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load a tokenizer from a local folder (never from the network).

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        OSError: The folder holds no tokenizer ``transformers`` can load (the cause is in the message).

    Example::

        tok = load_tokenizer("out/checkpoint-50")
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError... for a folder it cannot use
        raise OSError(f"cannot load a tokenizer from {folder}: {type(err).__name__}: {err}") from err


class Encoder:
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

    def answer_survives(
        self, enc: Any, prefix_chars: int, prefix_text: str, max_length: int, add_special_tokens: bool, text_length: int
    ) -> bool:
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


def render_plain(messages: list[dict[str, Any]]) -> tuple[str, int]:
    """``role: content`` lines, and where the first assistant content starts (chars)."""
    parts: list[str] = []
    first = -1
    pos = 0
    for m in messages:
        head = f"{m.get('role')}: "
        if first < 0 and m.get("role") == "assistant":
            first = pos + len(head)
        piece = head + content_text(m.get("content")) + "\n"
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), (first if first >= 0 else pos)


class TokenCounter:
    """The token lengths of one pass's rows, counted a batch at a time, and the rows whose answer is cut off.

    Rows are queued with :meth:`add` as ``("pair", prompt, answer)``, ``("text", text)`` or
    ``("chat", messages, first_answer, label, line, row)``; a full batch (``batch_size``) is counted at once.
    """

    def __init__(
        self,
        encoder: Encoder | None,
        rows: RowTable,
        issues: Issues,
        *,
        max_length: int | None,
        max_tokenized_rows: int | None,
        batch_size: int,
        max_examples: int,
    ) -> None:
        self.encoder = encoder
        self.rows = rows
        self.issues = issues
        self.max_length = max_length
        self.max_tokenized_rows = max_tokenized_rows
        self.batch_size = batch_size
        self.max_examples = max_examples
        # Per counted row: its length in tokens and its ordinal in ``rows``.
        self.tok_len = array("q")
        self.tok_ord = array("q")
        self.pending: list[tuple[int, Any]] = []
        self.cut_off = 0
        self.cut_examples: list[int] = []
        self.template_used = False

    def wanted(self) -> bool:
        """Whether the next row should be tokenized (there is a tokenizer, and the row limit is not reached)."""
        return self.encoder is not None and (
            self.max_tokenized_rows is None or len(self.tok_ord) + len(self.pending) < self.max_tokenized_rows
        )

    def add(self, ordinal: int, payload: tuple[Any, ...]) -> None:
        """Queue row ``ordinal`` for counting; count the queue when it holds a batch."""
        self.pending.append((ordinal, payload))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def record(self, ordinal: int, length: int) -> None:
        """A row whose length is known without a tokenizer (an already tokenized row)."""
        self.tok_len.append(length)
        self.tok_ord.append(ordinal)

    def cut(self, ordinal: int) -> None:
        """Row ``ordinal`` has no supervised token left within ``max_length``."""
        self.cut_off += 1
        if len(self.cut_examples) <= self.max_examples:
            self.cut_examples.append(ordinal)

    def flush(self) -> None:
        """Count the queued rows now: one batched tokenizer call per kind of text."""
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
                        self.issues(
                            "template_error",
                            "error",
                            f"the chat template failed: {type(err).__name__}: {err}",
                            file=label,
                            line=line,
                            row=None if line is not None else row,
                            field="messages",
                            excerpt=None,
                        )
                        continue
                    self.template_used = True
                    lazy[ordinal] = (msgs, first)
                    templated.append((ordinal, str(full), -2, ""))
                else:
                    full, prefix_chars = render_plain(msgs)
                    with_special.append((ordinal, full, prefix_chars, full[:prefix_chars]))
        for group, special in ((with_special, True), (templated, False)):
            if group:
                self._count(group, special, lazy)

    def _count(
        self, group: list[tuple[int, str, int, str]], special: bool, lazy: dict[int, tuple[list[dict[str, Any]], int]]
    ) -> None:
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
                    loc = self.rows.location(g[0])
                    self.issues(
                        "tokenizer_error",
                        "error",
                        f"the tokenizer failed: {type(err).__name__}: {err}",
                        file=loc["file"],
                        line=loc.get("line"),
                        row=loc.get("row"),
                    )
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
                    prefix_text = str(
                        enc.tokenizer.apply_chat_template(msgs[:first], tokenize=False, add_generation_prompt=True)
                    )
                except Exception:
                    prefix_text = ""
                # When the template renders the prefix differently alone, count its tokens instead (-3).
                prefix_chars = len(prefix_text) if full.startswith(prefix_text) else -3
            if prefix_chars == -3:
                if len(enc.encode([prefix_text], special)[0]) >= max_length:
                    self.cut(ordinal)
            elif not enc.answer_survives(e, prefix_chars, prefix_text, max_length, special, len(full)):
                self.cut(ordinal)

    def conclude(
        self,
        stats: dict[str, Any],
        *,
        fmt: str,
        what: str,
        source_label: str,
        max_truncated_fraction: float | None,
        max_answer_cut_fraction: float | None,
    ) -> None:
        """Set ``stats["tokens"]`` and add the length issues (nothing when no row was counted)."""
        import numpy as np

        if not len(self.tok_len):
            return
        issues = self.issues
        lengths = np.frombuffer(self.tok_len, dtype=np.int64)
        tok = percentiles(lengths)
        tok["tokenized_rows"] = len(lengths)
        tok["max_length"] = self.max_length
        tok["over_max_length"] = 0
        tok["answer_cut_off"] = self.cut_off
        if self.max_length is not None:
            over = np.nonzero(lengths > self.max_length)[0]
            tok["over_max_length"] = len(over)
            if len(over):
                ordinals = np.frombuffer(self.tok_ord, dtype=np.int64)[over[: self.max_examples + 1]]
                locs = [self.rows.location(int(o)) for o in ordinals]
                frac = len(over) / len(lengths)
                issues(
                    "truncated",
                    "warning",
                    f"{len(over)} {what}row(s) ({frac:.1%}) are longer than max_length={self.max_length} "
                    f"tokens and will be truncated (longest: {tok['max']})",
                    file=locs[0]["file"],
                    line=locs[0].get("line"),
                    row=locs[0].get("row"),
                    count=len(over),
                    examples=locs[1:],
                )
                if max_truncated_fraction is not None and frac > max_truncated_fraction:
                    issues(
                        "mostly_truncated",
                        "error",
                        f"{frac:.1%} of the {what}rows are longer than max_length={self.max_length} "
                        f"(threshold {max_truncated_fraction:.0%}): max_length or the data is wrong",
                        file=source_label,
                        count=len(over),
                    )
        if self.cut_off:
            cut_frac = self.cut_off / len(lengths)
            level = "error" if max_answer_cut_fraction is not None and cut_frac > max_answer_cut_fraction else "warning"
            locs = [self.rows.location(o) for o in self.cut_examples]
            if fmt == "tokenized":
                why = f"have every label set to {IGNORE_INDEX}" + (
                    f" within the first max_length={self.max_length} tokens" if self.max_length else ""
                )
            else:
                why = (
                    f"have their whole answer after max_length={self.max_length} tokens: truncation leaves "
                    "no supervised token"
                )
            issues(
                "answer_cut_off",
                level,
                f"{self.cut_off} {what}row(s) ({cut_frac:.1%}) {why}, so they teach nothing (loss 0 or NaN)",
                file=locs[0]["file"],
                line=locs[0].get("line"),
                row=locs[0].get("row"),
                field="labels" if fmt == "tokenized" else None,
                count=self.cut_off,
                examples=locs[1:],
            )
        stats["tokens"] = tok
