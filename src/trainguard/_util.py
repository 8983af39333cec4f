"""Small foundation helpers every layer uses: UTC time stamps, whether a PID lives, how many threads to hash with.

Example::

    from trainguard._util import utc_now
    utc_now()                       # '2026-11-30T01:02:03Z'
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any

__all__ = ["default_workers", "drop_gradients", "feature_off", "pid_alive", "private_missing", "utc_now", "utc_stamp"]


def utc_now(timespec: str = "seconds", when: float | None = None) -> str:
    """ISO 8601 UTC time with a ``Z`` (``timespec`` as :meth:`datetime.isoformat`), now or at ``when`` (epoch s)."""
    moment = datetime.now(timezone.utc) if when is None else datetime.fromtimestamp(when, timezone.utc)
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")


def utc_stamp(when: float | None = None, *, milliseconds: bool = False) -> str:
    """A compact UTC stamp for file names: ``20261130T010203Z`` (or ``20261130T010203.456Z``)."""
    moment = datetime.fromtimestamp(time.time() if when is None else when, timezone.utc)
    if milliseconds:
        return moment.strftime("%Y%m%dT%H%M%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y%m%dT%H%M%SZ")


def pid_alive(pid: Any) -> bool:
    """True when a process with this PID exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def default_workers(cap: int) -> int:
    """Threads for hashing: the CPU count, at most ``cap`` (the functions use 8; the callback 4, to leave cores to
    the data loader while training)."""
    return max(1, min(cap, os.cpu_count() or 1))


def drop_gradients(optimizer: Any) -> None:
    """Set every gradient the optimizer holds to None, so its next ``step()`` leaves the weights as they are."""
    # Standard optimizers skip parameters whose .grad is None: no moment update, no weight decay.
    for group in getattr(optimizer, "param_groups", []) or []:
        for param in group.get("params", []):
            param.grad = None


_MISSING_SAID: set[tuple[str, str]] = set()
_MISSING_LOCK = threading.Lock()


def private_missing(library_name: str, feature: str) -> None:
    """Say once per process that ``library_name`` (a private name of another library, read by a seam module) is
    missing in the installed release, so ``feature`` is off. A seam never crashes on such a mismatch: it turns the
    feature off, and this one log line says which one and why."""
    feature_off(f"{library_name} is not in the installed release", feature)


def feature_off(reason: str, feature: str) -> None:
    """Say once per process (per reason and feature) that ``feature`` is off because of ``reason``: one warning
    line on the ``trainguard`` logger, which names what to do."""
    key = (reason, feature)
    with _MISSING_LOCK:
        if key in _MISSING_SAID:
            return
        _MISSING_SAID.add(key)
    logging.getLogger("trainguard").warning(
        "trainguard: %s; %s is off (upgrade trainguard, or report it)", reason, feature
    )


# The attribute callbacks/_context.py sets on a Trainer instance for its GuardContext (trainguard's own name, no
# Trainer internal); defined here so that layers below the callbacks (reporting) read it without importing them.
CONTEXT_ATTR = "_trainguard_context"
