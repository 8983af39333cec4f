"""``NanGuard``: stop at the first non-finite step, never save a poisoned checkpoint, all ranks agree.

The Trainer adapter: options, events and the decision to act. Each step's values come from the Trainer's one step
probe (:mod:`._step_probe`, shared with SpikeGuard); what is checked, how one step's flags are collected and shared
across ranks, and what a finding says live in :mod:`trainguard.checks.nan`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from .. import distributed
from .._util import drop_gradients
from ..alerts import AlertSink, get_logger
from ..bounds import MAX_FACTOR, finite_number, whole_number, yes_no
from ..checks.nan import (
    LossHealth,
    NonFiniteFinding,
    Patience,
    StepFlagCollector,
    StepFlags,
    StepVerdict,
    finding_evidence,
    finding_from_metrics,
    finding_from_parameters,
    finding_from_verdict,
    finding_headline,
    finding_message,
    nonfinite_error,
    nonfinite_metrics,
    nonfinite_parameters,
    stop_evidence,
)
from ..errors import NonFiniteError
from . import _trainer_compat
from ._base import GuardCallback, find_trainer
from ._step_probe import StepProbe, install_step_probe

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["NanGuard"]

_ACTIONS = ("raise", "stop", "warn")


class NanGuard(GuardCallback):
    """Stop a run at its first non-finite training loss, gradient norm, weight or evaluation metric, before a
    checkpoint of the bad state is written, at the same step on every rank.

    What it watches, and where:

    - **every micro-batch's raw training loss**, as returned by ``Trainer.training_step`` (before
      ``logging_nan_inf_filter`` hides it in the log), and **the gradient norm** the Trainer already computes
      for clipping. Both become flags on their device (plain floats on CPU, where reading is free); no value is
      copied from an accelerator to the host per step. A step without any label token (``num_items_in_batch ==
      0``: its loss is 0/0 and its gradients are zero) is not an alarm but counts toward the zero-loss warning.
    - **the weights, before each save** (one pass over the parameters; the save reads them all anyway).
    - **evaluation metrics** (``eval_loss`` and any numeric metric) at ``on_evaluate``.

    When the flags are read: with ``sync=True`` (the default on CPU, where reading is free, and whenever
    ``patience > 0``) at ``on_pre_optimizer_step``, so a bad step is caught *before its update is applied*. With
    ``sync=False`` (the default on CUDA) the flags are all-reduced and copied to the host asynchronously at
    ``on_step_end`` and read one step later, so there is no extra host-device synchronisation per step; on a step
    that will save, evaluate or end training they are read at once, so a bad step is never checkpointed.

    Every rank shares its flags in one tiny all-reduce per step (the step probe's, shared with
    :class:`~trainguard.SpikeGuard`), so a NaN seen by one rank stops all of them at the same step. With an active
    fp16 ``GradScaler``, a step whose loss is finite but whose gradients overflow is the scaler's own skip, not an
    alarm, until more than ``max_skipped_steps`` happen in a row.

    Args:
        action: ``"raise"`` (default): raise :class:`~trainguard.NonFiniteError` from ``train()``, so a script
            does not go on to ``save_model()`` or push a poisoned model. ``"stop"``: end ``train()`` normally
            without saving the bad step (check :attr:`stopped`). ``"warn"``: alert only, change nothing.
        patience: Consecutive non-finite training steps tolerated before ``action``. A tolerated step is
            *skipped*: its gradients are dropped before ``optimizer.step()``, so the weights do not change; the
            LR schedule still advances. Needs ``sync=True`` (it is set automatically).
        sync: Read the flags before each optimizer step (True) or one step later without a host sync (False).
            None (default): True on CPU or when ``patience > 0``, False on CUDA and other accelerators.
        check_eval: Check evaluation metrics.
        check_params_on_save: Check the weights are finite before each checkpoint is written.
        max_skipped_steps: With an fp16 loss scaler, this many overflow skips in a row are normal loss-scale
            search; one more means the loss scale has collapsed and counts as a non-finite failure.
        spike_factor: Warn when a logged loss exceeds this many times the median of the last ``spike_window``
            logged losses (after ``spike_warmup`` of them). None disables it. This is SpikeGuard's detector
            (:class:`~trainguard.checks.spike.SpikeDetector`) with its ratio rule, on the logged losses.
        spike_window: Baseline length, in logged losses.
        spike_warmup: Logged losses seen before spikes are judged.
        zero_loss_steps: Warn when this many logged losses in a row are exactly 0.0 (all labels masked). None
            disables it.
        alert_sinks: Replace the default alert sinks.
        webhook_url: Also POST warnings and worse to this URL.

    Raises:
        NonFiniteError: From ``trainer.train()`` with ``action="raise"``; it names the step, the rank, the value
            and the newest checkpoint written before the bad step.
        ValueError: An unknown ``action``, a negative ``patience``, or ``patience > 0`` with ``sync=False``.

    Example::

        guard = trainguard.NanGuard()                      # or: callbacks=trainguard.all_guards()
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[guard])
        try:
            trainer.train()
        except trainguard.NonFiniteError as err:
            print(err.where["step"], err.where["field"], err.evidence.get("resume_from"))
    """

    guard_name: ClassVar[str] = "nan_guard"

    def __init__(
        self,
        *,
        action: str = "raise",
        patience: int = 0,
        sync: bool | None = None,
        check_eval: bool = True,
        check_params_on_save: bool = True,
        max_skipped_steps: int = 25,
        spike_factor: float | None = 10.0,
        spike_window: int = 100,
        spike_warmup: int = 20,
        zero_loss_steps: int | None = 5,
        alert_sinks: list[AlertSink] | None = None,
        webhook_url: str | None = None,
    ) -> None:
        super().__init__(alert_sinks=alert_sinks, webhook_url=webhook_url)
        self._now: tuple[int, str] = (0, "")  # (step, event) being handled: where a save veto or stop belongs
        if action not in _ACTIONS:
            raise ValueError(f"NanGuard action must be one of {_ACTIONS}, not {action!r}")
        owner = "NanGuard"
        # Counts whole and bounded, the spike factor finite: a configured 1.5 or inf is refused here, named.
        patience = whole_number("patience", patience, low=0, owner=owner)
        max_skipped_steps = whole_number("max_skipped_steps", max_skipped_steps, low=0, owner=owner)
        spike_factor = finite_number(
            "spike_factor", spike_factor, low=1, high=MAX_FACTOR, low_open=True, allow_none=True, owner=owner
        )
        spike_window = whole_number("spike_window", spike_window, low=1, owner=owner)
        spike_warmup = whole_number("spike_warmup", spike_warmup, low=1, owner=owner)
        zero_loss_steps = whole_number("zero_loss_steps", zero_loss_steps, low=1, allow_none=True, owner=owner)
        sync = yes_no("sync", sync, allow_none=True, owner=owner)
        if patience > 0 and sync is False:
            raise ValueError(
                "NanGuard patience > 0 skips the bad step's update, which needs the check before the optimizer "
                "step: use sync=True or leave sync=None"
            )
        self.action = action
        self.patience = int(patience)
        self.sync = sync
        self.check_eval = yes_no("check_eval", check_eval, owner=owner)
        self.check_params_on_save = yes_no("check_params_on_save", check_params_on_save, owner=owner)
        self.max_skipped_steps = int(max_skipped_steps)
        self.loss_health = LossHealth(
            spike_factor=spike_factor,
            spike_window=spike_window,
            spike_warmup=spike_warmup,
            zero_loss_steps=zero_loss_steps,
        )
        #: The finding that triggered ``action`` (None while the run is healthy).
        self.tripped: NonFiniteFinding | None = None
        #: Every non-finite observation of the run, tolerated ones included.
        self.findings: list[NonFiniteFinding] = []
        #: Steps whose update NanGuard skipped under ``patience``.
        self.skipped_steps = 0
        #: Steps the fp16 loss scaler skipped (gradient overflow), which are not alarms.
        self.scaler_skipped_steps = 0
        self._patience = Patience(self.patience)
        self._scaler_streak = Patience(self.max_skipped_steps)
        self._hooked = False
        # Keep flags as device tensors even for CPU tensors (the accelerator path); tests set it to cover that path.
        self._device_flags = False
        self._update_pending = True
        self._sync_now = True
        self._probe: StepProbe | None = None
        self._current: StepFlags | None = None  # this step's flags, read at on_step_end (sync=False)
        self._pending: StepFlags | None = None  # flags of the last step, read one step later (sync=False)
        self._nonfinite_since_log = False
        self._empty_since_log = False
        self._warned_streak = False

    @property
    def stopped(self) -> bool:
        """True when the guard ended (or is ending) the run: read it after ``train()`` with ``action="stop"``."""
        return self.tripped is not None and self.action != "warn"

    def summary(self) -> str:
        if self.tripped is not None:
            return f"{finding_headline(self.tripped)}; action {self.action}"
        extra = []
        if self.skipped_steps:
            extra.append(f"{self.skipped_steps} step(s) skipped under patience")
        if self.scaler_skipped_steps:
            extra.append(f"{self.scaler_skipped_steps} fp16 overflow skip(s)")
        return "all values finite" + (f" ({', '.join(extra)})" if extra else "")

    # ------------------------------------------------------------------------------------------------ hooks
    @property
    def _flags(self) -> StepFlagCollector:
        """This step's observations: the step probe's collector."""
        return self._own_probe().collector

    def _own_probe(self) -> StepProbe:
        if self._probe is None:
            self._probe = StepProbe()  # not installed on a Trainer: fed by hand (_after_training_step, ...)
        return self._probe

    def _install(self, trainer: Any, device: Any) -> None:
        """Subscribe to the Trainer's step probe (installed once per Trainer): every micro-batch's raw loss and the
        gradient norm the Trainer computes (for clipping), on this instance only."""
        self._probe = install_step_probe(trainer)
        missing = self._probe.subscribe(self, values=True, sync=bool(self._sync_now), device_flags=self._device_flags)
        self._probe.begin(device)
        for feature in missing:
            get_logger().warning("[nan_guard] off in this run: %s", feature)
        self._hooked = True

    def _after_training_step(self, loss: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """One micro-batch's loss, as the probe sees it (for a loop of your own)."""
        self._own_probe().on_loss(loss, args, kwargs)

    def _after_grad_norm(self, norm: Any) -> None:
        """The step's gradient norm, as the probe sees it (for a loop of your own)."""
        self._own_probe().on_grad_norm(norm)

    # -------------------------------------------------------------------------------------------- decisions
    def _scaler_active(self) -> bool:
        return _trainer_compat.fp16_scaler_active(self.trainer)

    def _judge(
        self,
        verdict: StepVerdict,
        args: Any,
        control: Any,
        *,
        before_update: bool,
        optimizer: Any = None,
        detected_at: int | None = None,
    ) -> None:
        """Decide on one step's (already rank-consistent) flags: fine, scaler skip, tolerated, or ``action``."""
        if verdict.empty:
            self._empty_since_log = True
        if not verdict.bad:
            self._patience.update(False)
            self._scaler_streak.update(False)
            self._warned_streak = False
            return
        self._nonfinite_since_log = True
        scaler = self._scaler_active()
        if scaler and not verdict.loss_bad:
            # The GradScaler found inf/NaN gradients and skips this update on purpose, then lowers the scale.
            self.scaler_skipped_steps += 1
            if not self._scaler_streak.update(True):
                return
            streak = self._scaler_streak.streak
            detail = f"the fp16 loss scaler skipped {streak} steps in a row: the loss scale has collapsed"
            finding, drop_grads = finding_from_verdict(verdict, "grad_norm", detail=detail), False
        else:
            finding = finding_from_verdict(verdict, "loss" if verdict.loss_bad else "grad_norm")
            self.findings.append(finding)
            drop_grads = not scaler
            if not self._patience.update(True):
                # Tolerated: drop the gradients so the optimizer leaves the weights as they were (a loss scaler
                # skips a step with a non-finite loss by itself).
                if before_update and not scaler:
                    self._drop_gradients(optimizer)
                skipped = before_update or scaler
                self.skipped_steps += int(skipped)
                if distributed.is_main_process():
                    self.alert(
                        "warning",
                        f"{finding_headline(finding)}; {'update skipped' if skipped else 'tolerated'} "
                        f"({self._patience.streak} of {self.patience} tolerated in a row)",
                        step=finding.step,
                        evidence=finding_evidence(finding),
                    )
                return
        self._act(
            finding,
            args,
            control,
            before_update=before_update,
            optimizer=optimizer,
            drop_grads=drop_grads,
            detected_at=detected_at,
        )

    _drop_gradients = staticmethod(drop_gradients)

    def _act(
        self,
        finding: NonFiniteFinding,
        args: Any,
        control: Any,
        *,
        before_update: bool,
        optimizer: Any = None,
        drop_grads: bool = True,
        detected_at: int | None = None,
    ) -> None:
        first = self.tripped is None
        if first:
            self.tripped = finding
        if finding not in self.findings:
            self.findings.append(finding)
        # Every rank takes the same action; rank 0 and the rank that saw the value (which alone knows it) report.
        report = distributed.is_main_process() or finding.rank == distributed.rank()
        output_dir = getattr(args, "output_dir", None)
        if self.action == "warn":
            if not self._warned_streak and report:
                self._warned_streak = True
                text = finding_message(finding, action="warn", output_dir=output_dir, detected_at=detected_at)
                self.alert("error", text, step=finding.step, evidence=finding_evidence(finding))
            return
        why, (step, event) = f"non-finite value at step {finding.step}", self._now
        self.veto_save(control, why, step=step, event=event, skip_evaluation=True)
        if self.action == "stop":
            self.request_stop(control, why, step=step, event=event)
            if before_update and drop_grads:
                self._drop_gradients(optimizer)  # the in-memory model keeps the last finite weights
            if first and report:
                text = finding_message(finding, action="stop", output_dir=output_dir, detected_at=detected_at)
                evidence = stop_evidence(finding, output_dir=output_dir, weights_in_memory=self._weights_in_memory())
                self.alert("error", text, step=finding.step, evidence=evidence)
            return
        weights = self._weights_in_memory()
        error = nonfinite_error(
            finding, action=self.action, output_dir=output_dir, detected_at=detected_at, weights_in_memory=weights
        )
        if report:
            self.alert("error", error.what, step=finding.step, evidence=error.evidence, raised=True)
        raise error

    def _weights_in_memory(self) -> str | None:
        """``"finite"`` or ``"non-finite"`` for this rank's weights (one pass, on the failure path only)."""
        model = getattr(self.trainer, "model", None)
        if model is None:
            return None
        try:
            return "non-finite" if nonfinite_parameters(model.named_parameters(), limit=1) else "finite"
        except Exception:  # a sharded or offloaded parameter that cannot be read here: say nothing
            return None

    # ----------------------------------------------------------------------------------------------- events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        if self._alerter is None or self.trainer is None:
            self._attach(args)  # added with trainer.add_callback(): on_init_end never reached this guard
        import torch

        device = getattr(args, "device", None) or torch.device("cpu")
        device_type = getattr(device, "type", "cpu")
        self._sync_now = self.sync if self.sync is not None else (device_type == "cpu" or self.patience > 0)
        trainer = self.trainer or find_trainer()
        if trainer is not None:
            # The process group exists by now (the Trainer's accelerator made it). A new train() (or
            # auto_find_batch_size re-running the loop after an OOM) starts clean; findings stay.
            self._install(trainer, device)
            self._update_pending = _trainer_compat.engine_layout(trainer) != "deepspeed"
        elif distributed.is_main_process():
            self.alert(
                "warning",
                "could not reach the Trainer: falling back to the logged loss and grad_norm (checked only at "
                "logging steps, after the update)",
            )
        self._current = None
        self._pending = None
        self.tripped = None
        self._patience.streak = 0
        self._scaler_streak.streak = 0
        self._warned_streak = False
        return control

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        self._now = (int(state.global_step), "on_pre_optimizer_step")
        if not self._hooked or self._probe is None:
            return control
        flags = self._probe.take(state.global_step + 1)
        if not self._sync_now:
            self._current = flags  # read at on_step_end, or one step later
            return control
        values = flags.values
        if values is not None and not (values[0] or values[1] or values[2]):
            # The common step on the CPU: every value seen on the host, all finite. Nothing to judge.
            self._patience.streak = self._scaler_streak.streak = 0
            self._warned_streak = False
            return control
        verdict = self._probe.read(flags)
        # Under DeepSpeed the engine already stepped inside backward: nothing is left to skip or prevent.
        self._judge(verdict, args, control, before_update=self._update_pending, optimizer=kwargs.get("optimizer"))
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        self._now = (int(state.global_step), "on_step_end")
        if self._hooked and not self._sync_now and self._probe is not None:
            probe, previous, self._pending = self._probe, self._pending, None
            if previous is not None:
                self._judge(
                    probe.read(previous), args, control, before_update=False, detected_at=int(state.global_step)
                )
            current, self._current = self._current, None
            if current is not None and (
                control.should_save
                or control.should_evaluate
                or control.should_training_stop
                or (state.max_steps and state.global_step >= state.max_steps)
            ):
                # A save (or the end, where the user's script saves) is coming: it synchronises anyway.
                self._judge(probe.read(current), args, control, before_update=False)
            else:
                self._pending = current
        if self.tripped is not None or control.should_save:
            self._guard_save(args, state, control, kwargs.get("model"))
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        self._now = (int(state.global_step), "on_epoch_end")
        if self._pending is not None and (control.should_save or control.should_evaluate):
            self._judge_pending(args, state, control)
        self._guard_save(args, state, control, kwargs.get("model"))
        return control

    def _judge_pending(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        previous, self._pending = self._pending, None
        if previous is not None and self._probe is not None:
            verdict = self._probe.read(previous)
            self._judge(verdict, args, control, before_update=False, detected_at=int(state.global_step))

    def _guard_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any) -> None:
        if self.tripped is not None and self.action != "warn":
            # on_step_end / on_epoch_end of DefaultFlowCallback ran before us and may have scheduled a save.
            why, (step, event) = f"non-finite value at step {self.tripped.step}", self._now
            self.veto_save(control, why, step=step, event=event, skip_evaluation=True)
            self.request_stop(control, why, step=step, event=event)
            return
        if not (self.check_params_on_save and control.should_save and model is not None):
            return
        names = nonfinite_parameters(model.named_parameters())
        bad = bool(names)
        if self._sharded():
            # Sharded weights differ per rank. should_save is rank-consistent (the sharded save itself is a
            # collective), so every rank reaches this collective at the same step.
            bad = distributed.any_rank(bad)
        if bad:
            finding = finding_from_parameters(int(state.global_step), names, distributed.rank())
            self._act(finding, args, control, before_update=False)

    def _sharded(self) -> bool:
        trainer = self.trainer
        return distributed.is_distributed() and _trainer_compat.engine_layout(trainer) != "plain"

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        self._now = (int(state.global_step), "on_evaluate")
        metrics = kwargs.get("metrics") or {}
        if not self.check_eval or not metrics:
            return control
        # Evaluation metrics are gathered over all ranks, so every rank sees the same values: no collective.
        bad = nonfinite_metrics(metrics)
        if bad:
            finding = finding_from_metrics(int(state.global_step), bad)
            self.findings.append(finding)
            self._act(finding, args, control, before_update=False)
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        self._now = (int(state.global_step), "on_log")
        logs = kwargs.get("logs") or {}
        if "loss" not in logs:
            return control
        if not self._hooked and self.tripped is None:
            # Fallback without hooks: grad_norm is never filtered; a NaN loss may show as 0.0 with the filter on.
            for key in ("grad_norm", "loss"):
                value = logs.get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    finding = NonFiniteFinding(
                        step=int(state.global_step), field=key, value=float(value), detail="from the logged value"
                    )
                    self._act(finding, args, control, before_update=False)
                    return control
        loss = logs.get("loss")
        nonfinite, empty = self._nonfinite_since_log, self._empty_since_log
        self._nonfinite_since_log = self._empty_since_log = False
        if nonfinite:
            # The logged loss of a non-finite step is the filter's substitute (often 0.0): not a real loss.
            return control
        if empty and isinstance(loss, (int, float)) and not math.isfinite(loss):
            loss = 0.0  # steps without label tokens, logged as 0/0 because logging_nan_inf_filter is off
        if isinstance(loss, (int, float)):
            for event in self.loss_health.update(float(loss), step=int(state.global_step)):
                if distributed.is_main_process():
                    self.alert(
                        "warning", event.message, step=event.step, evidence={"kind": event.kind, **event.evidence}
                    )
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        if self._pending is not None:
            # Training ended between two reads (another callback stopped it): read the last step now, so a
            # script that saves after train() does not save a poisoned model unwarned.
            try:
                self._judge_pending(args, state, control)
            finally:
                super().on_train_end(args, state, control, **kwargs)
            return control
        return super().on_train_end(args, state, control, **kwargs)

    def on_train_error(self, trainer: Any, exc: BaseException) -> None:
        if isinstance(exc, NonFiniteError) and self._alerter is not None:
            self._alerter.close()
