"""Choosing the checkpoint a resume loads: the newest of the current run lineage that verifies, setting failures
aside (renamed, never deleted).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...alerts import get_logger
from ...errors import CheckpointIntegrityError, LineageError
from .. import lineage as _lineage
from .._layout import QUARANTINE_DIR, checkpoint_step
from .._resume import checkpoint_dirs
from .report import CheckpointReport, Problem
from .verify import check_checkpoint, verify_checkpoint

__all__ = [
    "ResumeChoice",
    "choose_checkpoint",
    "latest_verified_checkpoint",
    "resolve_verified_resume",
    "resume_choice",
    "scan_output_dir",
    "set_aside_checkpoint",
]


# ---------------------------------------------------------------------------------------------- run level
def set_aside_checkpoint(checkpoint: str | os.PathLike[str], reason: str, *, problems: Iterable[Problem] = ()) -> Path:
    """Move a failed checkpoint to ``output_dir/trainguard-quarantine/<name>.<UTC time>`` (never delete it).

    The rename stays on the same filesystem (atomic), and the new name is outside the Trainer's ``checkpoint-*``
    glob, so neither ``get_last_checkpoint`` nor rotation ever sees it again. The reason is written beside it as
    ``<new name>.reason.json``. The move is logged at INFO: the caller says it to the user, once (the returned path).

    Returns:
        The folder's new path.

    Example::

        set_aside_checkpoint("out/checkpoint-60", "model.safetensors changed")
    """
    folder = Path(checkpoint)
    target = _lineage.move_aside(folder, reason, into=QUARANTINE_DIR, problems=list(problems))
    get_logger().info("trainguard: set aside %s -> %s (%s)", folder, target, reason)
    return target


def scan_output_dir(
    output_dir: str | os.PathLike[str],
    *,
    workers: int | None = None,
    stop_early: bool = False,
    allow_links_out: bool = False,
) -> list[CheckpointReport]:
    """A report for every ``checkpoint-N`` in ``output_dir``, oldest first (legacy ones get structural checks)."""
    return [
        check_checkpoint(d, workers=workers, stop_early=stop_early, allow_links_out=allow_links_out)
        for d in checkpoint_dirs(output_dir)
    ]


@dataclass
class ResumeChoice:
    """What :func:`choose_checkpoint` found: the chosen folder (or None), who wrote it, its report, the lineage
    scope it was chosen in, the checkpoints that failed (with where each was set aside), and the checkpoints of
    other lineages that were not considered."""

    path: Path | None
    scope: _lineage.LineageScope
    origin: _lineage.CheckpointOrigin | None = None
    report: CheckpointReport | None = None
    failures: list[tuple[CheckpointReport, Path | None]] = field(default_factory=list)
    excluded: list[_lineage.CheckpointOrigin] = field(default_factory=list)
    considered: int = 0


def _scope_for(output_dir: str | os.PathLike[str], lineage: str | None, origins: list[Any]) -> _lineage.LineageScope:
    if lineage == "current":
        return _lineage.current_scope(output_dir, origins)
    if lineage is None:
        return _lineage.LineageScope(None, True, "none")
    return _lineage.LineageScope(str(lineage), False, "given")


def choose_checkpoint(
    output_dir: str | os.PathLike[str],
    *,
    lineage: str | None = "current",
    set_aside: bool = False,
    workers: int | None = None,
    on_failure: Callable[[CheckpointReport, Path | None], None] | None = None,
    max_step: int | None = None,
    allow_links_out: bool = False,
) -> ResumeChoice:
    """The newest checkpoint of ``output_dir`` in the lineage scope that verifies, with everything learnt on the way.

    See :func:`latest_verified_checkpoint` for the arguments. Checkpoints outside the scope are never checked, set
    aside or chosen; they are listed in ``excluded``. ``max_step``: only checkpoints at or below that step are
    considered (the others are left alone: another node could not resume from them). ``allow_links_out``: see
    :func:`~trainguard.checks.checkpoint.check_checkpoint`.
    """
    origins = [_lineage.checkpoint_origin(d) for d in checkpoint_dirs(output_dir)]
    scope = _scope_for(output_dir, lineage, origins)
    eligible = [o for o in origins if scope.admits(o)]
    if max_step is not None:
        eligible = [o for o in eligible if (checkpoint_step(o.path) or 0) <= max_step]
    choice = ResumeChoice(None, scope, excluded=[o for o in origins if not scope.admits(o)], considered=len(eligible))
    if choice.excluded:
        get_logger().info(
            "trainguard: not considered in %s (not %s): %s",
            output_dir,
            scope.describe(),
            _lineage.describe_many(choice.excluded),
        )
    for origin in reversed(eligible):
        report = check_checkpoint(origin.path, workers=workers, stop_early=True, allow_links_out=allow_links_out)
        if report.ok:
            if report.mode == "structural":
                get_logger().info(
                    "trainguard: %s is a legacy checkpoint (written without trainguard): structural checks only",
                    origin.path,
                )
            choice.path, choice.origin, choice.report = origin.path, origin, report
            return choice
        reason = "; ".join(p.format() for p in report.problems)
        if report.mode == "structural":
            reason = f"legacy checkpoint (no manifest), structural checks only: {reason}"
        moved: Path | None = None
        if set_aside:
            moved = set_aside_checkpoint(origin.path, reason, problems=report.problems)
        # Said once: by on_failure when the caller reports failures itself (CheckpointVerifier alerts each one),
        # else here.
        if on_failure is None:
            if moved is not None:
                get_logger().warning("trainguard: set aside %s -> %s (%s)", origin.path, moved, reason)
            else:
                get_logger().warning("trainguard: skipping %s: %s", origin.path, reason)
        choice.failures.append((report, moved))
        if on_failure is not None:
            on_failure(report, moved)
    return choice


def latest_verified_checkpoint(
    output_dir: str | os.PathLike[str],
    *,
    set_aside: bool = False,
    workers: int | None = None,
    on_failure: Callable[[CheckpointReport, Path | None], None] | None = None,
    lineage: str | None = "current",
    allow_links_out: bool = False,
) -> Path | None:
    """The newest ``checkpoint-N`` of the output_dir's current run lineage that verifies, or None.

    Checks from the newest down and stops at the first that passes, so a healthy run costs one verification. A
    legacy checkpoint (written without trainguard) "verifies" when it passes the structural checks, and the log says
    so. Checkpoints of another lineage (another run that saved into the same folder) are never chosen.

    Args:
        output_dir: The run's output folder.
        set_aside: Move each newer checkpoint of the lineage that fails to ``trainguard-quarantine/`` (renamed, never
            deleted), so the Trainer can neither resume from it nor save into it again.
        workers: Threads hashing files in parallel.
        on_failure: Called with each failed report and its new path (when set aside), e.g. to alert.
        lineage: ``"current"`` (default): the lineage the registry names current (else the newest checkpoint's);
            a lineage id: that lineage only; None: any checkpoint, as ``get_last_checkpoint`` does.
        allow_links_out: Accept symbolic links leading outside a checkpoint folder (off: such a checkpoint fails).

    Raises:
        UnsafeFileError: With ``set_aside``, ``trainguard-quarantine`` in ``output_dir`` is a link or a file (nothing
            is moved).

    Example::

        ckpt = latest_verified_checkpoint("out")
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    """
    return choose_checkpoint(
        output_dir,
        lineage=lineage,
        set_aside=set_aside,
        workers=workers,
        on_failure=on_failure,
        allow_links_out=allow_links_out,
    ).path


def resume_choice(
    output_dir: str | os.PathLike[str] | None,
    resume_from_checkpoint: Any = True,
    *,
    set_aside: bool = True,
    workers: int | None = None,
    on_failure: Callable[[CheckpointReport, Path | None], None] | None = None,
    max_step: int | None = None,
    allow_links_out: bool = False,
) -> ResumeChoice | None:
    """:func:`resolve_verified_resume` with the details (who wrote the choice, what failed, what was excluded).

    Returns None for ``None``/``False``, or ``True`` with no checkpoint at all (at or below ``max_step``, when set:
    then a choice without a path when none of them verifies, instead of an error, so that several nodes can look
    further down together).
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is not True:
        path = Path(os.fspath(resume_from_checkpoint))
        report = verify_checkpoint(path, workers=workers, allow_links_out=allow_links_out)
        origin = _lineage.checkpoint_origin(path)
        return ResumeChoice(path, _lineage.LineageScope(origin.lineage, True, "given"), origin, report, considered=1)
    if output_dir is None or not checkpoint_dirs(output_dir):
        return None
    choice = choose_checkpoint(
        output_dir,
        set_aside=set_aside,
        workers=workers,
        on_failure=on_failure,
        max_step=max_step,
        allow_links_out=allow_links_out,
    )
    if choice.path is not None or (max_step is not None and not choice.excluded):
        return choice
    others = _lineage.describe_many(choice.excluded)
    if not choice.failures:
        raise LineageError(
            f"resume_from_checkpoint=True in {output_dir}: no checkpoint there belongs to the current run lineage "
            f"({choice.scope.describe()}); the ones there are another run's: {others}",
            where={"folder": str(output_dir), "checkpoint": str(choice.excluded[-1].path)},
            next_step=(
                "To continue one of them, pass its path: train(resume_from_checkpoint='.../checkpoint-N') (its run "
                "lineage then becomes current). To start over, train without resume_from_checkpoint "
                "(see CheckpointVerifier's existing_checkpoints option)."
            ),
            evidence={"scope": choice.scope.describe(), "checkpoints": [o.to_dict() for o in choice.excluded]},
        )
    listing = "; ".join(r.describe() + (f" (set aside to {m})" if m is not None else "") for r, m in choice.failures)
    others_note = f" Other runs' checkpoints were not considered: {others}." if others else ""
    raise CheckpointIntegrityError(
        f"none of the {len(choice.failures)} checkpoint(s) of the current run lineage in {output_dir} verifies: "
        f"{listing}",
        where={"folder": str(output_dir)},
        next_step=(
            "Start fresh (train() without resume_from_checkpoint), or restore a checkpoint from a backup; "
            f"the failed ones are kept{' in ' + QUARANTINE_DIR + '/' if set_aside else ''}"
            f"{_RESTORE_HINT if set_aside else ''}.{others_note}"
        ),
        evidence={"checkpoints": [r.to_dict() for r, _ in choice.failures]},
    )


_RESTORE_HINT = (
    " (`trainguard restore PATH` brings one back: at once when it verifies again, with --accept-inexact when it "
    "lacks only its RNG state, with --force as it is; a checkpoint modified on purpose is then vouched for with "
    "`trainguard manifest PATH --force`)"
)


def resolve_verified_resume(
    output_dir: str | os.PathLike[str] | None,
    resume_from_checkpoint: Any = True,
    *,
    set_aside: bool = True,
    workers: int | None = None,
    on_failure: Callable[[CheckpointReport, Path | None], None] | None = None,
    allow_links_out: bool = False,
) -> Path | None:
    """The checkpoint to pass to ``trainer.train(resume_from_checkpoint=...)``, verified; a pre-flight.

    ``True`` resolves to :func:`latest_verified_checkpoint` in the output_dir's current run lineage (newer
    checkpoints of it that fail are set aside when ``set_aside``); an explicit path is verified and refused when it
    fails; ``None``/``False`` give None.

    Returns:
        The verified folder, or None when there is nothing to resume from (``True`` and no checkpoint at all).

    Raises:
        CheckpointIntegrityError: The explicit path fails verification, or ``True`` and no checkpoint of the current
            lineage verifies.
        LineageError: ``True``, and every checkpoint there belongs to another run lineage.

    Example::

        ckpt = resolve_verified_resume("out", True)
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    """
    choice = resume_choice(
        output_dir,
        resume_from_checkpoint,
        set_aside=set_aside,
        workers=workers,
        on_failure=on_failure,
        allow_links_out=allow_links_out,
    )
    return choice.path if choice is not None else None
