"""One optimizer step's non-finite flags: collected per micro-batch, shared across ranks, read without a stall.

:class:`StepFlagCollector` holds what one step has seen so far (each micro-batch's loss, the gradient norm) and
turns it into a :class:`StepVerdict` that every rank agrees on:

1. :meth:`~StepFlagCollector.observe_loss` / :meth:`~StepFlagCollector.observe_grad_norm`, per micro-batch and per
   step. A value on the host (CPU training) is read at once (``float``: cheaper than any tensor op); a value on an
   accelerator only queues a device op (:func:`~.values.nonfinite_flag`), so nothing synchronises.
2. :meth:`~StepFlagCollector.take`, once per optimizer step on every rank: the flags become one int32 vector
   ``[loss_bad, grad_bad, empty, loss rank code, grad rank code]``, all-reduced (MAX) when several ranks take part,
   as a :class:`StepFlags`; the collector is then empty for the next step.
3. :meth:`~StepFlagCollector.start_copy` (optional): queue the device-to-host copy of a device vector behind the
   step's work (pinned buffers and a CUDA event), so that a later :meth:`~StepFlagCollector.read` waits for that step
   only.
4. :meth:`~StepFlagCollector.read`: the :class:`StepVerdict`: what went bad, on which rank first, and what this rank
   saw (for the message).

Plain inputs only: whether to keep flags on the device, the device, world size, rank and process group (see
:func:`process_topology`). Nothing here knows about the Trainer.

Example::

    # not run here: a sketch of your own CUDA training loop (step, micro_batches, model and global_step are yours)
    world_size, rank, group = process_topology()
    flags = StepFlagCollector(device=torch.device("cuda"), world_size=world_size, rank=rank, group=group)
    for batch in micro_batches:
        loss = step(batch); flags.observe_loss(loss)
    flags.observe_grad_norm(clip_grad_norm_(model.parameters(), 1.0))
    verdict = flags.read(flags.take(step=global_step + 1))
    if verdict.bad:
        raise SystemExit(verdict)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ... import distributed
from .values import nonfinite_flag

__all__ = ["StepFlagCollector", "StepFlags", "StepVerdict", "process_topology"]


@dataclass
class StepFlags:
    """What one optimizer step left behind: the flags and the values behind them (for the message)."""

    step: int
    # [loss_bad, grad_bad, empty, loss rank code, grad rank code] all-reduced (MAX) across ranks, then this rank's
    # [loss_bad, grad_bad, empty]: as host ints when the flags were already on the host (CPU training) ...
    values: list[int] | None = None
    # ... else as int32 tensors on the device, read later
    vector: Any = None
    local: Any = None  # int32 [loss_bad, grad_bad, empty] on this rank
    host: Any = None  # host copy of cat(vector, local), filled asynchronously on CUDA
    event: Any = None  # CUDA event recorded after the copy
    losses: list[Any] = field(default_factory=list)
    grad_norm: Any = None


@dataclass(frozen=True)
class StepVerdict:
    """One step's flags as every rank sees them (``loss_bad`` ... ``grad_rank``) and as this rank saw them.

    Args:
        step: The optimizer step the flags belong to.
        loss_bad: Some rank saw a non-finite loss (a micro-batch without label tokens excepted).
        grad_bad: Some rank saw a non-finite gradient norm.
        empty: Some rank saw a micro-batch without a single label token.
        loss_rank: The lowest rank that saw a non-finite loss (None when none did).
        grad_rank: The lowest rank that saw a non-finite gradient norm (None when none did).
        local_loss_bad: This rank saw a non-finite loss.
        local_grad_bad: This rank saw a non-finite gradient norm.
        losses: This rank's micro-batch losses (floats or tensors).
        grad_norm: This rank's gradient norm (a float, a tensor or None).
    """

    step: int
    loss_bad: bool
    grad_bad: bool
    empty: bool
    loss_rank: int | None
    grad_rank: int | None
    local_loss_bad: bool
    local_grad_bad: bool
    losses: list[Any]
    grad_norm: Any

    @property
    def bad(self) -> bool:
        return self.loss_bad or self.grad_bad


def process_topology() -> tuple[int, int, Any]:
    """World size, rank and ``torch.distributed`` (None when one rank takes part), for :class:`StepFlagCollector`."""
    return distributed.world_size(), distributed.rank(), _process_group()


def _process_group() -> Any:
    """``torch.distributed`` when more than one rank takes part, else None."""
    if distributed.world_size() <= 1:
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _collective_device(dist: Any, preferred: Any = None) -> Any:
    import torch

    # NCCL reduces CUDA tensors only; gloo reduces CPU (and CUDA) tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return preferred if preferred is not None else torch.device("cpu")


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _host_bool(value: Any) -> bool:
    return bool(value) if not _is_tensor(value) else bool(value.item())


def _or_host(flag: Any, value: bool) -> Any:
    if flag is None:
        return value
    return flag | value


class StepFlagCollector:
    """Collects one optimizer step's non-finite flags and shares them across ranks (see the module docstring).

    The per-step state is public so that a hot path may inline the common case, as ``NanGuard`` does: a finite
    loss read on the host is appended to :attr:`losses` and sets :attr:`loss_bad` to False when it was None; a
    gradient norm read on the host sets :attr:`grad_norm` and :attr:`grad_bad` (whether it is finite).

    Args:
        device_flags: Keep flags as device tensors even for CPU tensors (the accelerator path, for tests).
        device: Where device flags are built (this rank's training device); None: the CPU.
        world_size: How many ranks take part.
        rank: This rank.
        group: ``torch.distributed`` when ranks share their flags (several ranks), else None.
    """

    def __init__(
        self,
        *,
        device_flags: bool = False,
        device: Any = None,
        world_size: int = 1,
        rank: int = 0,
        group: Any = None,
    ) -> None:
        self.device_flags = device_flags
        self.device = device
        self.world_size = world_size
        self.rank = rank
        self.group = group
        #: This step's micro-batch losses: floats on the host path, detached tensors on the device path.
        self.losses: list[Any] = []
        #: None before the first loss; then a bool (host) or a 0-dim bool tensor (device).
        self.loss_bad: Any = None
        #: None while every micro-batch had label tokens; else a bool or a 0-dim bool tensor.
        self.empty: Any = None
        self.grad_norm: Any = None
        self.grad_bad: Any = None
        self._host_buffers: list[Any] = []
        self._events: list[Any] = []
        self._flip = 0

    # ------------------------------------------------------------------------------------------------ observe
    def observe_loss(self, loss: Any, items: Any = None) -> None:
        """Record one micro-batch's loss; ``items`` is its label-token count (``num_items_in_batch``), if known."""
        # A step without a single label token (num_items_in_batch == 0, every label masked) has the loss 0/0 = NaN
        # and exactly zero gradients: nothing is poisoned, so it is a zero-loss step, not a non-finite alarm.
        on_host = not _is_tensor(loss) or (loss.device.type == "cpu" and not self.device_flags)
        if _is_tensor(items) and items.numel() == 1:
            # Reading a CPU tensor is free; on an accelerator the comparison stays a device op.
            items_on_host = items.device.type == "cpu" and not self.device_flags
            empty: Any = float(items) == 0 if items_on_host else items.detach().reshape(()) == 0
        else:
            empty = isinstance(items, (int, float)) and not isinstance(items, bool) and items == 0
        if on_host:
            # CPU: plain floats; a tensor op costs microseconds, reading the value costs nothing.
            value = float(loss)
            bad = not math.isfinite(value) and not _host_bool(empty)
            self.loss_bad = _or_host(self.loss_bad, bad)
            self.losses.append(value)
        else:
            loss = loss.detach()
            flag = nonfinite_flag(loss)
            if empty is True:
                flag = flag & False
            elif empty is not False:
                flag = flag & ~empty.to(flag.device, non_blocking=True)
            self.loss_bad = flag if self.loss_bad is None else self.loss_bad | flag
            self.losses.append(loss)
        if empty is not False:
            self.empty = _or_host(self.empty, empty)

    def observe_grad_norm(self, norm: Any) -> None:
        """Record the step's gradient norm (None: not computed)."""
        if norm is None:
            return
        if _is_tensor(norm) and (norm.device.type != "cpu" or self.device_flags):
            self.grad_norm = norm.detach()
            self.grad_bad = nonfinite_flag(self.grad_norm)
        else:
            self.grad_norm = float(norm)
            self.grad_bad = not math.isfinite(self.grad_norm)

    def reset(self) -> None:
        """Forget this step's observations."""
        self.losses = []
        self.loss_bad = None
        self.empty = None
        self.grad_norm = None
        self.grad_bad = None

    # ---------------------------------------------------------------------------------------------- share
    def take(self, step: int) -> StepFlags:
        """Turn this step's observations into one int32 vector on the device and all-reduce it (MAX); then reset.

        Layout ``[loss_bad, grad_bad, empty, loss rank code, grad rank code]`` where a rank code is
        ``world - rank`` on a rank that saw the value go bad (so MAX finds the lowest such rank): one collective says
        *which* value went bad and *where*, and it can stay on the device (NCCL) for the asynchronous read. Every
        rank must call this exactly once per optimizer step, so the collectives pair up.
        """
        import torch

        world, rank, group = self.world_size, self.rank, self.group
        raw = (self.loss_bad, self.grad_bad, self.empty)
        if not any(_is_tensor(flag) for flag in raw):
            # Every flag is already on the host (CPU training): no tensor unless ranks must share them.
            mine = [int(bool(flag)) for flag in raw]
            code = world - rank
            values = [*mine, mine[0] * code, mine[1] * code]
            if group is not None:
                shared = torch.tensor(values, dtype=torch.int32, device=_collective_device(group))
                group.all_reduce(shared, op=group.ReduceOp.MAX)
                values = [int(v) for v in shared.tolist()]
            flags = StepFlags(step=step, values=values + mine, losses=self.losses, grad_norm=self.grad_norm)
            self.reset()
            return flags
        device = self.device if self.device is not None else torch.device("cpu")
        local = torch.zeros(3, dtype=torch.int32, device=device)
        for index, flag in ((0, self.loss_bad), (1, self.grad_bad), (2, self.empty)):
            if flag is None or flag is False:
                continue
            if flag is True:
                local[index] = 1
            else:
                local[index] = flag.to(device=device, dtype=torch.int32)
        vector = torch.zeros(5, dtype=torch.int32, device=device)
        vector[:3] = local
        vector[3:] = local[:2] * (world - rank)
        if group is not None:
            vector = vector.to(_collective_device(group, vector.device))
            group.all_reduce(vector, op=group.ReduceOp.MAX)  # queued on the device stream: no host sync
        flags = StepFlags(step=step, vector=vector, local=local, losses=self.losses, grad_norm=self.grad_norm)
        self.reset()
        return flags

    def start_copy(self, flags: StepFlags) -> None:
        """Queue the device-to-host copy of ``flags`` behind this step's work, without waiting for it."""
        import torch

        if flags.values is not None:
            return  # already on the host
        both = torch.cat([flags.vector, flags.local.to(flags.vector.device)])
        if both.device.type != "cuda":
            flags.host = both  # CPU: already on the host; other accelerators: read (and synchronised) later
            return
        if not self._host_buffers:
            self._host_buffers = [torch.empty(8, dtype=torch.int32, pin_memory=True) for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
        # Two alternating buffers: step k's copy is still pending while step k+1's is queued.
        self._flip ^= 1
        host = self._host_buffers[self._flip]
        host.copy_(both, non_blocking=True)
        event = self._events[self._flip]
        event.record()
        flags.host, flags.event = host, event

    def read(self, flags: StepFlags) -> StepVerdict:
        """The verdict of ``flags`` (waits for that step's copy only, where one was started)."""
        if flags.values is not None:
            values = flags.values
        elif flags.host is None:
            import torch

            values = torch.cat([flags.vector, flags.local.to(flags.vector.device)]).tolist()
        else:
            if flags.event is not None:
                flags.event.synchronize()  # waits for that step only, not for work queued after it
            values = flags.host.tolist()
        loss_bad, grad_bad, empty, loss_code, grad_code, local_loss, local_grad, _ = (int(v) for v in values)
        world = self.world_size
        return StepVerdict(
            step=flags.step,
            loss_bad=bool(loss_bad),
            grad_bad=bool(grad_bad),
            empty=bool(empty),
            loss_rank=(world - loss_code) if loss_code > 0 else None,
            grad_rank=(world - grad_code) if grad_code > 0 else None,
            local_loss_bad=bool(local_loss),
            local_grad_bad=bool(local_grad),
            losses=flags.losses,
            grad_norm=flags.grad_norm,
        )
