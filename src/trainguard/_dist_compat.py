"""The seam with torch.distributed internals: the only module that reads a private name of ``torch.distributed``.

c10d publishes no call for "the store this process group rendezvoused through" or "how many collectives this rank
has issued"; :mod:`trainguard.distributed` needs both (the store side channel, matched collectives). Each reader
returns None when the private name is missing in the installed torch, after one log line naming it
(:func:`trainguard._util.private_missing`): the feature that needs it is then off, never a crash.

Example::

    # not run here: needs an initialized process group (a torchrun job)
    import torch.distributed as dist
    from trainguard import _dist_compat
    _dist_compat.default_store(dist)      # the c10d store, or None
"""

from __future__ import annotations

from typing import Any

from ._util import private_missing

__all__ = ["default_store", "sequence_number"]


def default_store(dist: Any) -> Any | None:
    """The default process group's c10d store (``distributed_c10d._get_default_store``), or None when torch has no
    such function."""
    getter = getattr(getattr(dist, "distributed_c10d", None), "_get_default_store", None)
    if getter is None:
        private_missing("torch.distributed.distributed_c10d._get_default_store", "the c10d store side channel")
        return None
    return getter()


def sequence_number(dist: Any) -> int | None:
    """How many collectives this rank issued on the default group (``_get_sequence_number_for_group``), or None when
    torch or the backend does not count them."""
    c10d = getattr(dist, "distributed_c10d", None)
    group_of = getattr(c10d, "_get_default_group", None)
    if group_of is None:
        private_missing("torch.distributed.distributed_c10d._get_default_group", "collective counting")
        return None
    counter = getattr(group_of(), "_get_sequence_number_for_group", None)
    if counter is None:
        private_missing("ProcessGroup._get_sequence_number_for_group", "collective counting")
        return None
    return int(counter())
