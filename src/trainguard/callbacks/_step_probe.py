"""The one step probe of a Trainer: ``training_step`` and the gradient norm wrapped once, whatever guards listen.

:class:`~trainguard.NanGuard`, :class:`~trainguard.SpikeGuard` and :class:`~trainguard.CheckpointVerifier` all need
to see each micro-batch (its inputs before the forward pass, its raw loss after it) and the gradient norm the Trainer
computes, none of which reaches a callback event. Instead of one wrapper (and one all-reduce) per guard, the probe is
installed once per Trainer (through :func:`~._trainer_compat.install_step_hooks`, the seam) and guards subscribe:

- ``before_step``: called with ``training_step``'s arguments before the forward pass (references only: the hot path);
- ``values=True``: the probe collects every micro-batch's loss, the gradient norm and their finiteness in one
  :class:`~trainguard.checks.nan.StepFlagCollector`; the first guard that calls :meth:`StepProbe.take` for an
  optimizer step shares them across ranks in **one** all-reduce, and every guard reads that same record.

One sync policy: when any subscriber reads its step before the update (``sync=True``), :meth:`StepProbe.read`
synchronises once and the others read the same numbers; when none does, :meth:`StepProbe.take` queues one
asynchronous host copy behind the step's work (pinned buffer and a CUDA event) and every guard reads it a step later,
so an accelerator is never synchronised per step. On the CPU every value is already on the host and one process does
no tensor op at all.

Example::

    probe = StepProbe()       # install_step_probe(trainer) makes a Trainer's one probe and wraps it, once
    probe.subscribe("my guard", values=True, sync=True, mean_loss=True)
    probe.on_loss(2.0, (), {}); probe.on_loss(3.0, (), {}); probe.on_grad_norm(1.5)   # what the wrappers call
    verdict = probe.read(probe.take(1))                   # in on_pre_optimizer_step of step 1
    assert (verdict.mean_loss, verdict.grad_value, verdict.bad) == (2.5, 1.5, False)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..checks.nan import StepFlagCollector, StepFlags, StepVerdict, process_topology
from . import _trainer_compat

__all__ = ["StepProbe", "install_step_probe"]

BeforeStep = Callable[[tuple[Any, ...], dict[str, Any]], None]

#: Micro-batch losses held for one optimizer step at most (a loop that never reaches ``take`` holds no more).
_MAX_HELD = 1024

_ATTRIBUTE = "_trainguard_step_probe"  # trainguard's own attribute on the instance, not a Trainer internal


@dataclass(frozen=True)
class _Subscription:
    before_step: BeforeStep | None
    values: bool
    sync: bool
    mean_loss: bool
    device_flags: bool


class StepProbe:
    """One Trainer's step probe (see the module docstring). Made by :func:`install_step_probe`, never directly.

    Attributes:
        collector: This step's observations (a new one per ``train()``, from :meth:`begin`).
        missing: The features the Trainer's transformers version does not offer (by name), for a subscriber's log.
    """

    def __init__(self) -> None:
        self.collector = StepFlagCollector()
        self.missing: list[str] = []
        self._subscriptions: dict[int, tuple[object, _Subscription]] = {}
        self._before: tuple[BeforeStep, ...] = ()
        self._collect = False
        self._sync = True
        self._last: StepFlags | None = None

    # ------------------------------------------------------------------------------------------- subscribers
    def subscribe(
        self,
        owner: object,
        *,
        before_step: BeforeStep | None = None,
        values: bool = False,
        sync: bool = False,
        mean_loss: bool = False,
        device_flags: bool = False,
    ) -> list[str]:
        """Subscribe ``owner`` (again: its options are replaced).

        Args:
            owner: The guard.
            before_step: Called with ``training_step``'s ``(args, kwargs)`` before each micro-batch's forward pass.
            values: Collect losses, the gradient norm and their finiteness for :meth:`take`.
            sync: The owner reads each step before its update (so reading synchronises anyway).
            mean_loss: The owner needs the mean loss over ranks (:attr:`StepVerdict.mean_loss`).
            device_flags: Keep flags as device tensors even on the CPU (the accelerator path, for tests).

        Returns:
            The features that are off on this transformers version, by name.
        """
        self._subscriptions[id(owner)] = (owner, _Subscription(before_step, values, sync, mean_loss, device_flags))
        self._refresh()
        return list(self.missing) if values else []

    def unsubscribe(self, owner: object) -> None:
        """Stop calling ``owner``; with no value subscriber left the probe collects nothing."""
        self._subscriptions.pop(id(owner), None)
        self._refresh()

    def subscribers(self) -> list[object]:
        """The subscribed guards, in the order they subscribed."""
        return [owner for owner, _ in self._subscriptions.values()]

    def _refresh(self) -> None:
        subs = [sub for _, sub in self._subscriptions.values()]
        self._before = tuple(sub.before_step for sub in subs if sub.before_step is not None)
        self._collect = any(sub.values for sub in subs)
        # One sync policy: read at once when any value subscriber reads before the update, else copy asynchronously.
        self._sync = any(sub.sync for sub in subs if sub.values) or not self._collect
        self.collector.mean_loss = any(sub.mean_loss for sub in subs)
        self.collector.device_flags = any(sub.device_flags for sub in subs)

    # ---------------------------------------------------------------------------------------------- per run
    def begin(self, device: Any) -> None:
        """A new ``train()`` (or a re-run of the loop): an empty collector on ``device`` for the current ranks. Every
        value subscriber calls it at ``on_train_begin``, before the first micro-batch, so calling it twice is free."""
        world_size, rank, group = process_topology()
        old = self.collector
        self.collector = StepFlagCollector(
            device_flags=old.device_flags,
            device=device,
            world_size=world_size,
            rank=rank,
            group=group,
            mean_loss=old.mean_loss,
        )
        self._last = None

    def take(self, step: int) -> StepFlags:
        """Optimizer step ``step``'s record, shared across ranks: the first caller of a step makes the one all-reduce
        (every rank's first caller, so the collectives pair up) and queues the host copy; later callers get it too."""
        last = self._last
        if last is not None and last.step == step:
            return last
        flags = self.collector.take(step)
        if not self._sync:
            self.collector.start_copy(flags)
        self._last = flags
        return flags

    def read(self, flags: StepFlags) -> StepVerdict:
        """The verdict of ``flags`` (read once: every guard gets the same object)."""
        return self.collector.read(flags)

    # ---------------------------------------------------------------------------------------------- hot path
    # Both run on every micro-batch / step with cold caches, where Python costs several times its timeit figure: the
    # common case (a finite value on the CPU) is one .item() and a few attribute reads, inlined here (the label-token
    # count is not looked at for a finite loss); StepFlagCollector.observe_* handle every other case.
    def before_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for call in self._before:
            call(args, kwargs)

    def on_loss(self, loss: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._collect:
            return
        flags = self.collector
        if len(flags.losses) >= _MAX_HELD:
            del flags.losses[0]
        if not flags.device_flags and getattr(loss, "is_cpu", False) and loss.numel() == 1:
            value = loss.item()
            if math.isfinite(value):
                flags.losses.append(value)
                if flags.loss_bad is None:
                    flags.loss_bad = False
                return
        # training_step(model, inputs, num_items_in_batch): the label-token count the loss is divided by.
        flags.observe_loss(loss, kwargs.get("num_items_in_batch", args[2] if len(args) > 2 else None))

    def on_grad_norm(self, norm: Any) -> None:
        if not self._collect:
            return
        flags = self.collector
        if not flags.device_flags and getattr(norm, "is_cpu", False) and norm.numel() == 1:
            flags.grad_norm = value = norm.item()
            flags.grad_bad = not math.isfinite(value)
        else:
            flags.observe_grad_norm(norm)


def install_step_probe(trainer: Any) -> StepProbe:
    """``trainer``'s step probe: made and installed (``training_step`` and the gradient norm wrapped, on this
    instance only) on the first call, the same probe on every later one."""
    probe = getattr(trainer, _ATTRIBUTE, None)
    if not isinstance(probe, StepProbe):
        probe = StepProbe()
        probe.missing = _trainer_compat.install_step_hooks(
            trainer, probe, on_loss=probe.on_loss, on_grad_norm=probe.on_grad_norm, before_step=probe.before_step
        )
        setattr(trainer, _ATTRIBUTE, probe)
    return probe
