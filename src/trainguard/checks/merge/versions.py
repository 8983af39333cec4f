"""Immutable versions ``v001``, ``v002``, ... of merged models: listing them, and publishing a finished staging
folder under the next free number without ever replacing an existing folder (``renameat2(RENAME_NOREPLACE)`` where
the kernel has it, a no-clobber fallback elsewhere).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import sys
from pathlib import Path
from typing import Any

from ...atomic import fsync_dir
from ...errors import PreflightError

__all__ = ["METADATA_FORMAT", "STAGING_PREFIX", "VERSION_METADATA", "list_versions", "next_number", "publish"]

PathLike = str | os.PathLike[str]

#: The metadata file inside every version folder (``trainguard inspect`` reads it).
VERSION_METADATA = "trainguard-version.json"
#: Staging folders are hidden, in ``versions_dir`` itself, so publishing is a same-filesystem rename.
STAGING_PREFIX = ".staging-"
METADATA_FORMAT = "trainguard-version/1"

_VERSION_RE = re.compile(r"^v(\d{3,})$")


# ------------------------------------------------------------------------------------------------- versions
def list_versions(versions_dir: PathLike) -> list[Path]:
    """The version folders (``v001``, ``v002``, ...) under ``versions_dir``, oldest first; [] when none.

    Example::

        versions = list_versions("models/merged")   # [] before the first merge; v001, v002, ... after
    """
    folder = Path(versions_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _VERSION_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[1:]))


def next_number(versions_dir: Path) -> int:
    numbers = [int(m.group(1)) for p in versions_dir.iterdir() if (m := _VERSION_RE.match(p.name))]
    return max(numbers, default=0) + 1


def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None  # glibc < 2.28 or musl without renameat2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists (even an empty folder, which plain rename
    would silently replace). Atomic with Linux ``renameat2(RENAME_NOREPLACE)``; a check-then-rename elsewhere."""
    fn = _renameat2()
    if fn is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # EINVAL: the filesystem lacks the flag
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def publish(staging: Path, versions_dir: Path, *, start: int | None = None) -> Path:
    """Rename ``staging`` to the first free ``vNNN`` from ``start`` (default: after the highest there), never
    replacing a folder another publisher took first; returns the version folder."""
    number = next_number(versions_dir) if start is None else start
    for _ in range(10_000):
        target = versions_dir / f"v{number:03d}"
        try:
            _rename_noreplace(staging, target)
        except FileExistsError:
            number += 1  # another process (or the user) took this number meanwhile: take the next
            continue
        fsync_dir(versions_dir)
        return target
    raise PreflightError(  # pragma: no cover - 10,000 concurrent publishers
        "no free version number found", where={"file": str(versions_dir)}
    )
