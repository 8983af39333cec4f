"""Rank facts and rank-consistent decisions, the same under ``torchrun``, ``accelerate launch`` and one process.

A decision taken from local facts (a NaN on this rank, this host's disk, this process's clock) must be taken by
every rank at the same step, or the ranks that go on wait forever in their next collective. :func:`any_rank` is
the one way trainguard turns a local flag into a shared decision.

Rank facts come from ``torch.distributed`` when a process group is initialised, and otherwise from the launcher's
environment (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from torchrun, accelerate and DeepSpeed; Open MPI, PMI and
Slurm variables as fallbacks), so they are right even before ``Trainer`` initialises the group. torch is imported
only when a process group can exist, so this module is cheap to import.

Example::

    import math
    from trainguard import distributed
    loss = float("nan")                     # this rank's loss
    if distributed.any_rank(math.isnan(loss)):   # every rank calls it, every rank gets the same answer
        print("stop on every rank")
"""

from __future__ import annotations

import os
import sys
from typing import Any

from . import _dist_compat

__all__ = [
    "all_ranks",
    "any_rank",
    "barrier",
    "broadcast_object",
    "collective_count",
    "gather_object",
    "is_distributed",
    "is_local_main_process",
    "is_main_process",
    "local_rank",
    "rank",
    "store_compare_set",
    "store_get",
    "store_set",
    "world_size",
]

_RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
_WORLD_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
_LOCAL_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return default


def _dist() -> Any | None:
    """``torch.distributed`` if a process group is initialised, else None. Never imports torch on its own."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def is_distributed() -> bool:
    """True when more than one process takes part in this run."""
    return world_size() > 1


def rank() -> int:
    """The global rank of this process (0 when not distributed)."""
    dist = _dist()
    if dist is not None:
        return int(dist.get_rank())
    return _env_int(_RANK_VARS, 0)


def world_size() -> int:
    """The number of processes in the run (1 when not distributed)."""
    dist = _dist()
    if dist is not None:
        return int(dist.get_world_size())
    return max(1, _env_int(_WORLD_VARS, 1))


def local_rank() -> int:
    """The rank of this process on its own node (0 when not distributed)."""
    return _env_int(_LOCAL_VARS, 0)


def is_main_process() -> bool:
    """True on global rank 0: the process that writes run-wide files."""
    return rank() == 0


def is_local_main_process() -> bool:
    """True on local rank 0 of each node."""
    return local_rank() == 0


def _collective_device(dist: Any) -> Any:
    import torch

    # NCCL only reduces CUDA tensors; gloo and mpi reduce CPU tensors.
    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce_flag(flag: bool, op_name: str) -> bool:
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return bool(flag)
    import torch

    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device(dist))
    dist.all_reduce(value, op=getattr(dist.ReduceOp, op_name))
    return bool(value.item())


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on at least one rank.

    This is a collective: every rank must call it, in the same order as its other collectives. Without a process
    group it returns ``flag``.

    Example::

        from trainguard import distributed
        local_problem = False                   # what this rank found
        stop = distributed.any_rank(local_problem)   # True on every rank when any rank passes True
    """
    return _reduce_flag(flag, "MAX")


def all_ranks(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on every rank (a collective, like :func:`any_rank`)."""
    return _reduce_flag(flag, "MIN")


def barrier() -> None:
    """Wait until every rank reaches this point (a no-op without a process group)."""
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (pickled; a collective). Without a process group: ``obj``."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device(dist))
    return box[0]


def gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (pickled; a collective). Without a process group:
    ``[obj]``."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return [obj]
    box: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


# ------------------------------------------------------------------------------------------ the store side channel
# A rank that failed cannot call a collective (the others may be inside another one, or gone), but it can still talk
# to the c10d store that init_process_group rendezvoused through: a key-value server (torchrun's agent hosts it, so it
# outlives the workers) whose calls involve no other rank. These helpers let such a rank post and read small strings.


def _store() -> Any:
    dist = _dist()
    if dist is None:
        raise RuntimeError("no torch.distributed process group is initialised: there is no c10d store")
    store = _dist_compat.default_store(dist)
    if store is None:  # this torch has no such call (said once in the log): the side channel is off
        raise RuntimeError("this torch release gives no access to the c10d store")
    return store


def store_set(key: str, value: str) -> None:
    """Write ``value`` under ``key`` in the process group's c10d store (never a collective: no other rank takes part).

    Raises:
        RuntimeError: No process group is initialised, or the store cannot be reached.
    """
    _store().set(key, value)


def store_get(key: str) -> str | None:
    """The value under ``key`` in the c10d store, or None when no rank has written it yet. Never waits for it.

    Raises:
        RuntimeError: No process group is initialised, or the store cannot be reached.
    """
    store = _store()
    if not store.check([key]):
        return None
    return bytes(store.get(key)).decode()


def store_compare_set(key: str, value: str) -> str:
    """Write ``value`` under ``key`` unless some rank wrote the key first; return what the key holds now (``value``
    or the first writer's). Atomic in the store, so ranks that each propose a value all read back the same one.

    Raises:
        RuntimeError: No process group is initialised, or the store cannot be reached.

    Example::

        from trainguard import distributed
        # every rank: verdict = distributed.store_compare_set("job/verdict", my_proposal)   # the same on all
    """
    return bytes(_store().compare_set(key, "", value)).decode()


def collective_count() -> int | None:
    """How many collectives this rank has issued on the default process group (c10d's sequence number), or None
    without a process group or where the backend does not count. Two ranks with equal counts have joined the same
    collectives, so a next collective on both is matched, not paired with one the other never finished."""
    dist = _dist()
    if dist is None:
        return None
    try:
        return _dist_compat.sequence_number(dist)
    except Exception:  # a backend without sequence numbers
        return None
