"""Which recorded rollback skips a resume may re-apply: only those its run committed, bounded, and never on the word
of ``trainguard-spikes.jsonl`` alone.

A rollback (:class:`~trainguard.SpikeGuard`, policy ``rollback``) withholds the updates of the batches that ended at
a spike. So that a later resume from before the spike skips them again, every checkpoint committed after the
rollback carries the run's rollback records inside its manifest (``trainguard-manifest.json``, the lineage record,
key ``"guards"`` → ``"spike_guard"`` → ``"rollbacks"``), which the commit marker hashes. A resume re-applies exactly
the skips named there, by the checkpoint it resumes from or a later committed checkpoint of the same lineage in the
same folder, each record checked against its bounds:

- it names a lineage, and it is the resumed checkpoint's (a record that names none never applies);
- ``0 <= checkpoint_step < spike_step``, and every skipped step lies in ``(checkpoint_step, spike_step]``;
- it skips at most ``skip_batches`` steps (the option in force), none twice.

``trainguard-spikes.jsonl`` is the human-readable history: a ``rollback`` line there that no committed manifest
confirms is reported (file and line) and ignored; it never makes a step skip. Plain paths and values only.

Example::

    from trainguard.checks.spike_history import plan_resume_skips
    plan = plan_resume_skips(committed=[("checkpoint-34", {"lineage": "L", "spike_step": 31, "checkpoint_step": 30,
                                                          "skip_steps": [31]})],
                             history=[], lineage="L", after=20, skip_batches=1, apply=True)
    assert plan.skips == {31: "checkpoint-34"}
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MalformedFileError, TrainGuardError
from ..safe_fs import parse_json, read_bytes, read_tail_lines
from ._layout import MANIFEST_NAME, METADATA_NAME, CheckpointLayout, checkpoint_step

__all__ = [
    "GUARD_KEY",
    "HistoryLine",
    "ResumeSkips",
    "Rollback",
    "committed_rollbacks",
    "describe_steps",
    "parse_rollback",
    "plan_resume_skips",
    "read_history",
]

#: Where a checkpoint's manifest keeps SpikeGuard's records: ``lineage record["guards"][GUARD_KEY]["rollbacks"]``.
GUARD_KEY = "spike_guard"
#: Rollback records a manifest carries at most (the newest); a longer list is not trainguard's.
MAX_RECORDS = 100
_HISTORY_LIMIT = 16 << 20  # the tail of the jsonl read for the report; it never decides anything
_METADATA_LIMIT = 64 << 20  # a manifest's JSON lists every file: large for sharded checkpoints, never this large


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rollback:
    """One rollback as its run committed it: the lineage, the spike's step, the checkpoint step the run went back to,
    and the steps whose updates the replay withheld."""

    lineage: str
    spike_step: int
    checkpoint_step: int
    skip_steps: tuple[int, ...]

    @property
    def key(self) -> tuple[str, int, tuple[int, ...]]:
        return self.lineage, self.spike_step, self.skip_steps

    def to_dict(self) -> dict[str, Any]:
        return {
            "lineage": self.lineage,
            "spike_step": self.spike_step,
            "checkpoint": CheckpointLayout.name_for(self.checkpoint_step),
            "checkpoint_step": self.checkpoint_step,
            "skip_steps": list(self.skip_steps),
        }


def parse_rollback(value: Any, *, skip_batches: int) -> Rollback | str:
    """``value`` as a :class:`Rollback` when it is inside its bounds, else the reason it is refused (one phrase).

    Example::

        parse_rollback({"lineage": "L", "spike_step": 31, "checkpoint_step": 30, "skip_steps": [31]}, skip_batches=1)
    """
    if not isinstance(value, Mapping):
        return "it is not a JSON object"
    lineage = value.get("lineage")
    if not isinstance(lineage, str) or not lineage:
        return "it names no lineage (a record that names none is never applied)"
    spike, back = value.get("spike_step"), value.get("checkpoint_step")
    if not (isinstance(spike, int) and isinstance(back, int) and _whole(spike) and _whole(back) and 0 <= back < spike):
        return "its spike_step and checkpoint_step are not whole steps with 0 <= checkpoint_step < spike_step"
    steps = value.get("skip_steps")
    if not isinstance(steps, list) or not steps:
        return "its skip_steps is not a non-empty list"
    if len(steps) > skip_batches:
        return f"it skips {len(steps)} steps, more than skip_batches={skip_batches} (the most one rollback skips)"
    if not all(_whole(s) and back < s <= spike for s in steps):
        return f"its skip_steps are not all whole steps after checkpoint-{back} and at most the spike step {spike}"
    if len(set(steps)) != len(steps):
        return "its skip_steps name a step twice"
    return Rollback(lineage, spike, back, tuple(sorted(int(s) for s in steps)))


# ------------------------------------------------------------------------------------------------- the manifests
def _committed_record(folder: Path) -> dict[str, Any] | None:
    """The lineage record of ``folder``'s manifest when its commit marker vouches for the manifest's bytes, else
    None. The bytes are hashed and parsed from one read, so what is checked is what is used."""
    try:
        from .checkpoint.manifest import parse_sha256_file

        expected = parse_sha256_file(folder / MANIFEST_NAME).get(METADATA_NAME)
        data = read_bytes(folder / METADATA_NAME, limit=_METADATA_LIMIT)
    except (OSError, ValueError, TrainGuardError):
        return None
    if expected is None or hashlib.sha256(data).hexdigest() != expected:
        return None
    try:
        meta = parse_json(data, source=folder / METADATA_NAME)
    except MalformedFileError:
        return None
    record = meta.get("lineage") if isinstance(meta, dict) else None
    return record if isinstance(record, dict) else None


def _carried(record: Mapping[str, Any]) -> Any:
    guards = record.get("guards")
    mine = guards.get(GUARD_KEY) if isinstance(guards, Mapping) else None
    return mine.get("rollbacks") if isinstance(mine, Mapping) else None


def committed_rollbacks(
    folder: str | os.PathLike[str],
) -> tuple[str | None, list[tuple[str, Any]], list[tuple[str, str]]]:
    """The lineage of checkpoint ``folder``; the rollback records committed by it and by every later committed
    checkpoint of the same lineage beside it, as ``(checkpoint name, raw record)`` (unchecked: see
    :func:`plan_resume_skips`); and ``(checkpoint name, why)`` for lists refused whole. A manifest whose commit
    marker does not vouch for it counts for nothing; a folder written without trainguard, or with no lineage, has
    none. Never raises.

    Example::

        lineage, committed, problems = committed_rollbacks("out/checkpoint-20")
    """
    path = Path(folder)
    own = _committed_record(path)
    lineage = own.get("lineage") if own is not None else None
    if own is None or not isinstance(lineage, str) or not lineage:
        return None, [], []
    step = checkpoint_step(path)
    found: list[tuple[str, Any]] = []
    problems: list[tuple[str, str]] = []
    folders: list[tuple[int, Path, dict[str, Any]]] = [(step if step is not None else -1, path, own)]
    try:
        siblings = [p for p in path.parent.iterdir() if checkpoint_step(p) is not None and p.name != path.name]
    except OSError:
        siblings = []
    for sibling in siblings:
        number = checkpoint_step(sibling)
        if number is None or step is None or number <= step or sibling.is_symlink() or not sibling.is_dir():
            continue
        record = _committed_record(sibling)
        if record is not None and record.get("lineage") == lineage:
            folders.append((number, sibling, record))
    for number, where, record in sorted(folders, key=lambda item: item[0]):
        carried = _carried(record)
        if not isinstance(carried, list):
            continue
        if len(carried) > MAX_RECORDS:
            problems.append((where.name, f"it carries {len(carried)} rollback records, more than {MAX_RECORDS}"))
            continue
        for value in carried:
            # A record names the checkpoint it went back to; a checkpoint at or before that cannot know of it.
            back = value.get("checkpoint_step") if isinstance(value, Mapping) else None
            if isinstance(back, int) and number <= back:
                problems.append((where.name, f"it was committed at step {number}, not after the rollback it names"))
                continue
            found.append((where.name, value))
    return lineage, found, problems


# ------------------------------------------------------------------------------------------------- the jsonl file
@dataclass(frozen=True)
class HistoryLine:
    """One non-empty line of ``trainguard-spikes.jsonl``: its number (in the part read), and its JSON value (None
    when the line is not JSON trainguard reads)."""

    number: int
    value: Any


def read_history(path: str | os.PathLike[str], *, limit: int = _HISTORY_LIMIT) -> list[HistoryLine]:
    """The lines of a spike history file (its last ``limit`` bytes), for the report of unconfirmed records.

    Raises:
        OSError: It cannot be read (FileNotFoundError: there is none).
        UnsafeFileError: A link, FIFO, device or socket is at its name (never followed, never blocks).
    """
    lines: list[HistoryLine] = []
    for number, raw in enumerate(read_tail_lines(path, limit=limit, follow=False), start=1):
        if not raw.strip():
            continue
        try:
            value = parse_json(raw, source=path, max_depth=32)
        except MalformedFileError:
            value = None
        lines.append(HistoryLine(number, value))
    return lines


# ------------------------------------------------------------------------------------------------- the decision
@dataclass
class ResumeSkips:
    """What a resume does with the recorded rollbacks (:func:`plan_resume_skips`).

    Attributes:
        skips: Each step after the resumed one whose update a committed, in-bounds record withholds, with the
            checkpoint whose manifest names it. Applied only when ``applied``.
        applied: Whether they are withheld (the guard's policy is ``rollback``), or only announced.
        confirmed: The records accepted, oldest spike first: those to carry on into the run's next manifests.
        refused: ``(checkpoint, why)`` for each committed record out of its bounds.
        unconfirmed: ``(line, why)`` for each ``rollback`` line of the jsonl that no accepted record confirms.
    """

    skips: dict[int, str] = field(default_factory=dict)
    applied: bool = False
    confirmed: list[Rollback] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    unconfirmed: list[tuple[int, str]] = field(default_factory=list)


def _line_key(value: Mapping[str, Any]) -> tuple[Any, Any, tuple[int, ...]] | None:
    steps = value.get("skip_steps")
    if not isinstance(steps, list) or not all(_whole(s) for s in steps) or len(steps) > 1_000_000:
        return None
    return value.get("lineage"), value.get("step"), tuple(sorted(steps))


def plan_resume_skips(
    *,
    committed: Iterable[tuple[str, Any]],
    history: Sequence[HistoryLine],
    lineage: str | None,
    after: int,
    skip_batches: int,
    apply: bool,
    known: Iterable[Rollback] = (),
) -> ResumeSkips:
    """Decide the skips of a resume at step ``after`` of ``lineage``, from committed records only.

    Args:
        committed: ``(checkpoint name, raw record)`` from :func:`committed_rollbacks`.
        history: The jsonl lines (:func:`read_history`): reported when unconfirmed, never obeyed.
        lineage: The resumed checkpoint's lineage (None: nothing applies).
        after: The resumed step: only later steps are skipped.
        skip_batches: The guard's option in force, the most steps one record may skip.
        apply: Whether the skips are applied (policy ``rollback``) or only announced.
        known: Records this process committed itself (a rollback in this ``train()`` call): they confirm lines too.
    """
    plan = ResumeSkips(applied=bool(apply))
    accepted: dict[tuple[str, int, tuple[int, ...]], Rollback] = {r.key: r for r in known}
    for source, value in committed:
        parsed = parse_rollback(value, skip_batches=skip_batches)
        if isinstance(parsed, str):
            plan.refused.append((source, parsed))
            continue
        if lineage is None or parsed.lineage != lineage:
            plan.refused.append((source, f"it names lineage {parsed.lineage}, not the checkpoint's {lineage}"))
            continue
        if parsed.key not in accepted:
            plan.confirmed.append(parsed)
        accepted[parsed.key] = parsed
        for step in parsed.skip_steps:
            if step > after:
                plan.skips.setdefault(step, source)
    plan.confirmed.sort(key=lambda r: (r.spike_step, r.checkpoint_step))
    for line in history:
        value = line.value
        if not isinstance(value, Mapping) or value.get("event") != "rollback":
            continue
        owner = value.get("lineage")
        if isinstance(owner, str) and owner and owner != lineage:
            continue  # another run that used this output_dir: its records were never this run's
        key = _line_key(value)
        if key is not None and key in accepted:
            continue
        if not isinstance(owner, str) or not owner:
            why = "it names no lineage"
        elif lineage is None:
            why = "the resumed checkpoint records no lineage"
        else:
            why = "no committed checkpoint of this lineage records it"
        plan.unconfirmed.append((line.number, why))
    return plan


def describe_steps(steps: Iterable[int], limit: int = 12) -> str:
    """``31, 32, 40`` or ``3..99999 (99997 steps)`` for a long run of consecutive steps."""
    ordered = sorted(set(steps))
    if len(ordered) > 2 and ordered[-1] - ordered[0] + 1 == len(ordered):
        return f"{ordered[0]}..{ordered[-1]} ({len(ordered)} steps)"
    shown = ", ".join(str(s) for s in ordered[:limit])
    return shown + (f" and {len(ordered) - limit} more" if len(ordered) > limit else "")
