"""PreflightGuard: refuse a run whose checkpoints cannot fit, and never start a save that cannot finish.

Acts in two places:

- Before the first step (``before_train``, inside ``trainer.train()`` before a resumed checkpoint loads): estimates
  what the run's checkpoints will need on ``output_dir``'s filesystem and checks available RAM; refuses with
  :class:`~trainguard.errors.PreflightError` naming needed and free.
- Before each save (``on_step_end`` / ``on_epoch_end`` when ``control.should_save`` is set, i.e. before the Trainer
  writes anything): compares free space with the last checkpoint's size on disk. When it will not fit, the save is
  cancelled, training stops at that step on every rank, a critical alert goes out, and ``trainer.train()`` raises
  ``PreflightError`` once the Trainer has finished cleanly.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import distributed
from ..alerts import AlertSink, get_logger
from ..checks._resume import checkpoint_dirs
from ..checks.resources import (
    DEFAULT_MARGIN,
    DEFAULT_MARGIN_BYTES,
    DEFAULT_MIN_AVAILABLE_MEMORY,
    CheckpointEstimate,
    check_disk_space,
    check_memory,
    describe_args,
    directory_size,
    estimate_checkpoint_size,
    format_bytes,
    param_stats,
    planned_checkpoints,
    tokenizer_size,
)
from ..errors import PreflightError, TrainGuardError
from ._base import GuardCallback

__all__ = ["PreflightGuard"]



def _resolve_resume(resume: Any, output_dir: Path) -> Path | None:
    if resume is None or resume is False:
        return None
    if resume is True:
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(os.fspath(resume))
    return path if path.is_dir() else None


def _global_step(checkpoint: Path | None) -> int:
    if checkpoint is None:
        return 0
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        return max(0, int(state.get("global_step", 0)))
    except (OSError, ValueError, TypeError, AttributeError):
        # Unreadable state: CheckpointVerifier reports it; here start from 0, which over-estimates (the safe side).
        return 0


class PreflightGuard(GuardCallback):
    """Refuse a run whose checkpoints will not fit on disk (or that starts short of RAM) before its first step,
    and stop cleanly instead of writing a checkpoint that cannot fit.

    The estimate: one checkpoint = the weights as saved (all parameters of a full model; only the adapter of a PEFT
    model) + optimizer state (AdamW: two states the size of the trainable parameters; see
    :func:`~trainguard.checks.resources.optimizer_state_bytes`; none with ``save_only_model``) + scheduler, RNG,
    trainer state and tokenizer files; times the checkpoints on disk at the peak (``save_total_limit + 1``, or every
    save without a limit); plus the final ``trainer.save_model()``; plus the margin.

    Args:
        check_disk: Refuse before step 1 when the run's checkpoints will not fit (default True).
        check_before_save: Before each save, check free space against the last checkpoint's size (default True).
        disk_margin: Extra room as a fraction of the estimate (default 0.10: the estimate misses small files such
            as the README, logs and the events file).
        disk_margin_bytes: The least extra room in bytes (default 64 MiB: a disk filled to the last byte also
            breaks logging, alerts and other processes). The margin is the larger of the two.
        include_final_model: Count one more weights-only copy for the ``trainer.save_model()`` most scripts call
            at the end (default True).
        min_available_memory: The least share of total RAM that must be available before step 1 (default 0.15,
            the origin's "RAM < 85 % used"); None skips the RAM check.
        raise_after_stop: After a stop for lack of space, raise ``PreflightError`` from ``trainer.train()`` once the
            Trainer has ended cleanly (default True), so the script does not go on as if training had finished.
            False: only the critical alert, and ``trainer.train()`` returns.
        alert_sinks: Replace the default alert sinks.
        webhook_url: Also POST warnings and worse to this URL.

    Raises:
        PreflightError: From ``trainer.train()``: before step 1 when the run will not fit or RAM is short; after the
            run when it was stopped because a checkpoint would not have fit.

    Example::

        guard = PreflightGuard(disk_margin_bytes=1 << 30)
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[guard])
    """

    guard_name = "preflight_guard"

    def __init__(
        self,
        *,
        check_disk: bool = True,
        check_before_save: bool = True,
        disk_margin: float = DEFAULT_MARGIN,
        disk_margin_bytes: int = DEFAULT_MARGIN_BYTES,
        include_final_model: bool = True,
        min_available_memory: float | None = DEFAULT_MIN_AVAILABLE_MEMORY,
        raise_after_stop: bool = True,
        alert_sinks: Sequence[AlertSink] | None = None,
        webhook_url: str | None = None,
    ) -> None:
        super().__init__(alert_sinks=alert_sinks, webhook_url=webhook_url)
        if disk_margin < 0 or disk_margin_bytes < 0:
            raise ValueError("disk_margin and disk_margin_bytes must not be negative")
        if min_available_memory is not None and not 0.0 <= min_available_memory <= 1.0:
            raise ValueError(f"min_available_memory must be within [0, 1] or None, got {min_available_memory!r}")
        self.check_disk = check_disk
        self.check_before_save = check_before_save
        self.disk_margin = float(disk_margin)
        self.disk_margin_bytes = int(disk_margin_bytes)
        self.include_final_model = include_final_model
        self.min_available_memory = min_available_memory
        self.raise_after_stop = raise_after_stop
        self.estimate: CheckpointEstimate | None = None
        self.planned: int | None = None
        self.required_bytes: int | None = None
        self.free_bytes: int | None = None
        self.saves_checked = 0
        self.stopped: PreflightError | None = None
        self._preflight_done = False
        self._last_checkpoint: Path | None = None

    # ------------------------------------------------------------------------------------------------ wiring
    def after_train(self, trainer: Any, output: Any) -> None:
        # The raise comes after the Trainer has finished (on_train_end of every callback ran, files closed);
        # raising from a callback event would skip the callbacks after this one.
        if self.stopped is not None and self.raise_after_stop:
            raise self.stopped

    # --------------------------------------------------------------------------------------- before step 1
    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> Any:
        self.stopped = None
        self._preflight_done = True
        self._preflight(trainer, resume_from_checkpoint)
        return resume_from_checkpoint

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if not self._preflight_done:  # the Trainer could not be found at init: check here, still before step 1
            self._preflight_done = True
            self.stopped = None
            self._preflight(self.trainer, None, args=args, state=state, model=kwargs.get("model"))
        return control

    def _plan(self, trainer: Any, args: Any, start_step: int) -> tuple[int, int, int]:
        """(max_steps, num_epochs, epochs_done) as Trainer.set_initial_training_values will compute them."""
        world = max(1, int(getattr(args, "world_size", 1) or 1))
        per_device = max(1, int(getattr(args, "per_device_train_batch_size", 1) or 1))
        accumulation = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
        dataset = getattr(trainer, "train_dataset", None) if trainer is not None else None
        try:
            n_rows = len(dataset) if dataset is not None else None
        except TypeError:
            n_rows = None  # an iterable dataset: max_steps is then required by the Trainer
        steps_per_epoch = None
        if n_rows:
            per_rank = math.ceil(n_rows / world)
            batches = (
                per_rank // per_device
                if getattr(args, "dataloader_drop_last", False)
                else math.ceil(per_rank / per_device)
            )
            steps_per_epoch = max(1, math.ceil(batches / accumulation))
        max_steps = int(getattr(args, "max_steps", -1) or -1)
        if max_steps <= 0:
            epochs_f = float(getattr(args, "num_train_epochs", 1) or 1)
            max_steps = math.ceil(epochs_f * steps_per_epoch) if steps_per_epoch else 0
            num_epochs = math.ceil(epochs_f)
        else:
            num_epochs = math.ceil(max_steps / steps_per_epoch) if steps_per_epoch else max_steps
        epochs_done = start_step // steps_per_epoch if steps_per_epoch else 0
        return max_steps, num_epochs, epochs_done

    def _preflight(self, trainer: Any, resume: Any, *, args: Any = None, state: Any = None, model: Any = None) -> None:
        args = args if args is not None else getattr(trainer, "args", None)
        model = model if model is not None else getattr(trainer, "model", None)
        if args is None or model is None:
            return
        output_dir = Path(args.output_dir)
        problem: TrainGuardError | None = None
        try:
            if self.check_disk:
                problem = self._check_run_disk(trainer, args, state, model, output_dir, resume)
            if problem is None and self.min_available_memory is not None:
                status = check_memory(self.min_available_memory, raise_error=False)
                if not status.ok:
                    try:
                        check_memory(self.min_available_memory)
                    except PreflightError as err:
                        problem = err
                self._log_memory(status.to_dict())
        except TrainGuardError as err:  # never raise before the collective: the other ranks would wait forever
            problem = err
        except OSError as exc:  # an unreadable output_dir must not look like a pass
            problem = PreflightError(
                f"could not measure free space for the run: {exc}",
                where={"file": str(output_dir), "rank": distributed.rank()},
            )
        # Collective: every rank calls it here, so a refusal on any rank is a refusal on all.
        if distributed.any_rank(problem is not None):
            if problem is None:
                problem = PreflightError(
                    "another rank's pre-flight check failed (see that rank's log); every rank refuses together",
                    where={"rank": distributed.rank()},
                )
            self.alert("critical", problem.what, step=0, evidence=problem.evidence)
            raise problem

    def _check_run_disk(
        self, trainer: Any, args: Any, state: Any, model: Any, output_dir: Path, resume: Any
    ) -> PreflightError | None:
        checkpoint = _resolve_resume(resume, output_dir)
        start_step = _global_step(checkpoint) if state is None else int(state.global_step)
        max_steps, num_epochs, epochs_done = self._plan(trainer, args, start_step)
        if state is not None and getattr(state, "max_steps", None):
            max_steps, num_epochs = int(state.max_steps), int(state.num_train_epochs)
        stats = param_stats(model)
        processing = getattr(trainer, "processing_class", None) if trainer is not None else None
        tok_bytes = tokenizer_size(processing)
        logging_steps = float(getattr(args, "logging_steps", 500) or 500)
        log_every = math.ceil(max_steps * logging_steps) if logging_steps < 1 else int(logging_steps)
        estimate = estimate_checkpoint_size(
            stats,
            optim=getattr(args, "optim", "adamw_torch"),
            save_only_model=bool(getattr(args, "save_only_model", False)),
            tokenizer_bytes=tok_bytes,
            log_entries=max_steps // max(1, log_every) + 2,
        )
        per_checkpoint = estimate.total_bytes
        if checkpoint is not None:  # a real checkpoint of this run beats the estimate
            per_checkpoint = max(directory_size(checkpoint), 1)
        self.estimate = estimate
        existing = checkpoint_dirs(output_dir)
        planned = planned_checkpoints(
            save_strategy=args.save_strategy,
            save_steps=float(getattr(args, "save_steps", 500) or 0),
            max_steps=max_steps,
            num_epochs=num_epochs,
            save_total_limit=getattr(args, "save_total_limit", None),
            load_best_model_at_end=bool(getattr(args, "load_best_model_at_end", False)),
            start_step=start_step,
            epochs_done=epochs_done,
            existing_checkpoints=len(existing),
            eval_strategy=getattr(args, "eval_strategy", "no"),
            eval_steps=float(getattr(args, "eval_steps", 0) or 0),
        )
        final = estimate.weights_bytes + tok_bytes if self.include_final_model else 0
        required = planned * per_checkpoint + final
        self.planned = planned
        self.required_bytes = required
        if not bool(getattr(args, "should_save", True)):
            return None  # this rank writes no checkpoint files beyond its RNG state
        parts = (
            f"weights {format_bytes(estimate.weights_bytes)}, optimizer state {format_bytes(estimate.optimizer_bytes)}"
            f", other files {format_bytes(estimate.other_bytes)}"
        )
        measured = f"measured on {checkpoint.name}" if checkpoint is not None else parts
        purpose = f"{planned} checkpoint(s) of ~{format_bytes(per_checkpoint)} each ({measured})" + (
            f" plus the final model ({format_bytes(final)})" if final else ""
        )
        disk = check_disk_space(
            output_dir,
            required,
            margin=self.disk_margin,
            margin_bytes=self.disk_margin_bytes,
            purpose=purpose,
            raise_error=False,
        )
        self.free_bytes = disk.free_bytes
        get_logger().info(
            "[preflight_guard] disk: %s needed for %s, %s free on %s",
            format_bytes(disk.needed_bytes),
            purpose,
            format_bytes(disk.free_bytes),
            disk.checked_path,
        )
        if disk.ok:
            return None
        try:
            check_disk_space(
                output_dir, required, margin=self.disk_margin, margin_bytes=self.disk_margin_bytes, purpose=purpose
            )
        except PreflightError as err:
            limit = getattr(args, "save_total_limit", None)
            return PreflightError(
                f"the run's checkpoints will not fit on disk; refused before step {start_step + 1}: {err.what}",
                where={**err.where, "field": "save_total_limit", "step": start_step, "rank": distributed.rank()},
                next_step=(
                    f"Free at least {format_bytes(disk.needed_bytes - disk.free_bytes)} on {disk.checked_path}, "
                    f"point output_dir at a larger disk, or keep fewer checkpoints (save_total_limit={limit} now; "
                    "save_only_model=True drops the optimizer state). To accept the risk: "
                    "PreflightGuard(check_disk=False)."
                ),
                evidence={
                    **err.evidence,
                    "checkpoints": planned,
                    "per_checkpoint_bytes": per_checkpoint,
                    "estimate": estimate.to_dict(),
                    "final_model_bytes": final,
                    "start_step": start_step,
                    "max_steps": max_steps,
                    "args": describe_args(args),
                },
            )
        return None  # pragma: no cover - the raising call above fails whenever disk.ok is False

    def _log_memory(self, status: dict[str, Any]) -> None:
        log = get_logger()
        log.info(
            "[preflight_guard] RAM: %s available of %s (threshold %s)",
            status["available"],
            status["total"],
            format_bytes(status["min_available_bytes"]),
        )
        if not status["gpus"]:
            log.info("[preflight_guard] GPU memory: no CUDA device visible, GPU memory summary skipped")
        for gpu in status["gpus"]:
            if "error" in gpu:
                log.warning("[preflight_guard] GPU %s: %s", gpu["index"], gpu["error"])
            else:
                log.info(
                    "[preflight_guard] GPU %s (%s): %s free of %s", gpu["index"], gpu["name"], gpu["free"], gpu["total"]
                )

    # ------------------------------------------------------------------------------------- before each save
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._last_checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if control.should_save and self.check_before_save:
            self._check_save(args, state, control, kwargs.get("model"))
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if control.should_save and self.check_before_save:
            self._check_save(args, state, control, kwargs.get("model"))
        return control

    def _needed_for_next_save(self, args: Any, model: Any) -> tuple[int, str]:
        last = self._last_checkpoint
        if last is None:
            found = checkpoint_dirs(Path(args.output_dir))
            last = found[-1] if found else None
        if last is not None and last.is_dir():
            size = directory_size(last)
            if size > 0:
                return size, f"the size of {last.name}"
        if self.estimate is None and model is not None:
            self.estimate = estimate_checkpoint_size(
                param_stats(model),
                optim=getattr(args, "optim", "adamw_torch"),
                save_only_model=bool(getattr(args, "save_only_model", False)),
            )
        return (self.estimate.total_bytes if self.estimate is not None else 0), "the estimated checkpoint size"

    def _check_save(self, args: Any, state: Any, control: Any, model: Any) -> None:
        if self.stopped is not None:  # already stopping for space (same on every rank): no second save attempt
            control.should_save = False
            return
        step = int(state.global_step)
        short = False
        detail: dict[str, Any] = {}
        if bool(getattr(args, "should_save", True)):
            size, basis = self._needed_for_next_save(args, model)
            try:
                disk = check_disk_space(
                    args.output_dir,
                    size,
                    margin=self.disk_margin,
                    margin_bytes=self.disk_margin_bytes,
                    raise_error=False,
                )
                short = not disk.ok
                detail = {**disk.to_dict(), "basis": basis}
            except OSError as exc:
                short, detail = True, {"error": f"{type(exc).__name__}: {exc}", "basis": basis}
        self.saves_checked += 1
        # Collective at the same event on every rank (should_save comes from the step count, so it agrees).
        if not distributed.any_rank(short):
            return
        control.should_save = False
        control.should_training_stop = True
        found = checkpoint_dirs(Path(args.output_dir))
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
        self.stopped = PreflightError(
            what,
            where={"file": str(args.output_dir), "step": step, "rank": distributed.rank()},
            next_step=(
                f"Free space on that disk (or move older checkpoints away), then resume with "
                f"trainer.train(resume_from_checkpoint=True) from {newest}; steps after it are redone."
            ),
            evidence={**detail, "newest_checkpoint": newest},
        )
        self.alert("critical", what, step=step, evidence=self.stopped.evidence)

    def summary(self) -> str:
        if self.stopped is not None:
            return f"stopped at step {self.stopped.where.get('step')}: not enough disk for the next checkpoint"
        parts = []
        if self.required_bytes is not None:
            free = f", {format_bytes(self.free_bytes)} free" if self.free_bytes is not None else ""
            parts.append(f"{self.planned} checkpoint(s) need ~{format_bytes(self.required_bytes)}{free}")
        parts.append(f"{self.saves_checked} save(s) checked for space")
        return "; ".join(parts)
