"""What :func:`~trainguard.checks.data.validate_data` returns, and how problems are collected into it.

:class:`DataIssue` is one kind of problem in one file (a stable code, a level, a message, where it first occurred,
how often, and more examples); :class:`DataReport` holds the errors, the warnings and the statistics, renders them
as a table (``rich`` on a terminal, plain text otherwise) or JSON, and raises
:class:`~trainguard.errors.DataValidationError` on request. :class:`Issues` is the collector every check and
reader reports to: it aggregates occurrences by (code, file, field), keeping a count and the first few locations.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import IO, Any

from ...display import printable, terminal_of
from ...errors import DataValidationError, _jsonable
from ...safe_fs import display_json

__all__ = ["DataIssue", "DataReport", "Issues", "format_where", "isatty"]


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
        return format_where(self.file, self.line, self.row)

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


def format_where(file: str | None, line: int | None, row: int | None) -> str:
    """``file:line``, ``file row N``, the file alone, or ``-`` when there is no file."""
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

        from trainguard import validate_data
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

    @property
    def error_kinds(self) -> list[str]:
        """The distinct error codes (one code can be reported for several fields or files)."""
        return sorted({i.code for i in self.errors})

    @property
    def warning_kinds(self) -> list[str]:
        """The distinct warning codes."""
        return sorted({i.code for i in self.warnings})

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": [i.to_dict() for i in self.errors],
            "warnings": [i.to_dict() for i in self.warnings],
            "stats": _jsonable(self.stats),
        }

    def to_json(self, indent: int | None = 2) -> str:
        # Data may hold lone surrogates ("\ud800" is valid in a JSON string): shown escaped, so the text encodes.
        return json.dumps(display_json(self.to_dict()), indent=indent, ensure_ascii=False)

    def raise_for_errors(self) -> None:
        """Raise :class:`DataValidationError` when the report has errors; do nothing otherwise.

        Raises:
            DataValidationError: Names the first problems (file:line, field) and the counts of all.
        """
        if self.ok:
            return
        first = self.errors[0]
        total = sum(i.count for i in self.errors)
        lines = [
            f"{i.code} at {i.where}" + (f" ({i.field})" if i.field else "") + f" x{i.count}: {i.message}"
            for i in self.errors[:5]
        ]
        more = f"; and {len(self.errors) - 5} more" if len(self.errors) > 5 else ""
        where: dict[str, Any] = {"file": first.file}
        if first.line is not None:
            where["line"] = first.line
        if first.row is not None:
            where["row"] = first.row
        if first.field:
            where["field"] = first.field
        raise DataValidationError(
            f"data validation failed: {len(self.error_kinds)} kind(s) of error, {total} occurrence(s): "
            + "; ".join(lines)
            + more,
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
            f"({len(self.error_kinds)} error kind(s), {len(self.warning_kinds)} warning kind(s))"
        )
        out = [head]
        fmt = s.get("format")
        if fmt:
            how = "detected" if s.get("format_detected") else "given"
            out.append(f"format: {fmt} ({how})" + (f"; rendering: {s['rendering']}" if s.get("rendering") else ""))
        out.append(f"records: {s.get('records', 0)} read, {s.get('valid_rows', 0)} valid")
        tok = s.get("tokens")
        if tok:
            line = (
                f"tokens p50/p90/p99/max: {tok['p50']}/{tok['p90']}/{tok['p99']}/{tok['max']} "
                f"over {tok['tokenized_rows']} row(s)"
            )
            if tok.get("max_length"):
                line += (
                    f"; over max_length {tok['max_length']}: {tok['over_max_length']}, "
                    f"answer cut off entirely: {tok['answer_cut_off']}"
                )
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
        # Source names, fields and excerpts come from the data: each line is one printable line.
        return [printable(line) for line in out]

    def _rows(self) -> list[tuple[str, str, str, str, str, str]]:
        rows = []
        for issue in self.issues:
            msg = issue.message
            if issue.excerpt:
                msg += f"  | {issue.excerpt}"
            more = [format_where(e.get("file"), e.get("line"), e.get("row")) for e in issue.examples]
            if more:
                msg += "  | also: " + ", ".join(more)
            # Escaped before the widths are measured, so the columns stay aligned.
            where, field, msg = printable(issue.where), printable(issue.field or "-"), printable(msg)
            rows.append((issue.level, issue.code, where, field, str(issue.count), msg))
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
        if not isatty(stream):
            stream.write(str(self) + "\n")
            return
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        # Every cell is escaped already; rich's own colours must reach the terminal, not the CLI's escaping stream.
        console = Console(file=terminal_of(stream), highlight=False)
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
                # Text, not str: a field named "[link=https://…]x[/]" is shown as written, never parsed as markup.
                table.add_row(*(Text(cell) for cell in r), style=style)
            console.print(table)


def isatty(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (False for streams that cannot tell)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------- issue collection
class Issues:
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
