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
from ._context import GuardContext, context_of, put_guards_in_order
from ._trainer_compat import find_trainer, install_upload_filter, set_callback_order, wrap_train

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["GuardCallback", "find_trainer", "install_train_hook", "put_in_order"]


def install_train_hook(trainer: Any) -> None:
    """Route ``trainer.train`` (on this instance only, once, through the seam's :func:`wrap_train`) so that every
    attached :class:`GuardCallback` gets
    :meth:`GuardCallback.before_train` before the Trainer loads a checkpoint,
    :meth:`GuardCallback.after_train` when training returns (then trains again from the checkpoint a
    :meth:`GuardCallback.rerun_request` names, if one does), and
    :meth:`GuardCallback.on_train_error` when training raises (the Trainer has no ``on_exception`` event).

    One wrapper serves every guard, whatever their number, and the user's code still calls ``trainer.train(...)``.
    The guards are put into their working order first (a guard added with ``add_callback`` after the Trainer was
    built included). A :class:`~trainguard.errors.TrainGuardError` leaves it with its traceback cut to this frame
    (:func:`~trainguard.errors.at_call_site`): the refusal's message is the news, not trainguard's frames. Any other
    exception leaves exactly as it came.
    """
    wrap_train(trainer, functools.partial(_make_train, trainer))


def _guards_of(trainer: Any) -> list[GuardCallback]:
    return [cb for cb in list(trainer.callback_handler.callbacks) if isinstance(cb, GuardCallback)]


def _make_train(trainer: Any, original: Any) -> Any:
    def train(resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        put_in_order(trainer)
        try:
            for callback in _guards_of(trainer):
                resume_from_checkpoint = callback.before_train(trainer, resume_from_checkpoint)
        except TrainGuardError as exc:
            raise at_call_site(exc)  # noqa: B904 - trainguard refused: the message below says why
        try:
            output = original(resume_from_checkpoint, *args, **kwargs)
        except BaseException as exc:
            for callback in _guards_of(trainer):
                try:
                    callback.on_train_error(trainer, exc)
                except Exception as hook_exc:  # the training error is what the user must see
                    get_logger().warning("trainguard %s.on_train_error failed: %s", type(callback).__name__, hook_exc)
            _report_stop(trainer, exc)
            if isinstance(exc, TrainGuardError):
                raise at_call_site(exc)  # noqa: B904 - trainguard refused: the message below says why
            raise  # anything else leaves exactly as it came (rule 0)
        try:
            for callback in _guards_of(trainer):
                callback.after_train(trainer, output)
        except TrainGuardError as exc:
            _report_stop(trainer, exc)
            raise at_call_site(exc)  # noqa: B904 - trainguard refused: the message below says why
        for callback in _guards_of(trainer):
            again = callback.rerun_request(trainer)
            if again is not None:
                # A guard stopped the run to train again from a checkpoint (SpikeGuard's rollback): the same path
                # as the user calling train(resume_from_checkpoint=...), every before_train check included.
                return train(again, *args, **kwargs)
        return output

    return train


def put_in_order(trainer: Any) -> None:
    """Put the guards attached to ``trainer`` into ``all_guards()``'s order (the order their protocol needs: see
    ``callbacks/__init__.py``), saying so once on the ``trainguard`` logger when a hand-built list was not in it."""
    from . import _GUARDS

    names = [keyword for keyword, _target in _GUARDS]
    callbacks = list(trainer.callback_handler.callbacks)
    ordered = put_guards_in_order(callbacks, names)
    if ordered is None:
        return
    before = [cb.guard_name for cb in callbacks if isinstance(cb, GuardCallback)]
    after = [cb.guard_name for cb in ordered if isinstance(cb, GuardCallback)]
    set_callback_order(trainer, ordered)
    get_logger().warning(
        "trainguard: the guards run in this order, which their checks rely on: %s (the callback list had %s)",
        ", ".join(after),
        ", ".join(before),
    )


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
        self._own_context: GuardContext | None = None

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

    @property
    def context(self) -> GuardContext:
        """What the guards on this guard's Trainer share (:class:`~trainguard.callbacks._context.GuardContext`): a
        context of its own while no Trainer was found."""
        trainer = self.trainer
        if trainer is not None:
            return context_of(trainer)
        if self._own_context is None:
            self._own_context = GuardContext()
        return self._own_context

    def _attach(self, args: Any) -> None:
        trainer = find_trainer()
        if trainer is not None:
            self._trainer_ref = weakref.ref(trainer)
        if self._alert_sinks is None and trainer is not None:
            # One alerter per Trainer, owned by its context and shared by every guard on it: one event-file writer,
            # one webhook queue, one tracker counter, so the reported trainguard/alerts is the run's count.
            shared = self.context.shared_alerter(getattr(args, "output_dir", None))
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
            put_in_order(self.trainer)  # before any training event: every later event reaches the guards in order
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

    def wait_for_other_guards(self) -> None:
        """Block until every other guard's background work registered with the context is on disk
        (CheckpointVerifier: the manifests of the saves so far), so a checkpoint just saved can be verified or
        named. Call it on every rank alike."""
        self.context.wait_for_background(besides=self)

    def summary(self) -> str:
        """One line on what this guard checked in the run so far (guards override it with their specifics), true
        when it is read; ``""`` when there is nothing to tell (a report of the run leaves the guard out)."""
        history = self._alerter.history if self._alerter is not None else []
        alerts = sum(1 for a in history if a.guard == self.guard_name)
        return f"{alerts} alert(s)" if alerts else ""

    #: Whether reporting publishes this guard's :meth:`key_figures` (RunReporter, which publishes them, does not).
    reports_figures: ClassVar[bool] = True

    def key_figures(self) -> dict[str, Any]:
        """The few figures of this guard worth seeing beside the loss, as ``{figure: str | int | float}``, read
        (never written) from its state; reporting publishes them as ``trainguard/<guard_name>/<figure>``. The base
        gives the :meth:`summary` line when there is one (a "not a PEFT model" row would only be noise)."""
        line = str(self.summary())
        return {"summary": line} if line else {}

    # ------------------------------------------------------------------------------------- saves and stops
    def request_save(self, control: TrainerControl, reason: str, *, step: int, event: str, **how: Any) -> bool:
        """Ask the context for a checkpoint at this event (see :meth:`GuardContext.request_save`)."""
        return self.context.request_save(control, self.guard_name, reason, step=step, event=event, **how)

    def veto_save(self, control: TrainerControl, reason: str, *, step: int, event: str, **how: Any) -> None:
        """Cancel this event's save, whatever asks for it (see :meth:`GuardContext.veto_save`)."""
        self.context.veto_save(control, self.guard_name, reason, step=step, event=event, **how)

    def request_stop(self, control: TrainerControl, reason: str, *, step: int, event: str) -> None:
        """Stop training after this event (see :meth:`GuardContext.request_stop`)."""
        self.context.request_stop(control, self.guard_name, reason, step=step, event=event)

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


class _Forward:
    """A sink that hands alerts to another alerter (a guard with a webhook of its own, beside the shared one)."""

    def __init__(self, alerter: Alerter) -> None:
        self.alerter = alerter

    def send(self, alert: Alert) -> None:
        self.alerter.emit(alert)

    def flush(self) -> None:
        self.alerter.flush()
