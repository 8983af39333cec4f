"""What trainguard set aside in an ``output_dir``: list it with sizes, weigh it against the run's checkpoints, and
remove it only when asked.

trainguard never deletes a checkpoint: a resume from an early checkpoint archives the later ones
(``trainguard-archive/``), a checkpoint that fails verification is quarantined (``trainguard-quarantine/``), and
``save_total_limit`` never applies to either, so over many restarts they can fill the disk. These functions are what
``trainguard clean OUTPUT_DIR`` and PreflightGuard's warning stand on. Only entries *inside* those two folders are
ever listed or removed: a ``checkpoint-N`` the run may resume from is never touched, and a link or special file at
either folder's name is refused (:class:`~trainguard.errors.UnsafeFileError`), never followed.

Example::

    from trainguard.checks.set_aside import list_set_aside, remove_set_aside
    items = list_set_aside("out")                # [SetAside(folder="trainguard-archive", path=..., size_bytes=...)]
    sum(item.size_bytes for item in items)
    remove_set_aside("out", items)               # what was removed
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._util import utc_now, utc_stamp
from ..atomic import atomic_write_json, fsync_dir
from ..errors import UnsafeFileError
from ..safe_fs import describe_kind, display_name, ensure_dir, remove_tree
from ._layout import ARCHIVE_DIR, QUARANTINE_DIR
from ._resume import checkpoint_dirs
from .preflight.system import directory_size

__all__ = [
    "SET_ASIDE_DIRS",
    "SetAside",
    "list_set_aside",
    "move_aside",
    "remove_set_aside",
    "set_aside_excess",
    "set_aside_folders",
]

#: The folders of ``output_dir`` trainguard moves checkpoints into instead of deleting them.
SET_ASIDE_DIRS: tuple[str, ...] = (ARCHIVE_DIR, QUARANTINE_DIR)

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class SetAside:
    """One entry trainguard set aside: a folder (or stray file) directly inside one of :data:`SET_ASIDE_DIRS`."""

    folder: str
    path: Path
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "path": display_name(self.path), "size_bytes": self.size_bytes}


def set_aside_folders(output_dir: PathLike) -> list[Path]:
    """The set-aside folders that exist in ``output_dir`` (real folders only).

    Raises:
        UnsafeFileError: One of the names is a link, file or special file: trainguard did not make it and will
            neither list through it nor remove anything behind it.
    """
    found = []
    for name in SET_ASIDE_DIRS:
        path = Path(output_dir) / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(mode):
            raise UnsafeFileError(
                f"{display_name(path)} is {describe_kind(mode) if not stat.S_ISLNK(mode) else 'a link'}, not the "
                "folder trainguard sets checkpoints aside in: nothing behind it is listed or removed",
                where={"file": display_name(path)},
            )
        found.append(path)
    return found


def list_set_aside(output_dir: PathLike) -> list[SetAside]:
    """Everything directly inside ``output_dir``'s set-aside folders, with its size on disk (like ``du``), by folder
    then name. Links inside are listed (their own size) and never followed."""
    items = []
    for folder in set_aside_folders(output_dir):
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
        for entry in entries:
            path = folder / entry.name
            try:
                is_folder = entry.is_dir(follow_symlinks=False)
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # removed while we listed
            size = directory_size(path) if is_folder else max(st.st_size, getattr(st, "st_blocks", 0) * 512)
            items.append(SetAside(folder.name, path, size))
    return items


def remove_set_aside(output_dir: PathLike, items: Sequence[SetAside] | None = None) -> list[SetAside]:
    """Remove ``items`` (default: everything :func:`list_set_aside` finds) and return what was removed.

    An item is removed only if it is still an entry directly inside one of ``output_dir``'s real set-aside folders;
    anything else given is skipped, so no checkpoint outside them is ever removed. A folder is removed without
    following links in it.
    """
    folders = {path.name: path for path in set_aside_folders(output_dir)}
    chosen = list_set_aside(output_dir) if items is None else list(items)
    removed = []
    for item in chosen:
        folder = folders.get(item.folder)
        if folder is None or Path(item.path).parent != folder or not os.path.lexists(item.path):
            continue
        if os.path.isdir(item.path) and not os.path.islink(item.path):
            remove_tree(item.path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(item.path)
        if not os.path.lexists(item.path):
            removed.append(item)
    for folder in folders.values():
        with contextlib.suppress(OSError):  # not empty (something was left, or is being set aside now)
            folder.rmdir()
    return removed


def set_aside_excess(output_dir: PathLike, save_total_limit: int | None) -> dict[str, Any] | None:
    """The evidence for a warning when the set-aside folders take more than ``save_total_limit`` checkpoints'
    worth of disk (the newest ``checkpoint-N``'s size times the limit); None when they do not, when there is no
    limit (every checkpoint stays then anyway) or no checkpoint to weigh them against.

    Example::

        set_aside_excess("out", 2)   # {"set_aside_bytes": ..., "budget_bytes": ..., "items": 7, ...} or None
    """
    if not save_total_limit or save_total_limit <= 0:
        return None
    items = list_set_aside(output_dir)
    total = sum(item.size_bytes for item in items)
    if not items:
        return None
    checkpoints = checkpoint_dirs(output_dir)
    newest = directory_size(checkpoints[-1]) if checkpoints else 0
    budget = newest * int(save_total_limit)
    if newest <= 0 or total <= budget:
        return None
    return {
        "items": len(items),
        "set_aside_bytes": total,
        "budget_bytes": budget,
        "checkpoint": checkpoints[-1].name,
        "checkpoint_bytes": newest,
        "save_total_limit": int(save_total_limit),
        "folders": sorted({item.folder for item in items}),
    }


def move_aside(folder: str | os.PathLike[str], reason: str, *, into: str = QUARANTINE_DIR, problems: Any = ()) -> Path:
    """Rename ``folder`` to ``<its parent>/<into>/<name>.<UTC time>`` and write ``<new name>.reason.json`` beside it.

    Never deletes. The rename stays on the same filesystem (atomic), and the new place is outside the Trainer's
    ``checkpoint-*`` glob, so neither ``get_last_checkpoint`` nor rotation sees it again.

    Returns:
        The folder's new path.

    Raises:
        UnsafeFileError: ``<parent>/<into>`` is a link, a file, or leads outside the parent (planted so that the
            move would carry the checkpoint elsewhere); nothing is moved.
    """
    path = Path(folder)
    # a real folder inside output_dir: a planted link here would carry the checkpoint out of output_dir
    target_dir = ensure_dir(path.parent / into, inside=path.parent)
    stamp = utc_stamp()
    target = target_dir / f"{path.name}.{stamp}"
    while os.path.lexists(target):
        target = target_dir / f"{path.name}.{stamp}-{secrets.token_hex(2)}"
    os.rename(path, target)
    fsync_dir(path.parent)
    fsync_dir(target_dir)
    with contextlib.suppress(OSError, ValueError, TypeError):
        atomic_write_json(
            target_dir / f"{target.name}.reason.json",
            {
                "from": str(path),
                "to": str(target),
                "utc": utc_now(),
                "reason": reason,
                "problems": [p.to_dict() if hasattr(p, "to_dict") else str(p) for p in problems],
            },
        )
    return target
