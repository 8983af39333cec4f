"""The disk plan of a Trainer run: what its checkpoints need before step 1, and what the next save needs before it
is written. Plain functions on plain values; :class:`~trainguard.PreflightGuard` gathers the inputs from the
Trainer (args, model, ``output_dir``) and acts on the answers (alert, refuse, cancel a save).

- :class:`RunSettings`: the ``TrainingArguments`` fields the plan depends on, as plain values;
- :func:`resume_folder` and :func:`checkpoint_global_step`: the checkpoint a resume loads, and its step;
- :func:`training_schedule`: max_steps, epochs and epochs done, as ``Trainer.set_initial_training_values`` will
  compute them;
- :func:`plan_run_disk` -> :class:`RunDiskPlan`: bytes per checkpoint, how many are on disk at the peak (with
  ``save_total_limit``), the final model, the total; :func:`run_disk_error`: the refusal when it does not fit;
- :func:`next_save_size`, :func:`check_save_space` and :func:`save_stopped_error`: the check before each save.

Nothing here imports torch or transformers.

Example::

    from trainguard.checks.preflight import check_disk_space, param_stats
    plan = plan_run_disk(RunSettings.from_args(args), param_stats(model), output_dir=args.output_dir)
    space = check_disk_space(args.output_dir, plan.required_bytes, purpose=plan.purpose, raise_error=False)
    if not space.ok: raise run_disk_error(plan, space, RunSettings.from_args(args))
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import PreflightError, TrainGuardError
from ...safe_fs import load_json
from .._resume import checkpoint_dirs
from .sizing import (
    CheckpointEstimate,
    ParamStats,
    describe_args,
    estimate_checkpoint_size,
    planned_checkpoints,
)
from .system import (
    DEFAULT_MARGIN,
    DEFAULT_MARGIN_BYTES,
    DiskSpace,
    check_disk_space,
    directory_size,
    disk_space_error,
    format_bytes,
)

__all__ = [
    "RunDiskPlan",
    "RunSettings",
    "check_save_space",
    "checkpoint_global_step",
    "next_save_size",
    "plan_run_disk",
    "resume_folder",
    "run_disk_error",
    "save_stopped_error",
    "training_schedule",
]

PathLike = str | os.PathLike[str]


def _plain(value: Any) -> str:
    return str(getattr(value, "value", value))  # an enum member (IntervalStrategy, OptimizerNames) -> its value


@dataclass(frozen=True)
class RunSettings:
    """The ``TrainingArguments`` fields the disk plan depends on, as plain values (``described``: the fields named
    in messages and evidence, as :func:`~.sizing.describe_args` reads them)."""

    save_strategy: str = "steps"
    save_steps: float = 500.0
    save_total_limit: int | None = None
    save_only_model: bool = False
    load_best_model_at_end: bool = False
    eval_strategy: str = "no"
    eval_steps: float = 0.0
    optim: str = "adamw_torch"
    max_steps: int = -1
    num_train_epochs: float = 1.0
    logging_steps: float = 500.0
    world_size: int = 1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    dataloader_drop_last: bool = False
    should_save: bool = True
    described: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: Any) -> RunSettings:
        """Read the settings from ``TrainingArguments`` (or any object with those attributes; missing ones take the
        Trainer's defaults)."""
        return cls(
            save_strategy=_plain(args.save_strategy),
            save_steps=float(getattr(args, "save_steps", 500) or 0),
            save_total_limit=getattr(args, "save_total_limit", None),
            save_only_model=bool(getattr(args, "save_only_model", False)),
            load_best_model_at_end=bool(getattr(args, "load_best_model_at_end", False)),
            eval_strategy=_plain(getattr(args, "eval_strategy", "no")),
            eval_steps=float(getattr(args, "eval_steps", 0) or 0),
            optim=_plain(getattr(args, "optim", "adamw_torch")),
            max_steps=int(getattr(args, "max_steps", -1) or -1),
            num_train_epochs=float(getattr(args, "num_train_epochs", 1) or 1),
            logging_steps=float(getattr(args, "logging_steps", 500) or 500),
            world_size=max(1, int(getattr(args, "world_size", 1) or 1)),
            per_device_train_batch_size=max(1, int(getattr(args, "per_device_train_batch_size", 1) or 1)),
            gradient_accumulation_steps=max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1)),
            dataloader_drop_last=bool(getattr(args, "dataloader_drop_last", False)),
            should_save=bool(getattr(args, "should_save", True)),
            described=describe_args(args),
        )


# ------------------------------------------------------------------------------------------- before step 1
def resume_folder(resume: Any, output_dir: PathLike) -> Path | None:
    """The checkpoint folder ``trainer.train(resume_from_checkpoint=resume)`` loads, or None (no resume, no
    checkpoint yet, or a path that is not a folder)."""
    if resume is None or resume is False:
        return None
    if resume is True:
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(os.fspath(resume))
    return path if path.is_dir() else None


def checkpoint_global_step(checkpoint: Path | None) -> int:
    """The ``global_step`` of a checkpoint's ``trainer_state.json``; 0 without a checkpoint or when unreadable."""
    if checkpoint is None:
        return 0
    try:
        state = load_json(checkpoint / "trainer_state.json")
        return max(0, int(state.get("global_step", 0)))
    except (OSError, ValueError, TypeError, AttributeError, OverflowError, TrainGuardError):
        # Unreadable state: CheckpointVerifier reports it; here start from 0, which over-estimates (the safe side).
        return 0


def training_schedule(settings: RunSettings, train_rows: int | None, start_step: int) -> tuple[int, int, int]:
    """``(max_steps, num_epochs, epochs_done)`` as ``Trainer.set_initial_training_values`` will compute them.

    ``train_rows``: rows of the train dataset (None or 0 when it has no length: ``max_steps`` then bounds the run).
    """
    per_device = settings.per_device_train_batch_size
    steps_per_epoch = None
    if train_rows:
        per_rank = math.ceil(train_rows / settings.world_size)
        batches = per_rank // per_device if settings.dataloader_drop_last else math.ceil(per_rank / per_device)
        steps_per_epoch = max(1, math.ceil(batches / settings.gradient_accumulation_steps))
    max_steps = settings.max_steps
    if max_steps <= 0:
        epochs_f = settings.num_train_epochs
        max_steps = math.ceil(epochs_f * steps_per_epoch) if steps_per_epoch else 0
        num_epochs = math.ceil(epochs_f)
    else:
        num_epochs = math.ceil(max_steps / steps_per_epoch) if steps_per_epoch else max_steps
    epochs_done = start_step // steps_per_epoch if steps_per_epoch else 0
    return max_steps, num_epochs, epochs_done


@dataclass(frozen=True)
class RunDiskPlan:
    """What a run's checkpoints need on disk at the peak.

    Attributes:
        estimate: The estimated size of one checkpoint, by part.
        per_checkpoint_bytes: The size counted per checkpoint: the estimate, or a resumed checkpoint's size on disk.
        checkpoints: New checkpoints on disk at the peak (:func:`~.sizing.planned_checkpoints`).
        final_model_bytes: The final ``trainer.save_model()`` (0 when not counted).
        start_step / max_steps: Where the run starts and ends.
        measured_on: The checkpoint folder ``per_checkpoint_bytes`` was measured on (None: the estimate).
    """

    estimate: CheckpointEstimate
    per_checkpoint_bytes: int
    checkpoints: int
    final_model_bytes: int
    start_step: int
    max_steps: int
    measured_on: str | None = None

    @property
    def required_bytes(self) -> int:
        return self.checkpoints * self.per_checkpoint_bytes + self.final_model_bytes

    @property
    def purpose(self) -> str:
        """What the space is for, in words ("3 checkpoint(s) of ~1.2 GiB each (...) plus the final model (...)")."""
        est = self.estimate
        parts = (
            f"weights {format_bytes(est.weights_bytes)}, optimizer state {format_bytes(est.optimizer_bytes)}"
            f", other files {format_bytes(est.other_bytes)}"
        )
        measured = f"measured on {self.measured_on}" if self.measured_on is not None else parts
        final = self.final_model_bytes
        return f"{self.checkpoints} checkpoint(s) of ~{format_bytes(self.per_checkpoint_bytes)} each ({measured})" + (
            f" plus the final model ({format_bytes(final)})" if final else ""
        )


def plan_run_disk(
    settings: RunSettings,
    stats: ParamStats,
    *,
    output_dir: PathLike,
    resumed_from: Path | None = None,
    start_step: int = 0,
    train_rows: int | None = None,
    schedule: tuple[int, int] | None = None,
    tokenizer_bytes: int = 0,
    include_final_model: bool = True,
) -> RunDiskPlan:
    """The :class:`RunDiskPlan` of a run about to start (or resume) in ``output_dir``.

    Args:
        settings: The run's :class:`RunSettings`.
        stats: The model's :func:`~.sizing.param_stats`.
        output_dir: Where the checkpoints go (those already there count against ``save_total_limit``'s peak).
        resumed_from: The checkpoint the run resumes from: its size on disk replaces the estimate.
        start_step: The step the run starts from.
        train_rows: Rows of the train dataset, for the step count (None: no length).
        schedule: ``(max_steps, num_epochs)`` when already known (the Trainer's state), instead of computed.
        tokenizer_bytes: Size of the tokenizer files saved with each checkpoint and the final model.
        include_final_model: Count one weights-only copy for the final ``trainer.save_model()``.

    Example::

        from trainguard.checks.preflight import param_stats
        plan = plan_run_disk(RunSettings(save_total_limit=2, max_steps=1000), param_stats(model), output_dir="out")
    """
    max_steps, num_epochs, epochs_done = training_schedule(settings, train_rows, start_step)
    if schedule is not None:
        max_steps, num_epochs = schedule
    logging_steps = settings.logging_steps
    log_every = math.ceil(max_steps * logging_steps) if logging_steps < 1 else int(logging_steps)
    estimate = estimate_checkpoint_size(
        stats,
        optim=settings.optim,
        save_only_model=settings.save_only_model,
        tokenizer_bytes=tokenizer_bytes,
        log_entries=max_steps // max(1, log_every) + 2,
    )
    per_checkpoint = estimate.total_bytes
    if resumed_from is not None:  # a real checkpoint of this run beats the estimate
        per_checkpoint = max(directory_size(resumed_from), 1)
    checkpoints = planned_checkpoints(
        save_strategy=settings.save_strategy,
        save_steps=settings.save_steps,
        max_steps=max_steps,
        num_epochs=num_epochs,
        save_total_limit=settings.save_total_limit,
        load_best_model_at_end=settings.load_best_model_at_end,
        start_step=start_step,
        epochs_done=epochs_done,
        existing_checkpoints=len(checkpoint_dirs(output_dir)),
        eval_strategy=settings.eval_strategy,
        eval_steps=settings.eval_steps,
    )
    return RunDiskPlan(
        estimate=estimate,
        per_checkpoint_bytes=per_checkpoint,
        checkpoints=checkpoints,
        final_model_bytes=estimate.weights_bytes + tokenizer_bytes if include_final_model else 0,
        start_step=start_step,
        max_steps=max_steps,
        measured_on=resumed_from.name if resumed_from is not None else None,
    )


def run_disk_error(plan: RunDiskPlan, space: DiskSpace, settings: RunSettings, *, rank: int = 0) -> PreflightError:
    """The refusal before the first step when ``space`` (measured for ``plan.required_bytes``) is short."""
    err = disk_space_error(space, plan.purpose)
    return PreflightError(
        f"the run's checkpoints will not fit on disk; refused before step {plan.start_step + 1}: {err.what}",
        where={**err.where, "field": "save_total_limit", "step": plan.start_step, "rank": rank},
        next_step=(
            f"Free at least {format_bytes(space.needed_bytes - space.free_bytes)} on {space.checked_path}, "
            f"point output_dir at a larger disk, or keep fewer checkpoints (save_total_limit="
            f"{settings.save_total_limit} now; save_only_model=True drops the optimizer state). To accept the risk: "
            "PreflightGuard(check_disk=False)."
        ),
        evidence={
            **err.evidence,
            "checkpoints": plan.checkpoints,
            "per_checkpoint_bytes": plan.per_checkpoint_bytes,
            "estimate": plan.estimate.to_dict(),
            "final_model_bytes": plan.final_model_bytes,
            "start_step": plan.start_step,
            "max_steps": plan.max_steps,
            "args": dict(settings.described),
        },
    )


# ----------------------------------------------------------------------------------------- before each save
def next_save_size(
    output_dir: PathLike, last_checkpoint: Path | None, estimate: Callable[[], CheckpointEstimate | None]
) -> tuple[int, str]:
    """Bytes the next checkpoint will need, and on what basis: the size on disk of the last checkpoint (or the
    newest in ``output_dir``), else ``estimate()`` (0 when it gives None)."""
    last = last_checkpoint
    if last is None:
        found = checkpoint_dirs(Path(output_dir))
        last = found[-1] if found else None
    if last is not None and last.is_dir():
        size = directory_size(last)
        if size > 0:
            return size, f"the size of {last.name}"
    estimated = estimate()
    return (estimated.total_bytes if estimated is not None else 0), "the estimated checkpoint size"


def check_save_space(
    output_dir: PathLike,
    size: int,
    basis: str,
    *,
    margin: float = DEFAULT_MARGIN,
    margin_bytes: int = DEFAULT_MARGIN_BYTES,
) -> tuple[bool, dict[str, Any]]:
    """``(short, detail)``: whether a save of ``size`` bytes (plus the margin) will not fit, and the measurement
    (with ``basis``); a filesystem that cannot be measured counts as short, its error in ``detail``."""
    try:
        disk = check_disk_space(output_dir, size, margin=margin, margin_bytes=margin_bytes, raise_error=False)
    except OSError as exc:
        return True, {"error": f"{type(exc).__name__}: {exc}", "basis": basis}
    return not disk.ok, {**disk.to_dict(), "basis": basis}


def save_stopped_error(output_dir: PathLike, step: int, detail: Mapping[str, Any], *, rank: int = 0) -> PreflightError:
    """The error of a run stopped at ``step`` instead of writing a checkpoint that would not fit (``detail``: this
    rank's :func:`check_save_space` detail; empty when another rank was short)."""
    found = checkpoint_dirs(Path(output_dir))
    newest = found[-1].name if found else "none"
    if detail.get("needed_bytes") is not None:
        what = (
            f"checkpoint-{step} was not written: it needs ~{format_bytes(detail['needed_bytes'])} "
            f"({detail['basis']} + margin) and only {format_bytes(detail['free_bytes'])} is free on "
            f"{detail['checked_path']}; training stopped cleanly at step {step}. "
            f"Newest complete checkpoint: {newest}"
        )
    elif detail:
        what = f"checkpoint-{step} was not written: free space could not be measured ({detail.get('error')})"
    else:
        what = (
            f"checkpoint-{step} was not written: another rank's disk cannot hold it; training stopped cleanly "
            f"at step {step}. Newest complete checkpoint: {newest}"
        )
    return PreflightError(
        what,
        where={"folder": str(output_dir), "step": step, "rank": rank},
        next_step=(
            f"Free space on that disk (or move older checkpoints away), then resume with "
            f"trainer.train(resume_from_checkpoint=True) from {newest}; steps after it are redone."
        ),
        evidence={**detail, "newest_checkpoint": newest},
    )
