"""Dataset-level content checks: diversity, duplicates, contradictory labels and train/eval overlap.

They run once the pass has read every row, on the content hashes a
:class:`~trainguard.checks.data.rows.RowTable` kept (numpy sorts over int64 arrays; no text is kept): the unique
ratio (distinct rows once case and whitespace are ignored), exact and normalized duplicates, prompts that occur
with different answers, and eval rows that also occur in the train data.
"""

from __future__ import annotations

from typing import Any

from .report import Issues, format_where
from .rows import RowTable

__all__ = ["check_content", "eval_overlap"]


def check_content(
    rows: RowTable,
    issues: Issues,
    stats: dict[str, Any],
    *,
    fmt: str,
    source_label: str,
    min_unique_ratio: float | None,
    max_examples: int,
) -> Any:
    """Diversity, duplicates and contradictory labels over the rows (at least one); fills ``stats``.

    Returns:
        The rows' normalized hashes, as a numpy array (for :func:`eval_overlap`).
    """
    import numpy as np

    n = len(rows)
    exact = np.frombuffer(rows.exact, dtype=np.int64)
    normal = np.frombuffer(rows.normal, dtype=np.int64)
    n_normal = _distinct(normal)
    # Equal rows are equal once normalized: with no normalized repeat there is no exact one either.
    n_exact = n if n_normal == n else _distinct(exact)
    stats["unique_ratio"] = round(n_normal / n, 4)
    stats["exact_duplicates"] = n - n_exact
    stats["normalized_duplicates"] = n_exact - n_normal
    if n - n_exact:
        _report_repeats(
            rows, issues, *_first_repeats(exact), "duplicates", "exact duplicate(s) of an earlier row", max_examples
        )
    if n_exact - n_normal:
        dup_n = _first_repeats(normal)
        dup_e = set(_first_repeats(exact)[0].tolist())
        keep = np.array([i for i, o in enumerate(dup_n[0].tolist()) if o not in dup_e], dtype=np.int64)
        if len(keep):
            _report_repeats(
                rows,
                issues,
                dup_n[0][keep],
                dup_n[1][keep],
                "near_duplicates",
                "row(s) equal to an earlier row once case and whitespace are ignored",
                max_examples,
            )
    if min_unique_ratio is not None and n >= 2 and n_normal / n < min_unique_ratio:
        issues(
            "low_diversity",
            "error",
            f"only {n_normal} of {n} rows are distinct ({n_normal / n:.1%}; threshold "
            f"{min_unique_ratio:.0%}): training would mostly repeat the same examples",
            file=source_label,
            count=n - n_normal,
        )
    if fmt in ("prompt_completion", "alpaca", "chat"):
        _contradictions(rows, issues, stats, max_examples)
    return normal


def _report_repeats(
    rows: RowTable, issues: Issues, repeats: Any, firsts: Any, code: str, text: str, max_examples: int
) -> None:
    count = len(repeats)
    examples = []
    k = max_examples + 1
    for r, f in zip(repeats[:k].tolist(), firsts[:k].tolist(), strict=True):
        loc = rows.location(r)
        first = rows.location(f)
        loc["same_as"] = format_where(first["file"], first.get("line"), first.get("row"))
        examples.append(loc)
    head = examples[0]
    issues(
        code,
        "warning",
        f"{count} {text} (first: {format_where(head['file'], head.get('line'), head.get('row'))}"
        f" repeats {head['same_as']})",
        file=head["file"],
        line=head.get("line"),
        row=head.get("row"),
        count=count,
        examples=examples[1:],
    )


def _contradictions(rows: RowTable, issues: Issues, stats: dict[str, Any], max_examples: int) -> None:
    import numpy as np

    prompt = np.frombuffer(rows.prompt, dtype=np.int64)
    answer = np.frombuffer(rows.answer, dtype=np.int64)
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
    firsts = np.array([order[starts[g] : ends[g]].min() for g in bad_groups[:10_000]])
    chosen = bad_groups[np.argsort(firsts, kind="stable")[: max_examples + 1]]
    examples = []
    for g in chosen.tolist():
        members = np.sort(order[starts[g] : ends[g]])
        locs = [rows.location(int(o)) for o in members[:6]]
        ex = dict(locs[0])
        ex["also"] = [format_where(x["file"], x.get("line"), x.get("row")) for x in locs[1:]]
        ex["answers"] = int(distinct_answers[g])
        ex["rows"] = len(members)
        examples.append(ex)
    head = examples[0]
    issues(
        "contradictory_labels",
        "warning",
        f"{len(bad_groups)} prompt(s) appear with different answers ({rows_in} rows); first: "
        f"{format_where(head['file'], head.get('line'), head.get('row'))} with "
        f"{', '.join(head['also'])} ({head['answers']} different answers)",
        file=head["file"],
        line=head.get("line"),
        row=head.get("row"),
        count=len(bad_groups),
        examples=examples[1:],
    )


def eval_overlap(
    ev: RowTable,
    eval_normal: Any,
    train: RowTable,
    train_normal: Any,
    stats: dict[str, Any],
    issues: Issues,
    max_examples: int,
) -> None:
    """Report the eval rows that also occur in the train data (compared by normalized hash)."""
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
    for o in inside[: max_examples + 1].tolist():
        loc = ev.location(o)
        t = order[np.searchsorted(sorted_train, eval_normal[o])]
        first = train.location(int(t))
        loc["same_as"] = format_where(first["file"], first.get("line"), first.get("row"))
        examples.append(loc)
    head = examples[0]
    frac = len(inside) / len(eval_normal)
    issues(
        "eval_overlap",
        "warning",
        f"{len(inside)} eval row(s) ({frac:.1%}) also occur in the train data, so eval scores overstate "
        f"generalisation (first: {format_where(head['file'], head.get('line'), head.get('row'))} = {head['same_as']})",
        file=head["file"],
        line=head.get("line"),
        row=head.get("row"),
        count=len(inside),
        examples=examples[1:],
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
