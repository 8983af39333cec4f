"""``CrashLoopGuard``: record how each run ended; refuse a start that would repeat the same failure again."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import distributed
from ..alerts import AlertSink, get_logger
from ..bounds import whole_number, yes_no
from ..checks import crash_loop
from ..checks._layout import checkpoint_step
from ..checks._resume import resolve_resume_checkpoint
from ..checks.lineage import new_id
from ..errors import PreflightError, UnsafeFileError
from . import _trainer_compat
from ._base import GuardCallback
from ._context import GuardContext

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["CrashLoopGuard"]


def _batch(args: Any) -> dict[str, int]:
    return {
        "per_device_train_batch_size": int(args.per_device_train_batch_size),
        "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
        "world_size": distributed.world_size(),
    }


class CrashLoopGuard(GuardCallback):
    """Record starts, failures and clean ends in ``output_dir/trainguard-crashes.jsonl``; refuse a start that
    would repeat a failure that already ended the last ``max_repeats`` runs at the same step.

    Where it acts: inside ``trainer.train()`` before anything is loaded (the ``before_train`` hook) for the
    decision, at ``on_train_begin`` for the start record (the resumed step is known then), through the train
    wrapper's ``on_train_error`` for the failure (the Trainer has no exception event) and at ``on_train_end`` for
    the clean end. A process killed outright (SIGKILL, the kernel's OOM killer) records nothing: its start without
    an end counts as a failure of unknown type at the step it started from.

    The decision is taken on global rank 0 and broadcast, so every rank refuses (or applies the OOM fix) together.

    A link, FIFO, device or socket at the log's name (planted, or left by another tool) is never followed and never
    blocks: before training it refuses the start with :class:`~trainguard.UnsafeFileError` naming it (the guard
    cannot decide without the history, and the user should see that, not a run that silently lost its guard);
    once training runs, a record that cannot be written is skipped with a warning, because losing the record is
    better than losing the run.

    Args:
        max_repeats: Refuse after this many runs in a row ended with the same failure at the same step (default 3:
            one failure can be bad luck, two a coincidence, three a pattern that a restart loop would repeat
            forever). ``None`` or ``0`` records but never refuses.
        apply_oom_fix: For an out-of-memory loop, instead of refusing, halve ``per_device_train_batch_size`` and
            double ``gradient_accumulation_steps`` (same global batch) on ``trainer.args`` and go on, with a
            warning alert. Default False: changing a run's settings is the user's call.
        alert_sinks: Replace the default alert sinks.
        webhook_url: Also POST warnings and worse to this URL.

    Raises:
        PreflightError: From ``trainer.train()`` when the loop is found; says what repeats, where, how often,
            and for OOM the batch settings that keep the global batch.
        UnsafeFileError: From ``trainer.train()`` when a link or special file is at the log's name.

    Example::

        trainer = Trainer(..., callbacks=[trainguard.CrashLoopGuard(apply_oom_fix=True)])
        trainer.train()   # the 4th start after 3 OOMs at one step halves the batch and doubles accumulation
    """

    guard_name = "crash_loop_guard"

    def __init__(
        self,
        *,
        max_repeats: int | None = 3,
        apply_oom_fix: bool = False,
        alert_sinks: list[AlertSink] | None = None,
        webhook_url: str | None = None,
    ) -> None:
        super().__init__(alert_sinks=alert_sinks, webhook_url=webhook_url)
        self.max_repeats = whole_number("max_repeats", max_repeats, low=0, allow_none=True, owner="CrashLoopGuard") or 0
        self.apply_oom_fix = yes_no("apply_oom_fix", apply_oom_fix, owner="CrashLoopGuard")
        self.run_id: str | None = None
        self._prepared = False
        self._started = False
        self._trainer_for_step: weakref.ReferenceType[Any] | None = None
        #: ``(before, after)`` batch settings when the OOM fix was applied in this run.
        self.applied_fix: tuple[dict[str, int], dict[str, int]] | None = None
        self._history_note = ""
        self._in_step = False

    # ------------------------------------------------------------------------------------------- decision
    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> Any:
        self._prepared = False
        self._started = False
        self._prepare(trainer, trainer.args, resume_from_checkpoint)
        return resume_from_checkpoint

    def _prepare(self, trainer: Any, args: Any, resume_from_checkpoint: Any = None) -> None:
        if self._prepared:
            return
        self._prepared = True
        # Where this start resumes from: past where the failing runs started, it is progress, not a loop.
        resumed = resolve_resume_checkpoint(args.output_dir, resume_from_checkpoint)
        resume_step = (checkpoint_step(resumed) or 0) if resumed is not None else 0
        # The decision is taken on rank 0 (it reads the log) and broadcast with the run id, so all ranks act alike.
        payload: tuple[str, crash_loop.StartDecision] | BaseException | None = None
        if distributed.is_main_process():
            try:
                decision = crash_loop.decide_start(
                    args.output_dir,
                    per_device_train_batch_size=int(args.per_device_train_batch_size),
                    gradient_accumulation_steps=int(args.gradient_accumulation_steps),
                    max_repeats=self.max_repeats,
                    apply_oom_fix=self.apply_oom_fix,
                    can_change_batch=not getattr(trainer, "is_deepspeed_enabled", False),
                    resume_step=resume_step,
                    open_runs=GuardContext.open_run_ids(),
                )
                self._history_note = decision.history
                payload = (new_id(), decision)  # the run-id style of every trainguard record
            except Exception as exc:  # an unreadable folder must stop every rank, not hang the others
                payload = exc
        payload = distributed.broadcast_object(payload)
        if isinstance(payload, BaseException):
            raise payload
        assert isinstance(payload, tuple)
        self.run_id, decision = str(payload[0]), payload[1]
        if decision.action == "refuse":
            err = decision.error
            assert isinstance(err, PreflightError)
            if distributed.is_main_process():
                self.alert("error", err.what, evidence=err.evidence, raised=True)
            raise err
        if decision.action == "fix":
            assert decision.before is not None and decision.after is not None and decision.loop is not None
            (bs, ga), (new_bs, new_ga) = decision.before, decision.after
            before = {
                "per_device_train_batch_size": int(args.per_device_train_batch_size),
                "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
            }
            if trainer is not None:
                _trainer_compat.set_train_batch_size(trainer, new_bs, new_ga)
            else:
                args.per_device_train_batch_size = new_bs
                args.gradient_accumulation_steps = new_ga
            after = {"per_device_train_batch_size": new_bs, "gradient_accumulation_steps": new_ga}
            self.applied_fix = (before, after)
            if distributed.is_main_process():
                self.alert(
                    "warning",
                    f"crash loop: {decision.loop.describe()}; applied the OOM fix: per_device_train_batch_size "
                    f"{bs} -> {new_bs}, gradient_accumulation_steps {ga} -> {new_ga} (same global batch)",
                    evidence={"before": before, "after": after},
                )

    # ----------------------------------------------------------------------------------------------- events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        if self._started:  # auto_find_batch_size re-runs the loop: one start per train() call
            return control
        if not self._prepared:  # the train() hook was not installed (Trainer not found at init)
            self._prepare(self.trainer, args)
        self._started = True
        trainer = self.trainer
        self._trainer_for_step = weakref.ref(trainer) if trainer is not None else None
        run_id = self.run_id or new_id()
        if args.should_save:
            self._record(
                crash_loop.record_start, str(args.output_dir), run_id=run_id, step=state.global_step, batch=_batch(args)
            )
        self.context.open_runs.open(run_id, str(args.output_dir), self._current_step)
        return control

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        self._in_step = True
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        self._in_step = False
        return control

    def _current_step(self) -> int:
        trainer = self._trainer_for_step() if self._trainer_for_step is not None else None
        return int(trainer.state.global_step) if trainer is not None else -1

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        if self._started and self.run_id is not None:
            if args.should_save:
                self._record(crash_loop.record_end, str(args.output_dir), run_id=self.run_id, step=state.global_step)
            self.context.open_runs.close(self.run_id)
        self._started = False
        self._prepared = False
        return super().on_train_end(args, state, control, **kwargs)

    def on_train_error(self, trainer: Any, exc: BaseException) -> None:
        run_id = self.run_id
        self._prepared = False
        if run_id is None:
            return
        self.context.open_runs.close(run_id)
        self._started = False
        args = trainer.args
        step = crash_loop.failing_step(exc, int(trainer.state.global_step), in_step=self._in_step)
        self._in_step = False
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            if args.should_save:
                self._record(
                    crash_loop.record_end,
                    args.output_dir,
                    run_id=run_id,
                    step=step,
                    status="interrupted",
                    reason=type(exc).__name__,
                )
            return
        self._record(
            crash_loop.record_failure, args.output_dir, run_id=run_id, step=step, exc=exc, rank=distributed.rank()
        )
        name, head = crash_loop.describe_exception(exc)
        self.alert(
            "error",
            f"training failed at step {step} with {name}: {head}",
            step=step,
            evidence={"oom": crash_loop.is_oom(exc), "log": str(crash_loop.crash_log_path(args.output_dir))},
        )

    def _record(self, write: Callable[..., None], output_dir: Any, **fields: Any) -> None:
        """Append one record; a link or special file at the log's name skips it with a warning (mid-run, losing
        the record is better than losing the run)."""
        try:
            write(output_dir, **fields)
        except UnsafeFileError as err:
            get_logger().warning("trainguard crash-loop record not written: %s %s", err.what, err.next_step)

    def summary(self) -> str:
        if self.applied_fix is not None:
            before, after = self.applied_fix
            return (
                f"crash loop found ({self._history_note}); applied the OOM fix: per-device batch "
                f"{before['per_device_train_batch_size']}->{after['per_device_train_batch_size']}, accumulation "
                f"{before['gradient_accumulation_steps']}->{after['gradient_accumulation_steps']}"
            )
        return f"no crash loop ({self._history_note})" if self._history_note else "crash history recorded"
