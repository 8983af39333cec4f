"""Data validation: the whole training set, read once, every problem with its file and line.

:func:`validate_data` reads JSON, JSON Lines, CSV and Parquet files (or a folder of them), ``datasets.Dataset`` /
``DatasetDict`` objects, DataFrames and lists of dicts, in one streaming pass, and returns a
:class:`~trainguard.checks.data.report.DataReport`:

- *readability* (``readers``): unreadable files, invalid UTF-8, invalid JSON (line number and an excerpt), empty
  lines;
- *schema* (``fields``): empty records, missing or empty fields, wrong types, unknown chat roles, rows with no
  answer;
- *lengths* (``tokens``, with a tokenizer): token-length percentiles over every row (batched fast tokenization, the
  chat template when there is one), rows over ``max_length``, and rows whose supervised part (completion, output,
  assistant turns) truncation would cut away entirely, so they teach nothing;
- *content* (``content``): the unique ratio (diversity), exact and normalized duplicates, contradictory labels (the
  same prompt with different answers) and train/eval overlap.

This module holds the entry point and the pass that drives those checks over one source: it detects the format,
feeds every record to the field checks (a batched fast path for well-typed rows), and concludes with the
dataset-level checks. Memory grows with the number of rows, never with the size of the text (see ``rows``).

Example::

    report = trainguard.validate_data("train.jsonl", tokenizer=tok, max_length=2048)
    report.print(); report.raise_for_errors()
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .content import check_content, eval_overlap
from .fields import DETECT_ROWS, FAST_KEYS, FORMATS, RecordChecker, a_or_an, detect_format, type_name, value_excerpt
from .parts import Chunk, Part
from .progress import ProgressBar
from .readers import eval_split, iter_parts
from .report import DataReport, Issues
from .rows import RowTable, percentiles
from .tokens import Encoder, TokenCounter, load_tokenizer

__all__ = ["sniff_format", "validate_data"]

_FAST_BATCH = 2048  # well-typed rows hashed together on the fast path


class _Pass:
    """One streaming pass over one source (the train data or the eval data).

    It owns the pass's :class:`RowTable`, its :class:`TokenCounter` and its :class:`RecordChecker`; it detects the
    format from the first records, feeds every record to the checker in reading order, and concludes with the
    dataset-level checks.
    """

    def __init__(
        self,
        name: str,
        issues: Issues,
        *,
        fmt: str,
        encoder: Encoder | None,
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
        self.render = render
        self.max_examples = max_examples
        self.rows = RowTable()
        self.tokens = TokenCounter(
            encoder,
            self.rows,
            issues,
            max_length=max_length,
            max_tokenized_rows=max_tokenized_rows,
            batch_size=batch_size,
            max_examples=max_examples,
        )
        self.checker = RecordChecker(issues, self.rows, self.tokens, render)
        self.records = 0
        self.labels: list[str] = []
        self._current: Part | None = None

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
                    if dicts >= DETECT_ROWS or len(buffer) >= 20:
                        break
                else:
                    continue  # the part ended first: keep buffering from the next part
                self.fmt = detect_format(buffer, self.issues)
                self._replay(buffer)
                buffer = []
            self._consume(part, part.chunks)  # the rest of the part (all of it once the format is known)
        if self.fmt == "auto":
            self.fmt = detect_format(buffer, self.issues)
            self._replay(buffer)
        self.tokens.flush()

    def _replay(self, buffer: list[tuple[Part, Chunk]]) -> None:
        i = 0
        while i < len(buffer):
            part = buffer[i][0]
            j = i
            while j < len(buffer) and buffer[j][0] is part:
                j += 1
            self._consume(part, iter([b[1] for b in buffer[i:j]]))
            i = j

    def _consume(self, part: Part, chunks: Iterator[Chunk]) -> None:
        if self._current is not part:
            # Ordinals are assigned in reading order, so a part's rows are one contiguous range.
            self._current = part
            self.rows.start_part(part.label, part.kind)
        label = part.label
        kind_line = part.kind == "line"
        fmt = self.fmt
        extract = self.checker.extractor(fmt)
        fast_batch = self.checker.fast_batch
        keys = FAST_KEYS.get(fmt)
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
                    fast_batch(fmt, ps, cs, locs, label, kind_line)
                line = loc if kind_line else None
                if type(value) is not dict:
                    issues(
                        "not_an_object",
                        "error",
                        f"the record is not an object with fields (it is {a_or_an(type_name(value))})",
                        file=label,
                        line=line,
                        row=None if kind_line else loc,
                        excerpt=value_excerpt(value),
                    )
                    continue
                if not value:
                    issues(
                        "empty_record",
                        "error",
                        "empty record: no fields",
                        file=label,
                        line=line,
                        row=None if kind_line else loc,
                    )
                    continue
                if extract is None:
                    continue
                extract(value, label, line, loc, kind_line)  # a full batch of queued rows is counted at once
            if len(locs) >= _FAST_BATCH:
                fast_batch(fmt, ps, cs, locs, label, kind_line)
        if locs:
            fast_batch(fmt, ps, cs, locs, label, kind_line)

    # --------------------------------------------------------------------------------------- conclusions
    def conclude(
        self,
        stats: dict[str, Any],
        *,
        source_label: str,
        content_checks: bool,
        min_unique_ratio: float | None,
        max_truncated_fraction: float | None,
        max_answer_cut_fraction: float | None,
    ) -> Any:
        """Fill ``stats`` and add the dataset-level issues; return the normalized-hash array (for overlap)."""
        import numpy as np

        n = len(self.rows)
        what = "eval " if self.name == "eval" else ""
        stats.update(
            {
                "sources": self.labels,
                "format": self.fmt,
                "format_detected": self.detected,
                "records": self.records,
                "valid_rows": n,
            }
        )
        if self.fmt == "chat" and self.encoder is not None:
            stats["rendering"] = (
                "the tokenizer's chat template"
                if self.encoder.has_template
                else "plain 'role: content' lines (the tokenizer has no chat template)"
            )
        elif self.fmt == "alpaca" and self.encoder is not None and self.render is None:
            stats["rendering"] = "instruction, input and output joined by blank lines (pass render= for yours)"
        if n == 0:
            self.issues("empty_dataset", "error", f"the {what}data has no valid row", file=source_label)
            return np.zeros(0, dtype=np.int64)
        chars = np.frombuffer(self.rows.chars, dtype=np.int64)
        if self.fmt != "tokenized":
            stats["chars"] = percentiles(chars)
        self.tokens.conclude(
            stats,
            fmt=self.fmt,
            what=what,
            source_label=source_label,
            max_truncated_fraction=max_truncated_fraction,
            max_answer_cut_fraction=max_answer_cut_fraction,
        )
        if not content_checks:
            return np.frombuffer(self.rows.normal, dtype=np.int64)
        return check_content(
            self.rows,
            self.issues,
            stats,
            fmt=self.fmt,
            source_label=source_label,
            min_unique_ratio=min_unique_ratio,
            max_examples=self.max_examples,
        )


def _source_label(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return type(source).__name__


def sniff_format(source: Any) -> str:
    """The record format ``format="auto"`` would detect in ``source``, from its first records only (nothing
    further is read): one of :data:`FORMATS`' names, or ``"unknown"``.

    Example::

        sniff_format("train.jsonl")  # 'tokenized' for rows of input_ids
    """
    issues = Issues(0)
    buffer: list[tuple[Part, Chunk]] = []
    dicts = 0
    for part in iter_parts(source, issues):
        for chunk in part.chunks:
            buffer.append((part, chunk))
            dicts += sum(type(v) is dict for v in chunk[1])
            if dicts >= DETECT_ROWS or len(buffer) >= 20:  # as _Pass.run stops buffering
                return detect_format(buffer, issues)
    return detect_format(buffer, issues)


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
    encoder = Encoder(tokenizer) if tokenizer is not None else None
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
    issues = Issues(max_examples)
    options: dict[str, Any] = {
        "encoder": encoder,
        "max_length": max_length,
        "render": render,
        "max_tokenized_rows": max_tokenized_rows,
        "batch_size": batch_size,
        "max_examples": max_examples,
    }
    stats: dict[str, Any] = {}
    bar = ProgressBar(source, progress, "validating")
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
        eval_normal = ev.conclude(
            eval_stats, source_label=eval_label or _source_label(eval_source), content_checks=False, **thresholds
        )
        stats["eval"] = eval_stats
        eval_overlap(ev.rows, eval_normal, train.rows, train_normal, stats, issues, ev.max_examples)
    stats["thresholds"] = thresholds
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return issues.report(stats)
