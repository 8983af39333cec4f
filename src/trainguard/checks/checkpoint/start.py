"""What the start of ``train()`` decides about checkpoints, before anything loads: a fresh start (refused when the
output_dir holds checkpoints, or started beside them or after archiving them, by option), or a resume (which
checkpoint, verified, and which run lineage the run continues). Plain inputs; the callback shares the decision
with every rank and acts on it.

Example::

    decision = decide_resume("out", True)     # the newest verified checkpoint of the current lineage
    decision.path, decision.lineage
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import lineage as _lineage
from .._layout import ACCEPTED_INEXACT, ARCHIVE_DIR
from .._resume import checkpoint_dirs, resolve_resume_checkpoint
from ..fresh_start import archive_checkpoints
from .report import CheckpointReport
from .resume import resume_choice
from .verify import verify_checkpoint

__all__ = ["EXISTING_CHECKPOINTS", "StartDecision", "check_loaded", "decide_fresh_start", "decide_resume"]

#: What a fresh start does when the output_dir holds checkpoints.
EXISTING_CHECKPOINTS = ("refuse", "keep", "archive")


@dataclass
class StartDecision:
    """The checkpoint to load (``path``; None: start fresh), the lineage this run belongs to and whether it adopts
    checkpoints that record none, a new run id, what to tell the user (``notes``: ``(level, text)``), the checkpoint
    status, and the checkpoints that failed on the way (set aside or skipped)."""

    path: str | None = None
    lineage: str = field(default_factory=_lineage.new_id)
    run: str = field(default_factory=_lineage.new_id)
    adopts_unrecorded: bool = False
    parent: _lineage.CheckpointOrigin | None = None
    notes: list[tuple[str, str]] = field(default_factory=list)
    status: str = ""
    failed: list[str] = field(default_factory=list)
    #: For a resume: the run's facts recorded at that save, and what the first step after it saw on each rank.
    saved_facts: dict[str, Any] | None = None
    model_only: bool = False
    after_save: dict[str, Any] | None = None

    def attach_records(self, output_dir: str | os.PathLike[str] | None) -> StartDecision:
        """Fill the records a resume from ``parent`` is attested against (see :mod:`.attest`)."""
        origin = self.parent
        if origin is None:
            return self
        facts = origin.record.get("resume")
        self.saved_facts = dict(facts) if isinstance(facts, dict) else None
        self.model_only = bool(origin.record.get("save_only_model"))
        if output_dir and origin.run:
            self.after_save = _lineage.after_save(output_dir, origin.path.name, origin.run)
        if self.after_save and isinstance(origin.record.get(ACCEPTED_INEXACT), dict):
            # The user accepted a resume without the saved RNG state (`trainguard restore --accept-inexact`): the
            # resume says so once, so the first step's random state is not compared (it cannot match).
            self.after_save = {**self.after_save, "rng": None}
        return self


def lineage_for(
    output_dir: str | os.PathLike[str] | None, origin: _lineage.CheckpointOrigin | None
) -> tuple[str, bool]:
    """The lineage a resume from ``origin`` continues, and whether it adopts checkpoints that record none: the
    checkpoint's own; for one that records none, the output_dir's current lineage when that adopts them; else new."""
    if origin is not None and origin.lineage is not None:
        return origin.lineage, bool(output_dir) and _lineage.adopts_unrecorded(output_dir or "", origin.lineage)
    scope = _lineage.current_scope(output_dir) if output_dir else _lineage.LineageScope(None)
    if scope.lineage is not None and scope.adopts_unrecorded:
        return scope.lineage, True
    return _lineage.new_id(), True


def decide_fresh_start(
    output_dir: str | os.PathLike[str] | None, existing: str = "refuse", own_lineages: Collection[str] = ()
) -> StartDecision:
    """A fresh start into ``output_dir``: a new lineage, or :class:`~trainguard.LineageError` when checkpoints are
    there and ``existing`` is ``"refuse"``; ``"archive"`` moves them into ``trainguard-archive/`` first, ``"keep"``
    leaves them (a warning names them).

    ``own_lineages``: the lineages the same Trainer object already trained in (its earlier ``train()`` calls: a
    notebook cell run again, ``model_init`` runs). Their checkpoints are not another run's: with ``"refuse"`` the new
    lineage starts beside them (an info note names them), exactly as the plain Trainer starts a second ``train()``
    from step 0; a save of the same step later moves the earlier folder into ``trainguard-archive/`` (never deleted),
    and rotation never touches them.

    Raises:
        LineageError: ``existing="refuse"`` and the output_dir holds ``checkpoint-N`` folders of another run.

    Example::

        from trainguard.checks.lineage import checkpoint_origin
        earlier = checkpoint_origin("out/checkpoint-60").lineage  # what this Trainer's earlier train() wrote
        decide_fresh_start("out", own_lineages={earlier}).notes  # not refused: an info note names them
    """
    decision = StartDecision(status="fresh")
    origins = [_lineage.checkpoint_origin(d) for d in checkpoint_dirs(output_dir)] if output_dir else []
    if not origins:
        return decision
    own = {lineage for lineage in own_lineages if lineage}
    others = [o for o in origins if o.lineage is None or o.lineage not in own]
    if existing == "refuse" and not others:
        decision.notes.append(
            (
                "info",
                f"fresh start: train() called again on the same Trainer; a new lineage starts beside the "
                f"{len(origins)} checkpoint(s) of its earlier train(): {_lineage.describe_many(origins)}. They are "
                "never resumed or rotated by this run; a save of the same step moves the earlier folder into "
                f"{ARCHIVE_DIR}/ (never deleted)",
            )
        )
        return decision
    if existing == "refuse":
        raise _lineage.fresh_start_error(output_dir or "", others)
    if existing == "archive":
        archive = archive_checkpoints(Path(output_dir or ""))
        decision.notes.append(("warning", f"fresh start: moved {len(origins)} earlier checkpoint(s) into {archive}"))
    else:
        decision.notes.append(
            (
                "warning",
                f"fresh start beside {len(origins)} checkpoint(s) of other runs, kept as they are and never resumed, "
                f"saved over or rotated by this run: {_lineage.describe_many(origins)}",
            )
        )
    return decision


def decide_resume(
    output_dir: str | os.PathLike[str] | None,
    resume_from_checkpoint: Any,
    *,
    verify: bool = True,
    set_aside: bool = True,
    workers: int | None = None,
    max_step: int | None = None,
) -> StartDecision:
    """A resume: ``True`` → the newest checkpoint of the current lineage that verifies (newer failures of it set
    aside when ``set_aside``); a path → that checkpoint, verified. Without ``verify``: resolved like the Trainer does,
    unchecked. ``path`` is None when there is no checkpoint at all (the Trainer then raises its own error), or, with
    ``max_step``, none at or below it verifies (several nodes then agree on a step together).

    Raises:
        CheckpointIntegrityError: The explicit path, or every checkpoint of the lineage, fails verification.
        LineageError: ``True``, and every checkpoint there belongs to another lineage.
    """
    if not verify:
        path = resolve_resume_checkpoint(output_dir, resume_from_checkpoint)
        origin = _lineage.checkpoint_origin(path) if path is not None and path.is_dir() else None
        lineage, adopts = lineage_for(output_dir, origin)
        return StartDecision(
            str(path) if path else None, lineage, adopts_unrecorded=adopts, parent=origin,
            status="not verified (verify_resume=False)",
        ).attach_records(output_dir)  # fmt: skip
    decision = StartDecision(status="not checked")

    def failed(report: CheckpointReport, moved: Path | None) -> None:
        where = f"set aside to {moved}" if moved is not None else "skipped (left in place)"
        if moved is not None:  # the way back, named where the user first meets the move
            where += f" (`trainguard restore {moved}` brings it back)"
        problems = "; ".join(p.format() for p in report.problems)
        decision.notes.append(("warning", f"{report.path.name} failed verification, {where}: {problems}"))
        decision.failed.append(report.path.name)

    choice = resume_choice(
        output_dir, resume_from_checkpoint, set_aside=set_aside, workers=workers, on_failure=failed, max_step=max_step
    )
    if choice is None or choice.path is None:
        return decision
    report = choice.report
    if report is not None and report.warnings:
        decision.notes.append(("warning", f"{choice.path.name}: " + "; ".join(w.format() for w in report.warnings)))
    if report is not None and report.mode == "structural":
        decision.status = "unverified (legacy): written without trainguard, structural checks only"
        decision.notes.append(("warning", f"resuming from {choice.path.name}, {decision.status}"))
    else:
        decision.status = "verified"
    accepted = choice.origin.record.get(ACCEPTED_INEXACT) if choice.origin is not None else None
    if isinstance(accepted, dict):
        missing = accepted.get("missing")
        lacks = ", ".join(str(m) for m in missing) if isinstance(missing, list) and missing else "its RNG state"
        decision.status += ", not bit-exact"
        decision.notes.append(
            (
                "warning",
                f"resuming from {choice.path.name}, not bit-exact: it lacks {lacks} (accepted with `trainguard "
                f"restore --accept-inexact` at {accepted.get('utc', 'an unrecorded time')}), so dropout and other "
                "random draws differ from the uninterrupted run",
            )
        )
    decision.path = str(choice.path)
    decision.lineage, decision.adopts_unrecorded = lineage_for(output_dir, choice.origin)
    decision.parent = choice.origin
    return decision.attach_records(output_dir)


def check_loaded(
    folder: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None, workers: int | None = None
) -> StartDecision | None:
    """For a checkpoint the Trainer already loaded (``train`` reached around trainguard's wrapper): verify it and
    say which lineage the run continues; None when the folder is not there.

    Raises:
        CheckpointIntegrityError: It fails verification.
    """
    path = Path(folder)
    if not path.is_dir():
        return None
    verify_checkpoint(path, workers=workers)
    origin = _lineage.checkpoint_origin(path)
    lineage, adopts = lineage_for(output_dir, origin)
    decision = StartDecision(str(path), lineage, adopts_unrecorded=adopts, parent=origin, status="verified")
    return decision.attach_records(output_dir)
