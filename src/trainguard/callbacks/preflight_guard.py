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

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import distributed
from ..alerts import AlertSink, get_logger
from ..bounds import finite_number, whole_number, yes_no
from ..checks.preflight import (
    DEFAULT_MARGIN,
    DEFAULT_MARGIN_BYTES,
    DEFAULT_MIN_AVAILABLE_MEMORY,
    CheckpointEstimate,
    RunSettings,
    check_disk_space,
    check_memory,
    check_save_space,
    checkpoint_global_step,
    engine_fallback,
    estimate_checkpoint_size,
    format_bytes,
    memory_error,
    next_save_size,
    param_stats,
    plan_run_disk,
    requested_engine,
    resume_folder,
    run_disk_error,
    save_stopped_error,
    tokenizer_size,
)
from ..checks.set_aside import set_aside_excess
from ..errors import PreflightError, TrainGuardError
from . import _trainer_compat
from ._base import GuardCallback
from ._trainer_compat import engine_layout

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["PreflightGuard"]


def _engine_problem(trainer: Any) -> PreflightError | None:
    import os

    args = trainer.args
    requested = requested_engine(getattr(args, "fsdp", None), getattr(args, "deepspeed", None), dict(os.environ))
    layout = engine_layout(trainer)
    active = (
        "deepspeed"
        if layout == "deepspeed"
        else "fsdp"
        if layout != "plain" or getattr(trainer, "is_fsdp_xla_enabled", False)  # XLA's FSDP saves its own way
        else str(getattr(getattr(trainer.accelerator, "state", None), "distributed_type", "plain")).split(".")[-1]
    )
    setting = f"fsdp={args.fsdp!r}" if requested == "fsdp" and getattr(args, "fsdp", None) else ""
    what = engine_fallback(requested, active=active, setting=setting or ("deepspeed=..." if requested else ""))
    if what is None:
        return None
    return PreflightError(
        what,
        where={"field": "fsdp" if requested == "fsdp" else "deepspeed", "rank": distributed.rank()},
        next_step=(
            "Launch it where the engine is available (accelerate sets FSDP up only on GPUs unless told otherwise), "
            "or drop the setting to train without it on purpose; PreflightGuard(check_engine=False) lets it run as "
            "it is."
        ),
        evidence={"requested": requested, "active": active},
    )


def _train_rows(trainer: Any) -> int | None:
    """Rows of the Trainer's train dataset; None without one or for an iterable dataset (no length)."""
    dataset = getattr(trainer, "train_dataset", None) if trainer is not None else None
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None  # an iterable dataset: max_steps is then required by the Trainer


class PreflightGuard(GuardCallback):
    """Refuse a run whose checkpoints will not fit on disk (or that starts short of RAM) before its first step,
    and stop cleanly instead of writing a checkpoint that cannot fit.

    The estimate: one checkpoint = the weights as saved (all parameters of a full model; only the adapter of a PEFT
    model) + optimizer state (AdamW: two states the size of the trainable parameters; see
    :func:`~trainguard.checks.preflight.optimizer_state_bytes`; none with ``save_only_model``) + scheduler, RNG,
    trainer state and tokenizer files; times the checkpoints on disk at the peak (``save_total_limit + 1``, or every
    save without a limit); plus the final ``trainer.save_model()``; plus the margin.

    Args:
        check_disk: Refuse before step 1 when the run's checkpoints will not fit (default True).
        check_engine: Refuse before step 1 a run that asked for FSDP or DeepSpeed and is training without it
            (accelerate falls back to plain DDP silently, e.g. on CPU) (default True).
        check_before_save: Before each save, check free space against the last checkpoint's size (default True).
        disk_margin: Extra room as a fraction of the estimate (default 0.10: the estimate misses small files such
            as the README, logs and the events file).
        disk_margin_bytes: The least extra room in bytes (default 64 MiB: a disk filled to the last byte also
            breaks logging, alerts and other processes). The margin is the larger of the two.
        include_final_model: Count one more weights-only copy for the ``trainer.save_model()`` most scripts call
            at the end (default True).
        min_available_memory: The least share of total RAM that must be available before step 1 (default 0.15,
            the origin's "RAM < 85 % used"); None skips the RAM check.
        check_set_aside: Before step 1, warn when what trainguard set aside in ``output_dir`` (``trainguard-archive/``,
            ``trainguard-quarantine/``: never deleted, and outside ``save_total_limit``) takes more disk than
            ``save_total_limit`` checkpoints (the newest checkpoint's size times the limit) (default True). The
            warning names the total and ``trainguard clean OUTPUT_DIR``, which lists them and removes them with
            ``--yes``.
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
        check_engine: bool = True,
        check_before_save: bool = True,
        disk_margin: float = DEFAULT_MARGIN,
        disk_margin_bytes: int = DEFAULT_MARGIN_BYTES,
        include_final_model: bool = True,
        min_available_memory: float | None = DEFAULT_MIN_AVAILABLE_MEMORY,
        raise_after_stop: bool = True,
        check_set_aside: bool = True,
        alert_sinks: Sequence[AlertSink] | None = None,
        webhook_url: str | None = None,
    ) -> None:
        super().__init__(alert_sinks=alert_sinks, webhook_url=webhook_url)
        owner = "PreflightGuard"
        # The margin is a fraction of the checkpoint size (0.1 = 10%); 100 (x100) is already absurd.
        disk_margin = finite_number("disk_margin", disk_margin, low=0, high=100, owner=owner)
        disk_margin_bytes = whole_number("disk_margin_bytes", disk_margin_bytes, low=0, high=2**60, owner=owner)
        min_available_memory = finite_number(
            "min_available_memory", min_available_memory, low=0, high=1, allow_none=True, owner=owner
        )
        self.check_disk = yes_no("check_disk", check_disk, owner=owner)
        self.check_engine = yes_no("check_engine", check_engine, owner=owner)
        self.check_before_save = yes_no("check_before_save", check_before_save, owner=owner)
        self.disk_margin = float(disk_margin)
        self.disk_margin_bytes = int(disk_margin_bytes)
        self.include_final_model = yes_no("include_final_model", include_final_model, owner=owner)
        self.min_available_memory = min_available_memory
        self.raise_after_stop = yes_no("raise_after_stop", raise_after_stop, owner=owner)
        self.check_set_aside = yes_no("check_set_aside", check_set_aside, owner=owner)
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

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        if not self._preflight_done:  # the Trainer could not be found at init: check here, still before step 1
            self._preflight_done = True
            self.stopped = None
            self._preflight(self.trainer, None, args=args, state=state, model=kwargs.get("model"))
        return control

    def _preflight(self, trainer: Any, resume: Any, *, args: Any = None, state: Any = None, model: Any = None) -> None:
        args = args if args is not None else getattr(trainer, "args", None)
        model = model if model is not None else getattr(trainer, "model", None)
        if args is None or model is None:
            return
        output_dir = Path(args.output_dir)
        if self.check_set_aside and distributed.is_main_process():
            self._warn_set_aside(output_dir, getattr(args, "save_total_limit", None))
        problem: TrainGuardError | None = None
        try:
            if self.check_engine and trainer is not None:
                problem = _engine_problem(trainer)
            if problem is None and self.check_disk:
                problem = self._check_run_disk(trainer, args, state, model, output_dir, resume)
            if problem is None and self.min_available_memory is not None:
                status = check_memory(self.min_available_memory, raise_error=False)
                if not status.ok:
                    problem = memory_error(status)
                self._log_memory(status.to_dict())
        except TrainGuardError as err:  # never raise before the collective: the other ranks would wait forever
            problem = err
        except OSError as exc:  # an unreadable output_dir must not look like a pass
            problem = PreflightError(
                f"could not measure free space for the run: {exc}",
                where={"file": str(output_dir), "rank": distributed.rank()},
            )
        # Collective: every rank calls it here, so a refusal on any rank is a refusal on all.
        self.refuse_together(
            problem,
            placeholder=lambda: PreflightError(
                "another rank's pre-flight check failed (see that rank's log); every rank refuses together",
                where={"rank": distributed.rank()},
            ),
            alert_level="critical",
            alert_placeholder=True,
            step=0,
        )

    def _check_run_disk(
        self, trainer: Any, args: Any, state: Any, model: Any, output_dir: Path, resume: Any
    ) -> PreflightError | None:
        settings = RunSettings.from_args(args)
        checkpoint = resume_folder(resume, output_dir)
        known = state is not None and getattr(state, "max_steps", None)
        plan = plan_run_disk(
            settings,
            param_stats(model),
            output_dir=output_dir,
            resumed_from=checkpoint,
            start_step=checkpoint_global_step(checkpoint) if state is None else int(state.global_step),
            train_rows=_train_rows(trainer),
            schedule=(int(state.max_steps), int(state.num_train_epochs)) if known else None,
            tokenizer_bytes=tokenizer_size(getattr(trainer, "processing_class", None) if trainer is not None else None),
            include_final_model=self.include_final_model,
        )
        self.estimate, self.planned, self.required_bytes = plan.estimate, plan.checkpoints, plan.required_bytes
        if not settings.should_save:
            return None  # this rank writes no checkpoint files beyond its RNG state
        disk = check_disk_space(
            output_dir,
            plan.required_bytes,
            margin=self.disk_margin,
            margin_bytes=self.disk_margin_bytes,
            purpose=plan.purpose,
            raise_error=False,
        )
        self.free_bytes = disk.free_bytes
        get_logger().info(
            "[preflight_guard] disk: %s needed for %s, %s free on %s",
            format_bytes(disk.needed_bytes),
            plan.purpose,
            format_bytes(disk.free_bytes),
            disk.checked_path,
        )
        return None if disk.ok else run_disk_error(plan, disk, settings, rank=distributed.rank())

    def _warn_set_aside(self, output_dir: Path, save_total_limit: int | None) -> None:
        """One warning when the set-aside folders outweigh ``save_total_limit`` checkpoints; never raises."""
        try:
            excess = set_aside_excess(output_dir, save_total_limit)
        except (OSError, TrainGuardError) as exc:  # a link at the folder's name: reported, the run is not stopped
            get_logger().warning("[preflight_guard] could not size what trainguard set aside: %s", exc)
            return
        if excess is None:
            return
        self.alert(
            "warning",
            f"{format_bytes(excess['set_aside_bytes'])} in {excess['items']} set-aside item(s) "
            f"({', '.join(excess['folders'])}) in {output_dir}: more than save_total_limit="
            f"{excess['save_total_limit']} checkpoints take ({excess['checkpoint']} is "
            f"{format_bytes(excess['checkpoint_bytes'])}), and they are never rotated away. "
            f"List them with `trainguard clean {output_dir}`, remove them with `trainguard clean {output_dir} --yes`",
            step=0,
            evidence=excess,
        )

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
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        self._last_checkpoint = _trainer_compat.checkpoint_layout(self.trainer, args).folder_for(state.global_step)
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        if control.should_save and self.check_before_save:
            self._check_save(args, state, control, kwargs.get("model"), "on_step_end")
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        if control.should_save and self.check_before_save:
            self._check_save(args, state, control, kwargs.get("model"), "on_epoch_end")
        return control

    def _estimate(self, args: Any, model: Any) -> CheckpointEstimate | None:
        if self.estimate is None and model is not None:
            self.estimate = estimate_checkpoint_size(
                param_stats(model),
                optim=getattr(args, "optim", "adamw_torch"),
                save_only_model=bool(getattr(args, "save_only_model", False)),
            )
        return self.estimate

    def _check_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any, event: str
    ) -> None:
        step = int(state.global_step)
        if self.stopped is not None:  # already stopping for space (same on every rank): no second save attempt
            self.veto_save(control, "stopping for disk space", step=step, event=event)
            return
        short = False
        detail: dict[str, Any] = {}
        if bool(getattr(args, "should_save", True)):
            size, basis = next_save_size(
                str(args.output_dir), self._last_checkpoint, lambda: self._estimate(args, model)
            )
            short, detail = check_save_space(
                str(args.output_dir), size, basis, margin=self.disk_margin, margin_bytes=self.disk_margin_bytes
            )
        self.saves_checked += 1
        # Collective at the same event on every rank (should_save comes from the step count, so it agrees).
        if not distributed.any_rank(short):
            return
        self.veto_save(control, "not enough disk space for the save", step=step, event=event)
        self.request_stop(control, "not enough disk space for the save", step=step, event=event)
        self.stopped = save_stopped_error(str(args.output_dir), step, detail, rank=distributed.rank())
        self.alert("critical", self.stopped.what, step=step, evidence=self.stopped.evidence)

    def summary(self) -> str:
        if self.stopped is not None:
            return f"stopped at step {self.stopped.where.get('step')}: not enough disk for the next checkpoint"
        parts = []
        if self.required_bytes is not None:
            free = f", {format_bytes(self.free_bytes)} free" if self.free_bytes is not None else ""
            parts.append(f"{self.planned} checkpoint(s) need ~{format_bytes(self.required_bytes)}{free}")
        parts.append(f"{self.saves_checked} save(s) checked for space")
        return "; ".join(parts)
