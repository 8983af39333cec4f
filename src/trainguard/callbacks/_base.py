"""The base every trainguard callback stands on: alert plumbing and access to the owning Trainer."""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any, ClassVar

from transformers import TrainerCallback

from .. import distributed
from ..alerts import Alert, Alerter, AlertSink, TrainerLogSink, default_sinks, get_logger

__all__ = ["GuardCallback", "find_trainer", "install_train_hook"]

_HOOK_MARK = "_trainguard_train_hook"


def find_trainer(max_depth: int = 12) -> Any:
    """The ``transformers.Trainer`` whose ``__init__`` (or method) is on the call stack, or None.

    Callback events do not receive the Trainer, and ``on_init_end`` is fired from ``Trainer.__init__``, so the
    instance is ``self`` a few frames up. Used once per run, never per step.
    """
    from transformers import Trainer

    frame: FrameType | None = sys._getframe(1)
    depth = 0
    while frame is not None and depth < max_depth:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
        depth += 1
    return None


def install_train_hook(trainer: Any) -> None:
    """Wrap ``trainer.train`` (on this instance only, once) so that every attached :class:`GuardCallback` gets
    :meth:`GuardCallback.before_train` before the Trainer loads a checkpoint,
    :meth:`GuardCallback.after_train` when training returns, and
    :meth:`GuardCallback.on_train_error` when training raises (the Trainer has no ``on_exception`` event).

    One wrapper serves every guard, whatever their number, and the user's code still calls ``trainer.train(...)``.
    """
    if getattr(trainer, _HOOK_MARK, False):
        return
    original = trainer.train

    @functools.wraps(original)
    def train(resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        for callback in list(trainer.callback_handler.callbacks):
            if isinstance(callback, GuardCallback):
                resume_from_checkpoint = callback.before_train(trainer, resume_from_checkpoint)
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
            raise
        for callback in list(trainer.callback_handler.callbacks):
            if isinstance(callback, GuardCallback):
                callback.after_train(trainer, output)
        return output

    trainer.train = train
    setattr(trainer, _HOOK_MARK, True)


class GuardCallback(TrainerCallback):
    """Base class of trainguard callbacks: sets up alert sinks at ``on_init_end`` and offers :meth:`alert`.

    Args:
        alert_sinks: Replace the default sinks (logger, the Trainer's log stream, ``trainguard-events.jsonl`` in
            ``output_dir``, and a webhook when ``webhook_url`` or ``TRAINGUARD_WEBHOOK_URL`` is set).
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
            sinks = self._alert_sinks if self._alert_sinks is not None else default_sinks(
                webhook_url=self._webhook_url
            )
            self._alerter = Alerter(sinks)
        return self._alerter

    def _attach(self, args: Any) -> None:
        trainer = find_trainer()
        if trainer is not None:
            self._trainer_ref = weakref.ref(trainer)
        if self._alert_sinks is not None:
            sinks: list[AlertSink] = list(self._alert_sinks)
        else:
            sinks = default_sinks(getattr(args, "output_dir", None), webhook_url=self._webhook_url)
        for sink in sinks:
            if isinstance(sink, TrainerLogSink) and trainer is not None and sink.trainer is None:
                sink.bind(trainer)
        self._alerter = Alerter(sinks)

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._attach(args)
        if self.trainer is not None:
            install_train_hook(self.trainer)
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

    def on_train_error(self, trainer: Any, exc: BaseException) -> None:
        """Run when ``trainer.train()`` raises (``on_train_end`` does not run then), on the rank that raised, in
        callback order, before the exception propagates unchanged. ``KeyboardInterrupt`` and ``SystemExit`` come
        here too. The default does nothing; an exception from this hook is logged, never raised.
        """

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._alerter is not None:
            self._alerter.close()
        return control

    def summary(self) -> str:
        """One line on what this guard checked in the run so far (guards override it with their specifics)."""
        n = len(self._alerter.history) if self._alerter is not None else 0
        return f"{n} alert(s)"

    # ------------------------------------------------------------------------------------------------ alerts
    def alert(
        self,
        level: str,
        message: str,
        *,
        step: int | None = None,
        evidence: Mapping[str, Any] | None = None,
    ) -> Alert:
        """Send an alert from this guard through every sink and return it."""
        return self.alerter.emit(
            Alert(
                guard=self.guard_name,
                level=level,
                message=message,
                step=step,
                rank=distributed.rank(),
                evidence=dict(evidence or {}),
            )
        )
