"""Disk and memory: will what a run writes fit on its filesystem, and is there RAM to run it.

- :func:`check_disk_space`: free space on the filesystem that holds a path against what will be written.
- :func:`check_memory`: available RAM against a threshold.
- :func:`gpu_memory_summary`: free and total memory of each CUDA device (empty without CUDA).
- :func:`directory_size`: what a folder occupies on disk; :func:`format_bytes`: a size a person reads at a glance.

Nothing here imports torch at import time (:func:`gpu_memory_summary` imports it when called).

Example::

    from trainguard import check_disk_space
    check_disk_space("out/", required_bytes=2 * 2**30)   # PreflightError naming needed and free when short
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...errors import PreflightError
from ...safe_fs import walk_tree

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_MARGIN_BYTES",
    "DEFAULT_MIN_AVAILABLE_MEMORY",
    "DiskSpace",
    "MemoryStatus",
    "check_disk_space",
    "check_memory",
    "directory_size",
    "disk_space_error",
    "format_bytes",
    "gpu_memory_summary",
    "memory_error",
]

PathLike = str | os.PathLike[str]

#: Default fractional safety margin on top of an estimate: estimates miss files (README, logs, caches).
DEFAULT_MARGIN = 0.10
#: Default fixed safety margin: a disk filled to the last byte breaks logging, alerts and other processes too.
DEFAULT_MARGIN_BYTES = 64 * 2**20
#: The origin's rule "RAM < 85 % used": refuse when less than 15 % of the RAM is available.
DEFAULT_MIN_AVAILABLE_MEMORY = 0.15


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: a size a person reads at a glance (binary units, like ``df -h``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - loop always returns


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself, or its nearest existing parent: a run's output_dir usually does not exist yet."""
    current = path.absolute()
    while not current.exists():
        if current.parent == current:
            break
        current = current.parent
    return current


def _margin_bytes(required: int, margin: float, margin_bytes: int) -> int:
    return max(math.ceil(required * margin), int(margin_bytes))


# ------------------------------------------------------------------------------------------------------- disk
@dataclass(frozen=True)
class DiskSpace:
    """The outcome of :func:`check_disk_space`.

    Attributes:
        path: The path asked about.
        checked_path: The existing folder whose filesystem was measured (``path`` or its nearest parent).
        free_bytes: Space this (unprivileged) process may still write there.
        total_bytes: Size of the filesystem.
        required_bytes: What the caller said will be written.
        needed_bytes: ``required_bytes`` plus the margin: what must be free.
    """

    path: str
    checked_path: str
    free_bytes: int
    total_bytes: int
    required_bytes: int
    needed_bytes: int

    @property
    def ok(self) -> bool:
        return self.free_bytes >= self.needed_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "free": format_bytes(self.free_bytes), "needed": format_bytes(self.needed_bytes)}


def check_disk_space(
    path: PathLike,
    required_bytes: int = 0,
    *,
    margin: float = DEFAULT_MARGIN,
    margin_bytes: int = DEFAULT_MARGIN_BYTES,
    purpose: str = "this",
    raise_error: bool = True,
) -> DiskSpace:
    """Check that the filesystem holding ``path`` has room for ``required_bytes`` plus a margin.

    ``path`` need not exist yet (a new run's ``output_dir``): its nearest existing parent is measured. Free space is
    what an unprivileged process may write (``shutil.disk_usage(...).free``, i.e. ``f_bavail``), not the blocks
    reserved for root.

    Args:
        path: Where the data will be written.
        required_bytes: How much will be written.
        margin: Extra room as a fraction of ``required_bytes`` (default 10 %: estimates miss small files).
        margin_bytes: The least extra room, in bytes (default 64 MiB: a disk filled to the last byte also breaks
            logs, alerts and every other process on it). The margin is the larger of the two.
        purpose: What the space is for, used in the message ("3 checkpoints of 1.2 GiB each").
        raise_error: When False, return the :class:`DiskSpace` without raising.

    Returns:
        The measurement; ``.ok`` says whether it fits.

    Raises:
        PreflightError: Less is free than ``required_bytes`` plus the margin; the message names the path, what is
            needed and what is free, in human units, and the evidence holds the byte counts.
        ValueError: ``required_bytes``, ``margin`` or ``margin_bytes`` is negative.

    Example::

        check_disk_space("/data/run1", required_bytes=3 * 2**30, purpose="3 checkpoints of 1 GiB")
    """
    if required_bytes < 0 or margin < 0 or margin_bytes < 0:
        raise ValueError("required_bytes, margin and margin_bytes must not be negative")
    target = Path(path)
    checked = _existing_ancestor(target)
    usage = shutil.disk_usage(checked)
    needed = int(required_bytes) + _margin_bytes(int(required_bytes), margin, margin_bytes)
    result = DiskSpace(
        path=str(target),
        checked_path=str(checked),
        free_bytes=int(usage.free),
        total_bytes=int(usage.total),
        required_bytes=int(required_bytes),
        needed_bytes=needed,
    )
    if raise_error and not result.ok:
        raise disk_space_error(result, purpose)
    return result


def disk_space_error(space: DiskSpace, purpose: str = "this") -> PreflightError:
    """The :class:`PreflightError` :func:`check_disk_space` raises for ``space`` when it is short: names the path,
    what is needed and what is free, in human units; the byte counts go in the evidence."""
    return PreflightError(
        f"not enough free disk space for {purpose}: needs {format_bytes(space.needed_bytes)} "
        f"({format_bytes(space.required_bytes)} + margin), {format_bytes(space.free_bytes)} free",
        where={"file": space.path, "filesystem": space.checked_path},
        next_step=(
            f"Free at least {format_bytes(space.needed_bytes - space.free_bytes)} on the filesystem holding "
            f"{space.checked_path}, write to a larger disk, or lower what is written (fewer kept checkpoints with "
            "save_total_limit, save_only_model=True)."
        ),
        evidence=space.to_dict(),
    )


def directory_size(path: PathLike) -> int:
    """Bytes a folder occupies on disk (whole blocks, like ``du``; at least the files' sizes). 0 when missing."""
    total = 0
    for root, _dirs, files in walk_tree(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue  # removed while we walked (rotation): it no longer takes space
            total += max(st.st_size, getattr(st, "st_blocks", 0) * 512)
    return total


# ----------------------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryStatus:
    """The outcome of :func:`check_memory`: RAM sizes in bytes and the threshold that applied."""

    total_bytes: int
    available_bytes: int
    min_available_bytes: int
    gpus: list[dict[str, Any]] = field(default_factory=list)

    @property
    def available_fraction(self) -> float:
        return self.available_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def ok(self) -> bool:
        return self.available_bytes >= self.min_available_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "available_fraction": round(self.available_fraction, 4),
            "available": format_bytes(self.available_bytes),
            "total": format_bytes(self.total_bytes),
        }


def gpu_memory_summary() -> list[dict[str, Any]]:
    """Free and total memory of every visible CUDA device, from ``torch.cuda.mem_get_info``.

    Returns an empty list when torch is not installed or no CUDA device is visible (the check is then skipped).

    Example::

        for gpu in gpu_memory_summary():
            print(gpu["index"], gpu["name"], gpu["free"], "of", gpu["total"])
    """
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus: list[dict[str, Any]] = []
    for index in range(torch.cuda.device_count()):
        try:
            free, total = torch.cuda.mem_get_info(index)
            name = torch.cuda.get_device_name(index)
        except Exception as exc:  # a broken device must not stop the summary of the others
            gpus.append({"index": index, "error": f"{type(exc).__name__}: {exc}"})
            continue
        gpus.append(
            {
                "index": index,
                "name": name,
                "free_bytes": int(free),
                "total_bytes": int(total),
                "free": format_bytes(free),
                "total": format_bytes(total),
            }
        )
    return gpus


def check_memory(
    min_available_fraction: float | None = DEFAULT_MIN_AVAILABLE_MEMORY,
    min_available_bytes: int | None = None,
    *,
    raise_error: bool = True,
    include_gpus: bool = True,
) -> MemoryStatus:
    """Check that enough system RAM is available (``psutil.virtual_memory().available``).

    Available memory counts page cache the kernel can drop, so a machine that merely cached files passes; a
    machine where another job holds the RAM does not. The threshold is the larger of the two limits given.

    Args:
        min_available_fraction: The least share of total RAM that must be available (default 0.15: the origin's
            "RAM < 85 % used" rule; a Trainer's dataloader workers, tokenisation and checkpoint serialisation all
            need host RAM, and the kernel's OOM killer ends a run without a Python traceback). None: no share.
        min_available_bytes: The least available RAM in bytes. None: no absolute floor.
        raise_error: When False, return the :class:`MemoryStatus` without raising.
        include_gpus: Add :func:`gpu_memory_summary` to the result (reported, never refused on).

    Raises:
        PreflightError: Less RAM is available than the threshold; names both in human units, bytes in evidence.
        ValueError: ``min_available_fraction`` is outside [0, 1] or ``min_available_bytes`` is negative.

    Example::

        status = check_memory(min_available_fraction=0.15)
        print(status.available_fraction, status.gpus)
    """
    import psutil

    if min_available_fraction is not None and not 0.0 <= min_available_fraction <= 1.0:
        raise ValueError(f"min_available_fraction must be within [0, 1], got {min_available_fraction!r}")
    if min_available_bytes is not None and min_available_bytes < 0:
        raise ValueError(f"min_available_bytes must not be negative, got {min_available_bytes!r}")
    vm = psutil.virtual_memory()
    limits = [0]
    if min_available_fraction is not None:
        limits.append(math.ceil(vm.total * min_available_fraction))
    if min_available_bytes is not None:
        limits.append(int(min_available_bytes))
    status = MemoryStatus(
        total_bytes=int(vm.total),
        available_bytes=int(vm.available),
        min_available_bytes=max(limits),
        gpus=gpu_memory_summary() if include_gpus else [],
    )
    if raise_error and not status.ok:
        raise memory_error(status)
    return status


def memory_error(status: MemoryStatus) -> PreflightError:
    """The :class:`PreflightError` :func:`check_memory` raises for ``status`` when RAM is short: names available
    and needed in human units; the byte counts go in the evidence."""
    return PreflightError(
        f"not enough free RAM: {format_bytes(status.available_bytes)} available "
        f"({status.available_fraction:.0%} of {format_bytes(status.total_bytes)}), "
        f"needs at least {format_bytes(status.min_available_bytes)}",
        where={"host": os.uname().nodename if hasattr(os, "uname") else "?"},
        next_step=(
            "Stop the processes holding the RAM (see `top`/`ps aux --sort=-rss`), lower dataloader workers, or "
            "relax the threshold (PreflightGuard(min_available_memory=...) or None to skip the RAM check)."
        ),
        evidence=status.to_dict(),
    )
