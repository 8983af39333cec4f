"""The base every trainguard callback stands on: alert plumbing and access to the owning Trainer."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from transformers import TrainerCallback

from .. import distributed
from ..alerts import Alert, Alerter, AlertSink, CounterSink, WebhookSink, default_sinks, get_logger
from ..checks._layout import RECORD_PATTERNS
from ..errors import TrainGuardError, at_call_site
from ._trainer_compat import find_trainer, install_upload_filter

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["GuardCallback", "find_trainer", "install_train_hook"]

_HOOK_MARK = "_trainguard_train_hook"


def install_train_hook(trainer: Any) -> None:
    """Wrap ``trainer.train`` (on this instance only, once) so that every attached :class:`GuardCallback` gets
    :meth:`GuardCallback.before_train` before the Trainer loads a checkpoint,
    :meth:`GuardCallback.after_train` when training returns (then trains again from the checkpoint a
    :meth:`GuardCallback.rerun_request` names, if one does), and
    :meth:`GuardCallback.on_train_error` when training raises (the Trainer has no ``on_exception`` event).

    One wrapper serves every guard, whatever their number, and the user's code still calls ``trainer.train(...)``.
    A :class:`~trainguard.errors.TrainGuardError` leaves it with its traceback cut to this frame
    (:func:`~trainguard.errors.at_call_site`): the refusal's message is the news, not trainguard's frames. Any other
    exception leaves exactly as it came.
    """
    if getattr(trainer, _HOOK_MARK, False):
        return
    original = trainer.train

    @functools.wraps(original)
    def train(resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        try:
            for callback in list(trainer.callback_handler.callbacks):
                if isinstance(callback, GuardCallback):
                    resume_from_checkpoint = callback.before_train(trainer, resume_from_checkpoint)
        except TrainGuardError as exc:
            raise at_call_site(exc)  # noqa: B904 - trainguard refused: the message below says why
        try:
            output = original(resume_from_checkpoint, *args, **kwargs)
        except BaseException as exc:
            for callback in list(trainer.callback_handler.callbacks):
                if isinstance(callback, GuardCallback):
                    try:
                        callback.on_train_error(trainer, exc)
                    except Exception as hook_exc:  # the training error is what the user must see
                        get_logger().warning(
                            "trainguard %s.on_train_error failed: %s", type(callback).__name__, hook_exc
                        )
            _report_stop(trainer, exc)
            if isinstance(exc, TrainGuardError):
                raise at_call_site(exc)  # noqa: B904 - trainguard refused: the message below says why
            raise  # anything else leaves exactly as it came (rule 0)
        try:
            for callback in list(trainer.callback_handler.callbacks):
                if isinstance(callback, GuardCallback):
                    callback.after_train(trainer, output)
        except TrainGuardError as exc:
            _report_stop(trainer, exc)
            raise at_call_site(exc)  # noqa: B904 - trainguard refused: the message below says why
        for callback in list(trainer.callback_handler.callbacks):
            if isinstance(callback, GuardCallback):
                again = callback.rerun_request(trainer)
                if again is not None:
                    # A guard stopped the run to train again from a checkpoint (SpikeGuard's rollback): the same
                    # path as the user calling train(resume_from_checkpoint=...), every before_train check included.
                    return train(again, *args, **kwargs)
        return output

    trainer.train = train
    setattr(trainer, _HOOK_MARK, True)


def _report_stop(trainer: Any, exc: BaseException) -> None:
    """A guard stopped the run: mark the W&B / MLflow run failed (a no-op unless the process uses them)."""
    if isinstance(exc, TrainGuardError):
        from ..integrations.reporting import report_stop  # never raises

        report_stop(trainer, exc)


class GuardCallback(TrainerCallback):
    """Base class of trainguard callbacks: sets up alert sinks at ``on_init_end`` and offers :meth:`alert`.

    Args:
        alert_sinks: Replace the default sinks (logger, ``trainguard-events.jsonl`` in ``output_dir``, the
            trackers' counters and W&B alerts, and a webhook when ``webhook_url`` or ``TRAINGUARD_WEBHOOK_URL`` is
            set). None of them writes into ``state.log_history`` or fires ``on_log``.
        webhook_url: Also POST warnings and worse to this URL.
    """

    #: The guard's name in alerts, logs and ``trainguard/<name>/...`` log keys.
    guard_name: ClassVar[str] = "guard"

    def __init__(
        self,
        *,
        alert_sinks: Sequence[AlertSink] | None = None,
        webhook_url: str | None = None,
    ) -> None:
        if webhook_url is not None and not isinstance(webhook_url, str):  # e.g. a number from a configuration file
            raise TypeError(f"{type(self).__name__}(webhook_url=...) must be a URL string, not {webhook_url!r}")
        self._alert_sinks = list(alert_sinks) if alert_sinks is not None else None
        self._webhook_url = webhook_url
        self._alerter: Alerter | None = None
        self._trainer_ref: weakref.ReferenceType[Any] | None = None

    # ----------------------------------------------------------------------------------------------- wiring
    @property
    def trainer(self) -> Any:
        """The Trainer this callback was attached to, when it could be found at ``on_init_end``."""
        return self._trainer_ref() if self._trainer_ref is not None else None

    @property
    def alerter(self) -> Alerter:
        if self._alerter is None:
            sinks = self._alert_sinks if self._alert_sinks is not None else default_sinks(webhook_url=self._webhook_url)
            self._alerter = Alerter(sinks)
        return self._alerter

    def _attach(self, args: Any) -> None:
        trainer = find_trainer()
        if trainer is not None:
            self._trainer_ref = weakref.ref(trainer)
        if self._alert_sinks is None and trainer is not None:
            # One alerter per Trainer, shared by every guard on it: one event-file writer, one webhook queue, one
            # tracker counter, so the reported trainguard/alerts is the run's count.
            shared = _shared_alerter(trainer, args)
            if self._webhook_url:  # this guard's own webhook, beside the shared sinks
                self._alerter = Alerter([_Forward(shared), WebhookSink(self._webhook_url)])
            else:
                self._alerter = shared
            return
        if self._alert_sinks is not None:
            sinks: list[AlertSink] = list(self._alert_sinks)
        else:
            sinks = default_sinks(getattr(args, "output_dir", None), webhook_url=self._webhook_url)
        for sink in sinks:
            if isinstance(sink, CounterSink) and trainer is not None and sink.trainer is None:
                sink.bind(trainer)
        self._alerter = Alerter(sinks)

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        from ..config import disabled

        if disabled():  # the kill switch empties all_guards(); a guard built in code is the user's explicit choice
            get_logger().warning(
                "TRAINGUARD_DISABLE is set; %s was constructed in code and stays active", type(self).__name__
            )
        self._attach(args)
        if self.trainer is not None:
            install_train_hook(self.trainer)
            # Records naming hosts, PIDs, command lines and alerts, and set-aside checkpoints, live in output_dir,
            # which push_to_hub=True uploads whole (less "_*" and "checkpoint-*"): keep them off the Hub.
            for feature in install_upload_filter(self.trainer, RECORD_PATTERNS):
                get_logger().warning("trainguard: %s is off on this transformers version", feature)
        return control

    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> Any:
        """Run inside ``trainer.train()`` before the Trainer resolves or loads anything; return the
        (possibly changed) ``resume_from_checkpoint``.

        This is the only point where a guard can act before a resumed checkpoint's weights, optimizer and
        ``trainer_state.json`` are loaded (they load before ``on_train_begin``). It runs on every rank, in callback
        order. The default does nothing.
        """
        return resume_from_checkpoint

    def after_train(self, trainer: Any, output: Any) -> None:
        """Run when ``trainer.train()`` has returned normally, after every callback's ``on_train_end``.

        A guard that stopped the run on purpose raises its error here, so the user's script does not go on to save
        or push the model, while the Trainer and every other callback still finished cleanly. The default does
        nothing.
        """

    def rerun_request(self, trainer: Any) -> Any:
        """Asked once after ``train()`` returned and every ``after_train`` ran: a checkpoint to train again from at
        once (the same ``train()`` call continues from it), or None (default). Every rank must answer alike."""
        return None

    def on_train_error(self, trainer: Any, exc: BaseException) -> None:
        """Run when ``trainer.train()`` raises (``on_train_end`` does not run then), on the rank that raised, in
        callback order, before the exception propagates unchanged. ``KeyboardInterrupt`` and ``SystemExit`` come
        here too. The default does nothing; an exception from this hook is logged, never raised.
        """

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        if self._alerter is not None:
            self._alerter.close()
        return control

    def manifest_record(self) -> Mapping[str, Any] | None:
        """Facts this guard commits with every checkpoint saved from now on, or None (default).

        :class:`~trainguard.CheckpointVerifier` puts them into the checkpoint's manifest (lineage record, key
        ``"guards"`` → this guard's name), which the commit marker hashes: what a later resume reads back from there
        is what the run committed, not a line anyone could append to a log beside it. Called on the writing rank at
        every save; return new JSON-able values (they are written on a background thread)."""
        return None

    def wait_for_other_guards(self, trainer: Any) -> None:
        """Block until every other attached guard's background work is on disk (CheckpointVerifier: the manifests
        of the saves so far), so a checkpoint just saved can be verified or named. Call it on every rank alike."""
        for callback in list(getattr(getattr(trainer, "callback_handler", None), "callbacks", []) or []):
            wait = getattr(callback, "wait", None)
            if callback is not self and isinstance(callback, GuardCallback) and callable(wait):
                wait()

    def summary(self) -> str:
        """One line on what this guard checked in the run so far (guards override it with their specifics), true
        when it is read; ``""`` when there is nothing to tell (a report of the run leaves the guard out)."""
        history = self._alerter.history if self._alerter is not None else []
        alerts = sum(1 for a in history if a.guard == self.guard_name)
        return f"{alerts} alert(s)" if alerts else ""

    # ------------------------------------------------------------------------------------------------ refusals
    def refuse_together(
        self,
        error: BaseException | None,
        *,
        placeholder: Callable[[], BaseException],
        alert_level: str | None = "error",
        alert_placeholder: bool = False,
        step: int | None = None,
    ) -> None:
        """Raise on every rank when any rank found a reason to refuse; return on every rank when none did.

        Every rank must call it at the same point (it is a collective). A rank with its own ``error`` raises it and
        alerts it (``alert_level``; None: no alert); a rank that found nothing raises ``placeholder()``, which says
        another rank refused (and alerts it only with ``alert_placeholder``). So no rank is left waiting in a
        collective the others never reach.
        """
        if not distributed.any_rank(error is not None):
            return
        if error is None:
            error = placeholder()
            if not alert_placeholder:
                raise error
        if alert_level is not None:
            what = getattr(error, "what", str(error))
            self.alert(alert_level, what, step=step, evidence=getattr(error, "evidence", None), raised=True)
        raise error

    # ------------------------------------------------------------------------------------------------ alerts
    def alert(
        self,
        level: str,
        message: str,
        *,
        step: int | None = None,
        evidence: Mapping[str, Any] | None = None,
        raised: bool = False,
    ) -> Alert:
        """Send an alert from this guard through every sink and return it. ``raised=True``: the guard raises the
        same finding as its error next, so the console shows it once, in the error (see ``Alert.raised``)."""
        return self.alerter.emit(
            Alert(
                guard=self.guard_name,
                level=level,
                message=message,
                step=step,
                rank=distributed.rank(),
                evidence=dict(evidence or {}),
                raised=raised,
            )
        )


_SHARED_ALERTER = "_trainguard_alerter"


def _shared_alerter(trainer: Any, args: Any) -> Alerter:
    """The alerter every guard with default sinks shares on ``trainer`` (made by the first one attached): the
    logger, the JSONL event file, the ``TRAINGUARD_WEBHOOK_URL`` webhook if set, and, unless
    ``TRAINGUARD_REPORTING=0``, the alert counters in W&B / MLflow / TensorBoard and W&B alerts (through the
    trackers' own APIs: never ``trainer.log``, so ``log_history`` and ``on_log`` stay the plain run's)."""
    shared = getattr(trainer, _SHARED_ALERTER, None)
    if isinstance(shared, Alerter):
        return shared
    sinks = default_sinks(getattr(args, "output_dir", None))
    from ..integrations.reporting import TrackerCounterSink, WandbAlertSink, reporting_enabled

    if reporting_enabled():
        # Neither imports a tracker; each reports only to trackers the process already runs.
        sinks.append(TrackerCounterSink(trainer))
        sinks.append(WandbAlertSink())
    shared = Alerter(sinks)
    setattr(trainer, _SHARED_ALERTER, shared)
    return shared


class _Forward:
    """A sink that hands alerts to another alerter (a guard with a webhook of its own, beside the shared one)."""

    def __init__(self, alerter: Alerter) -> None:
        self.alerter = alerter

    def send(self, alert: Alert) -> None:
        self.alerter.emit(alert)

    def flush(self) -> None:
        self.alerter.flush()
