"""One optimizer step's non-finite flags: collected per micro-batch, shared across ranks, read without a stall.

:class:`StepFlagCollector` holds what one step has seen so far (each micro-batch's loss, the gradient norm) and
turns it into a :class:`StepVerdict` that every rank agrees on:

1. :meth:`~StepFlagCollector.observe_loss` / :meth:`~StepFlagCollector.observe_grad_norm`, per micro-batch and per
   step. A value on the host (CPU training) is read at once (``float``: cheaper than any tensor op); a value on an
   accelerator only queues a device op (:func:`~.values.nonfinite_flag`), so nothing synchronises.
2. :meth:`~StepFlagCollector.take`, once per optimizer step on every rank: the flags, the sum and count of the
   step's losses (with ``mean_loss``) and which ranks went bad become one float32 vector, all-reduced (SUM) once when
   several ranks take part, as a :class:`StepFlags`; the collector is then empty for the next step.
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
    """What one optimizer step left behind: the flags and the values behind them (for the message).

    The shared part, summed across ranks, is ``[loss_bad, grad_bad, empty, loss_sum, loss_count, loss_bad of rank
    0..W-1, grad_bad of rank 0..W-1]``; this rank's own part is ``[loss_bad, grad_bad, empty, grad_norm]`` (NaN: no
    norm). A sum says whether *any* rank saw a value go bad, the per-rank slots say *which* ranks did, and the loss sum
    and count give the mean loss over every rank's micro-batches: one collective for all of it.
    """

    step: int
    # shared + local, as host floats when the flags were already on the host (CPU training) ...
    values: list[float] | None = None
    # ... else as float32 tensors on the device, read later
    vector: Any = None
    local: Any = None
    host: Any = None  # host copy of cat(vector, local), filled asynchronously on CUDA
    event: Any = None  # CUDA event recorded after the copy
    losses: list[Any] = field(default_factory=list)
    grad_norm: Any = None
    verdict: StepVerdict | None = None  # read once, then kept: several guards read one step


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
        mean_loss: The mean of every rank's micro-batch losses (None without losses, a NaN among them, or when the
            collector was not asked for it).
        grad_value: This rank's gradient norm as a float (None when not computed or NaN).
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
    mean_loss: float | None = None
    grad_value: float | None = None

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
    if value is None or value is True or value is False or type(value) is float:
        return False  # the common host values, without a string comparison
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
        mean_loss: Also share the sum and count of the step's losses, for :attr:`StepVerdict.mean_loss` (SpikeGuard's
            value); off, no tensor op is spent on it.
    """

    def __init__(
        self,
        *,
        device_flags: bool = False,
        device: Any = None,
        world_size: int = 1,
        rank: int = 0,
        group: Any = None,
        mean_loss: bool = False,
    ) -> None:
        self.device_flags = device_flags
        self.mean_loss = mean_loss
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
        """Turn this step's observations into one float32 vector (see :class:`StepFlags`), summed across ranks in
        one all-reduce (queued on the device stream: no host sync); then reset.

        Every rank must call this exactly once per optimizer step, so the collectives pair up.
        """
        world, rank, group = self.world_size, self.rank, self.group
        loss_bad, grad_bad, empty = self.loss_bad, self.grad_bad, self.empty
        losses, norm = self.losses, self.grad_norm
        # The hot path of every CPU step: plain comparisons, no generator, no tensor.
        if not (_is_tensor(loss_bad) or _is_tensor(grad_bad) or _is_tensor(empty) or _is_tensor(norm)):
            # Every value is already on the host (CPU training): no tensor unless ranks must share them.
            mine = [1.0 if loss_bad else 0.0, 1.0 if grad_bad else 0.0, 1.0 if empty else 0.0]
            total = float(sum(losses)) if self.mean_loss and losses else 0.0
            count = float(len(losses)) if self.mean_loss else 0.0
            slots = [0.0] * (2 * world)
            if 0 <= rank < world:
                slots[rank], slots[world + rank] = mine[0], mine[1]
            shared = [*mine, total, count, *slots]
            if group is not None:
                import torch

                vector = torch.tensor(shared, dtype=torch.float32, device=_collective_device(group))
                group.all_reduce(vector)  # SUM
                shared = [float(v) for v in vector.tolist()]
            own = [*mine, float(norm) if norm is not None else math.nan]
            flags = StepFlags(step=step, values=shared + own, losses=losses, grad_norm=norm)
            self.reset()
            return flags
        import torch

        device = self.device if self.device is not None else torch.device("cpu")
        local = torch.zeros(4, dtype=torch.float32, device=device)
        for index, flag in ((0, self.loss_bad), (1, self.grad_bad), (2, self.empty)):
            if flag is None or flag is False:
                continue
            if flag is True:
                local[index] = 1
            else:
                local[index] = flag.to(device=device, dtype=torch.float32)
        if norm is None:
            local[3] = math.nan
        elif _is_tensor(norm):
            local[3] = norm.detach().to(device=device, dtype=torch.float32).reshape(())
        else:
            local[3] = float(norm)
        vector = torch.zeros(5 + 2 * world, dtype=torch.float32, device=device)
        vector[:3] = local[:3]
        if self.mean_loss and losses:
            parts = [
                v.detach().float().reshape(()).to(device) if _is_tensor(v) else torch.tensor(float(v), device=device)
                for v in losses
            ]
            vector[3] = torch.stack(parts).sum()
            vector[4] = len(parts)
        if 0 <= rank < world:
            vector[5 + rank] = local[0]
            vector[5 + world + rank] = local[1]
        if group is not None:
            vector = vector.to(_collective_device(group, vector.device))
            group.all_reduce(vector)  # SUM, queued on the device stream: no host sync
        flags = StepFlags(step=step, vector=vector, local=local, losses=losses, grad_norm=norm)
        self.reset()
        return flags

    def start_copy(self, flags: StepFlags) -> None:
        """Queue the device-to-host copy of ``flags`` behind this step's work, without waiting for it (once)."""
        import torch

        if flags.values is not None or flags.host is not None:
            return  # already on the host, or already copying
        both = torch.cat([flags.vector, flags.local.to(flags.vector.device)])
        if both.device.type != "cuda":
            flags.host = both  # CPU: already on the host; other accelerators: read (and synchronised) later
            return
        if not self._host_buffers or self._host_buffers[0].numel() != both.numel():
            self._host_buffers = [torch.empty(both.numel(), dtype=both.dtype, pin_memory=True) for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
        # Two alternating buffers: step k's copy is still pending while step k+1's is queued.
        self._flip ^= 1
        host = self._host_buffers[self._flip]
        host.copy_(both, non_blocking=True)
        event = self._events[self._flip]
        event.record()
        flags.host, flags.event = host, event

    def read(self, flags: StepFlags) -> StepVerdict:
        """The verdict of ``flags`` (waits for that step's copy only, where one was started; read once, kept)."""
        if flags.verdict is not None:
            return flags.verdict
        if flags.values is not None:
            values = flags.values
        elif flags.host is None:
            import torch

            values = torch.cat([flags.vector, flags.local.to(flags.vector.device)]).tolist()
        else:
            if flags.event is not None:
                flags.event.synchronize()  # waits for that step only, not for work queued after it
            values = flags.host.tolist()
        world = self.world_size
        loss_slots = values[5 : 5 + world]
        grad_slots = values[5 + world : 5 + 2 * world]
        local = values[5 + 2 * world :]
        total, count = values[3], values[4]
        mean = total / count if count > 0 else math.nan
        grad = local[3]
        flags.verdict = StepVerdict(
            step=flags.step,
            loss_bad=values[0] > 0,
            grad_bad=values[1] > 0,
            empty=values[2] > 0,
            loss_rank=next((r for r, v in enumerate(loss_slots) if v > 0), None),
            grad_rank=next((r for r, v in enumerate(grad_slots) if v > 0), None),
            local_loss_bad=local[0] > 0,
            local_grad_bad=local[1] > 0,
            losses=flags.losses,
            grad_norm=flags.grad_norm,
            mean_loss=mean if mean == mean else None,  # NaN marks "none"
            grad_value=grad if grad == grad else None,
        )
        return flags.verdict
