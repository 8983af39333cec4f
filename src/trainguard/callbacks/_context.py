"""The explicit protocol between the guards on one Trainer: one :class:`GuardContext` per Trainer.

Guards used to share ``TrainerControl`` as a blackboard, find each other's background work by duck typing, and read a
process global for the runs that are open. The context owns each of these instead, so a guard talks to it (typed
methods) and never to another guard:

- the shared :class:`~trainguard.alerts.Alerter` (the one redaction choke point: one event file, one webhook queue,
  one tracker counter per Trainer);
- background work: a guard that writes on a thread registers its ``wait`` (:meth:`GuardContext.add_background`);
  :meth:`GuardContext.wait_for_background` blocks until the others' work is on disk;
- open runs (:class:`~trainguard.checks.crash_loop.OpenRuns`): CrashLoopGuard opens and closes them, HangWatchdog
  records an abort into them, a hard exit marks them interrupted;
- save requests, save vetoes and stop requests (:meth:`request_save`, :meth:`veto_save`, :meth:`request_stop`),
  resolved here once per event: a veto wins over any request of the same event, whatever the callback order;
- each guard's :meth:`~trainguard.callbacks.GuardCallback.key_figures`, which reporting asks through
  :meth:`GuardContext.key_figures`;
- the guards' order (:func:`put_guards_in_order`): a hand-built callback list is put into ``all_guards()``'s order
  when the Trainer is built, with a log line naming the order.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._util import CONTEXT_ATTR
from ..alerts import Alerter, default_sinks
from ..checks.crash_loop import OpenRuns

if TYPE_CHECKING:
    from transformers import TrainerControl

__all__ = ["GuardContext", "SaveDecision", "context_of", "existing_context", "put_guards_in_order"]

_CONTEXT_ATTR = CONTEXT_ATTR  # trainguard's own attribute on the Trainer instance (no Trainer internal)
_LIVE: weakref.WeakSet[GuardContext] = weakref.WeakSet()  # for the hard exit, which ends every run of the process
_LIVE_LOCK = threading.Lock()


@dataclass(frozen=True)
class SaveDecision:
    """What the guards asked of one event (``step``, ``event``), and what it came to.

    Attributes:
        step: The global step of the event.
        event: The callback event (``"on_step_end"``, ``"on_epoch_end"``, ...).
        requests: ``(guard, reason)`` of each save request.
        vetoes: ``(guard, reason)`` of each save veto; any veto cancels the save.
        stops: ``(guard, reason)`` of each stop request.
    """

    step: int
    event: str
    requests: tuple[tuple[str, str], ...] = ()
    vetoes: tuple[tuple[str, str], ...] = ()
    stops: tuple[tuple[str, str], ...] = ()

    @property
    def save(self) -> bool | None:
        """True: a guard asked for a save and none vetoed; False: vetoed; None: the guards left it to the Trainer."""
        if self.vetoes:
            return False
        return True if self.requests else None

    @property
    def stop(self) -> bool:
        return bool(self.stops)


@dataclass
class _Pending:
    step: int
    event: str
    requests: list[tuple[str, str]] = field(default_factory=list)
    vetoes: list[tuple[str, str]] = field(default_factory=list)
    stops: list[tuple[str, str]] = field(default_factory=list)

    def frozen(self) -> SaveDecision:
        return SaveDecision(self.step, self.event, tuple(self.requests), tuple(self.vetoes), tuple(self.stops))


class GuardContext:
    """What the guards on one Trainer share. Get it with :func:`context_of`; a guard gets it as ``self.context``.

    Args:
        trainer: The Trainer, or None for a guard that could not find one (it then has a context of its own).
    """

    def __init__(self, trainer: Any = None) -> None:
        self._trainer_ref: weakref.ReferenceType[Any] | None = weakref.ref(trainer) if trainer is not None else None
        self._alerter: Alerter | None = None
        self._background: list[tuple[weakref.ReferenceType[Any], Callable[[], None]]] = []
        #: The runs started on this Trainer and not ended yet (CrashLoopGuard keeps it).
        self.open_runs = OpenRuns()
        self._pending: _Pending | None = None
        self._last: SaveDecision | None = None
        with _LIVE_LOCK:
            _LIVE.add(self)

    @property
    def trainer(self) -> Any:
        return self._trainer_ref() if self._trainer_ref is not None else None

    # --------------------------------------------------------------------------------------------- alerter
    def shared_alerter(self, output_dir: Any = None) -> Alerter:
        """The alerter every guard with default sinks shares (made by the first one that asks): the logger, the
        JSONL event file in ``output_dir``, the ``TRAINGUARD_WEBHOOK_URL`` webhook if set, and, unless
        ``TRAINGUARD_REPORTING=0``, the alert counters in W&B / MLflow / TensorBoard and W&B alerts (through the
        trackers' own APIs: never ``trainer.log``, so ``log_history`` and ``on_log`` stay the plain run's)."""
        if self._alerter is not None:
            return self._alerter
        sinks = default_sinks(output_dir)
        trainer = self.trainer
        if trainer is not None:
            from ..integrations.reporting import TrackerCounterSink, WandbAlertSink, reporting_enabled

            if reporting_enabled():  # neither imports a tracker; each reports only to trackers the process runs
                sinks.append(TrackerCounterSink(trainer))
                sinks.append(WandbAlertSink())
        self._alerter = Alerter(sinks)
        return self._alerter

    @property
    def alerter(self) -> Alerter | None:
        """The shared alerter, or None while no guard has asked for it."""
        return self._alerter

    # ------------------------------------------------------------------------------------- background work
    def add_background(self, owner: Any, wait: Callable[[], None]) -> None:
        """Register ``owner``'s background work: ``wait()`` blocks until it is on disk (idempotent per owner)."""
        self._background = [(ref, w) for ref, w in self._background if ref() is not None and ref() is not owner]
        self._background.append((weakref.ref(owner), wait))

    def wait_for_background(self, *, besides: Any = None) -> None:
        """Block until the background work of every registered owner other than ``besides`` is on disk, so a
        checkpoint just saved can be verified or named. Call it on every rank alike."""
        for ref, wait in list(self._background):
            owner = ref()
            if owner is not None and owner is not besides:
                wait()

    # ------------------------------------------------------------------------------------ saves and stops
    def _event(self, step: int, event: str) -> _Pending:
        pending = self._pending
        if pending is None or pending.step != step or pending.event != event:
            if pending is not None:
                self._last = pending.frozen()
            pending = self._pending = _Pending(int(step), event)
        return pending

    def request_save(
        self, control: TrainerControl, guard: str, reason: str, *, step: int, event: str, skip_evaluation: bool = False
    ) -> bool:
        """Ask for a checkpoint at this event; returns whether one will be written (False: a guard vetoed it).

        ``skip_evaluation``: cancel this event's evaluation too (it would spend the time the save needs, and with
        ``save_strategy="best"`` its result would overwrite ``should_save``)."""
        pending = self._event(step, event)
        pending.requests.append((guard, reason))
        if skip_evaluation:
            control.should_evaluate = False
        control.should_save = not pending.vetoes
        return bool(control.should_save)

    def veto_save(
        self, control: TrainerControl, guard: str, reason: str, *, step: int, event: str, skip_evaluation: bool = False
    ) -> None:
        """Cancel this event's save, also one a guard later in the list requests (``skip_evaluation``: and its
        evaluation)."""
        self._event(step, event).vetoes.append((guard, reason))
        control.should_save = False
        if skip_evaluation:
            control.should_evaluate = False

    def request_stop(self, control: TrainerControl, guard: str, reason: str, *, step: int, event: str) -> None:
        """Stop training after this event (the Trainer finishes the step, its save and ``on_train_end``)."""
        self._event(step, event).stops.append((guard, reason))
        control.should_training_stop = True

    def decision(self, step: int, event: str) -> SaveDecision:
        """What the guards asked of event ``(step, event)``: the current one or the one before it."""
        for candidate in (self._pending.frozen() if self._pending is not None else None, self._last):
            if candidate is not None and candidate.step == step and candidate.event == event:
                return candidate
        return SaveDecision(int(step), event)

    # ------------------------------------------------------------------------------------------ key figures
    def guards(self) -> list[Any]:
        """The trainguard guards attached to the Trainer, in callback order."""
        from ._base import GuardCallback

        handler = getattr(self.trainer, "callback_handler", None)
        return [cb for cb in list(getattr(handler, "callbacks", None) or []) if isinstance(cb, GuardCallback)]

    def key_figures(self) -> dict[str, Any]:
        """Every guard's key figures as ``{"trainguard/<guard>/<figure>": str | int | float}`` (read-only). A
        guard whose figures cannot be read is logged once and left out."""
        figures: dict[str, Any] = {}
        for guard in self.guards():
            if not guard.reports_figures:
                continue
            try:
                own = guard.key_figures()
            except Exception as exc:
                from ..integrations.reporting import warn_once  # the one "reports go on" warning, said once

                warn_once(f"read the key figures of {guard.guard_name}", exc)
                continue
            figures.update({f"trainguard/{guard.guard_name}/{key}": value for key, value in own.items()})
        return figures

    # ------------------------------------------------------------------------------------------- hard exit
    @staticmethod
    def mark_every_open_run_interrupted(reason: str) -> None:
        """Mark every run open in this process as interrupted (just before a deliberate hard exit, which ends
        them all), so a deliberate kill is never counted as a crash. Never raises."""
        with _LIVE_LOCK:
            contexts = list(_LIVE)
        for context in contexts:
            context.open_runs.mark_interrupted(reason)

    @staticmethod
    def open_run_ids() -> frozenset[str]:
        """The ids of the runs open in this process, on any Trainer (a start without an end that is one of them is
        still running, not dead)."""
        with _LIVE_LOCK:
            contexts = list(_LIVE)
        return frozenset(run_id for context in contexts for run_id in context.open_runs.ids())


def context_of(trainer: Any) -> GuardContext:
    """The one :class:`GuardContext` of ``trainer``, made on first use."""
    context = getattr(trainer, _CONTEXT_ATTR, None)
    if isinstance(context, GuardContext):
        return context
    context = GuardContext(trainer)
    setattr(trainer, _CONTEXT_ATTR, context)
    return context


def existing_context(trainer: Any) -> GuardContext | None:
    """``trainer``'s context when a guard made one, else None (for readers: nothing is attached to the Trainer)."""
    context = getattr(trainer, _CONTEXT_ATTR, None)
    return context if isinstance(context, GuardContext) else None


# ---------------------------------------------------------------------------------------------------- order
def put_guards_in_order(callbacks: Sequence[Any], order: Sequence[str]) -> list[Any] | None:
    """``callbacks`` with the guards named in ``order`` (by ``guard_name``) moved into that order, or None when
    they are in it already.

    Only the places the known guards hold change hands: every other callback (the Trainer's own, the user's, a
    guard of a name ``order`` lacks) keeps its place, and guards of one name keep their relative order.
    """
    rank: Mapping[str, int] = {name: i for i, name in enumerate(order)}
    slots = [i for i, cb in enumerate(callbacks) if getattr(cb, "guard_name", None) in rank]
    guards = [callbacks[i] for i in slots]
    ordered = sorted(guards, key=lambda cb: rank[cb.guard_name])
    if ordered == guards:
        return None
    result = list(callbacks)
    for i, cb in zip(slots, ordered, strict=True):
        result[i] = cb
    return result
