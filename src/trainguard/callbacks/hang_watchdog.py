"""``HangWatchdog``: every thread's stack when a step stalls, even when the GIL is held, then the chosen action."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..alerts import AlertSink, get_logger
from ..checks.watchdog import HangReport, Watchdog, WatchdogSettings
from ._base import GuardCallback

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from typing_extensions import Unpack

    from ..checks.watchdog import WatchdogOptions

__all__ = ["HangWatchdog"]


class HangWatchdog(GuardCallback):
    """Dump every thread's stack when training makes no progress within a budget, alert, then act.

    Every Trainer event counts as progress (step begin and end, substeps, optimizer steps, logs, evaluation
    batches, evaluations, saves, epochs); each only stores a timestamp. A monitor thread of
    :class:`trainguard.checks.watchdog.Watchdog` compares it with the budget of the current phase: first step,
    step, evaluation, checkpoint save, the first step after a resume (which includes the Trainer's data skip) and
    the end of training. On a stall it writes ``output_dir/trainguard-hang-rank{r}-{utc}.txt`` (all threads, main
    thread first), logs it on the ``trainguard`` logger, sends a ``critical`` alert through the sinks, and then
    keeps watching (``action="dump"``, dumping again while the stall lasts) or ends the process
    (``action="abort"``) so torchrun or a supervisor restarts it from its last checkpoint. faulthandler's C-level
    timer covers stalls inside C code that holds the GIL, where no Python thread can run.

    Watching starts at ``on_train_begin`` and stops at ``on_train_end`` (or when training raises). Each rank runs
    its own watchdog and names its rank in its files; when one rank hangs, the others wait in their next collective
    and are dumped too.

    Args:
        timeout: Step budget in seconds; None (default) learns it: ``max(floor, multiplier x slowest step
            cycle)`` after ``warmup_steps`` steps, ``floor`` before.
        alert_sinks: Replace the default alert sinks.
        webhook_url: Also POST warnings and worse to this URL.
        **options: The watchdog's other options, fields of :class:`~trainguard.checks.watchdog.WatchdogSettings`
            where their defaults and reasons are: ``action`` (``"dump"``, the default: nothing is killed by a false
            alarm; or ``"abort"``: exit with ``exit_code``), ``repeat_interval``, ``warmup_steps``, ``floor``,
            ``multiplier``, ``first_step_timeout``, ``eval_timeout``, ``save_timeout``, ``resume_timeout``,
            ``exit_code``, ``abort_grace``, ``native_stacks``, ``check_interval``.

    Raises:
        ValueError: An option is out of range (at construction, before any training).

    Example::

        trainer = Trainer(..., callbacks=[trainguard.HangWatchdog(action="abort")])
        trainer.train()   # a stalled step: stacks in output_dir/trainguard-hang-rank0-*.txt, exit 124
    """

    guard_name = "hang_watchdog"

    def __init__(
        self,
        timeout: float | None = None,
        *,
        alert_sinks: Sequence[AlertSink] | None = None,
        webhook_url: str | None = None,
        **options: Unpack[WatchdogOptions],
    ) -> None:
        super().__init__(alert_sinks=alert_sinks, webhook_url=webhook_url)
        settings = WatchdogSettings(timeout=timeout, **options)
        self.watchdog = Watchdog(settings=settings, on_report=self._on_report)
        # Where the run goes after an evaluation and after a save that follow a step (set at each step end).
        self._after_eval = "step"
        self._after_save = "step"

    @property
    def reports(self) -> list[HangReport]:
        """Every stall, recovery and earlier-process dump seen in this run."""
        return self.watchdog.reports

    # ------------------------------------------------------------------------------------------------ alerts
    def _on_report(self, report: HangReport) -> None:
        # Runs on the watchdog thread; the alerter is thread-safe (the Trainer-log sink defers to the main thread).
        level = {"stall": "critical", "earlier": "error", "recovered": "warning"}.get(report.kind, "warning")
        message = report.message
        if report.file is not None and report.kind != "recovered":
            message += f"; stacks in {report.file}"
        self.alert(level, message, step=report.at_step, evidence=report.evidence())
        if report.kind == "stall" and report.action == "abort":
            self._record_failure(report)
            self.alerter.close(timeout=5.0)  # the process ends next: let a webhook go out first

    def _record_failure(self, report: HangReport) -> None:
        # With CrashLoopGuard attached, count the abort as a HangError at this step, so a run that hangs at the
        # same step every restart is refused as a crash loop instead of restarting forever.
        try:
            from ..checks import crash_loop

            for run_id, output_dir in self.context.open_runs.items():
                crash_loop.record_failure(
                    output_dir, run_id=run_id, step=report.step, exc=report.error(), rank=report.rank
                )
        except Exception as exc:  # about to exit: bookkeeping must not stop the exit
            get_logger().warning("trainguard hang watchdog: could not record the abort: %s", exc)

    # ------------------------------------------------------------------------------------------------ events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        wd = self.watchdog
        wd.step = int(state.global_step)
        phase = "resume" if state.global_step > 0 else "first_step"
        if not wd.running:
            wd.output_dir = Path(getattr(args, "output_dir", None) or ".")
        wd.start(phase)  # idempotent: auto_find_batch_size runs on_train_begin again
        if phase == "resume":
            budget, rule = wd.budget("resume")
            get_logger().info(
                "trainguard hang watchdog: resuming at step %d; the first step includes the Trainer's skip over "
                "trained batches and has %g s (%s)",
                state.global_step,
                budget,
                rule,
            )
        return control

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        self.watchdog.beat()
        return control

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        self.watchdog.beat()
        return control

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        self.watchdog.beat()
        return control

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        self.watchdog.beat()
        return control

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        self.watchdog.beat()
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        self.watchdog.step_end(state.global_step)
        if control.should_training_stop or control.should_evaluate or control.should_save:
            self._next_phase(control)
        elif self.watchdog.phase != "step":
            self.watchdog.enter("step")  # step_end already recorded the progress of an ordinary step
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        self.watchdog.beat()
        self._next_phase(control)
        return control

    def _next_phase(self, control: Any) -> None:
        # The Trainer runs log -> evaluate -> save after on_step_end / on_epoch_end with no "begin" event, so the
        # flags DefaultFlowCallback set (this guard runs after it) tell which budget the next gap needs.
        after = "finalize" if control.should_training_stop else "step"
        self._after_save = after
        if control.should_evaluate:
            self._after_eval = "save" if control.should_save else after
            self.watchdog.enter("eval")
        elif control.should_save:
            self.watchdog.enter("save")
        else:
            self.watchdog.enter(after)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        self.watchdog.beat()
        return control

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        self.watchdog.beat()
        return control

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        if self.watchdog.phase == "eval":
            self.watchdog.enter(self._after_eval)
        else:
            self.watchdog.beat()
        return control

    def on_predict(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics: Any = None, **kwargs: Any
    ) -> Any:
        self.watchdog.beat()
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        if self.watchdog.phase == "save":
            self.watchdog.enter(self._after_save)
        else:
            self.watchdog.beat()
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        self.watchdog.stop()
        return super().on_train_end(args, state, control, **kwargs)

    def on_train_error(self, trainer: Any, exc: BaseException) -> None:
        self.watchdog.stop()

    def key_figures(self) -> dict[str, Any]:
        seconds, rule = self.watchdog.step_budget()
        return {"step_budget_s": float(seconds), "step_budget_rule": str(rule), **super().key_figures()}

    def summary(self) -> str:
        return self.watchdog.summary()
