"""The policy on a tokenized training set: from what was found, the findings to report and whether to refuse.

:func:`judge_tokenized` turns a :class:`~trainguard.checks.data.tokenized.TokenizedCheck` into a :class:`Verdict`:
one sentence per kind of finding (rows with no supervised token, empty rows, rows longer than the model's
positions), and whether training should be refused. :class:`~trainguard.callbacks.data_guard.DataGuard` runs the
check, asks for the verdict, and acts on it (shares it across ranks, alerts, raises).
"""

from __future__ import annotations

from dataclasses import dataclass

from .tokenized import IGNORE_INDEX, TokenizedCheck

__all__ = ["ACTIONS", "Verdict", "judge_tokenized"]

#: What may be done about rows that teach nothing: refuse to train (raise), or only warn.
ACTIONS = ("refuse", "warn")


@dataclass(frozen=True)
class Verdict:
    """What to do about a tokenized check.

    Attributes:
        findings: One sentence per kind of problem found, with counts and the first row indices (empty: none).
        refuse: Whether training should be refused.
    """

    findings: list[str]
    refuse: bool


def judge_tokenized(
    result: TokenizedCheck,
    *,
    action: str = "refuse",
    max_masked_fraction: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> Verdict:
    """Judge what :func:`~trainguard.checks.data.check_tokenized_dataset` found.

    Rows that teach nothing (no supervised token, or no ``input_ids``) are refused when their fraction exceeds
    ``max_masked_fraction``; any row longer than the position limit is refused. A skipped or empty check finds
    nothing. With ``action="warn"`` nothing is refused; the findings are the same.

    Args:
        result: The check's result.
        action: ``"refuse"`` or ``"warn"``.
        max_masked_fraction: Largest tolerated fraction of rows that teach nothing.
        ignore_index: The label value the loss ignores (named in the finding).

    Example::

        from trainguard.checks.data import check_tokenized_dataset
    verdict = judge_tokenized(check_tokenized_dataset(ds, max_positions=2048))
        if verdict.refuse: raise SystemExit("; ".join(verdict.findings))
    """
    findings: list[str] = []
    if result.skipped or not result.rows:
        return Verdict(findings, False)
    nothing = result.masked_rows + result.empty_rows
    if result.masked_rows:
        findings.append(
            f"{result.masked_rows} of {result.rows} row(s) have no supervised token "
            f"(every label is {ignore_index}; rows {_rows(result.masked_examples, result.masked_rows)})"
            if result.supervision == "labels"
            else f"{result.masked_rows} of {result.rows} row(s) have an all-zero {result.supervision} "
            f"(rows {_rows(result.masked_examples, result.masked_rows)})"
        )
    if result.empty_rows:
        empty = _rows(result.empty_examples, result.empty_rows)
        findings.append(f"{result.empty_rows} row(s) have no input_ids (rows {empty})")
    if result.over_limit_rows:
        findings.append(
            f"{result.over_limit_rows} row(s) are longer than the model's {result.max_positions} positions "
            f"(longest {result.max_len}; rows {_rows(result.over_limit_examples, result.over_limit_rows)})"
        )
    too_many = nothing / result.rows > max_masked_fraction
    refuse = action == "refuse" and (too_many or result.over_limit_rows > 0)
    return Verdict(findings, refuse)


def _rows(indices: list[int], count: int) -> str:
    return ", ".join(str(i) for i in indices[:5]) + (", …" if count > len(indices[:5]) else "")
