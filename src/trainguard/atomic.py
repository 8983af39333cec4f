"""Crash-safe file writes: every file trainguard writes goes through this module.

A whole-file write goes to a temporary name in the same folder, is flushed and fsynced, renamed over the target
(atomic on POSIX), and then the folder is fsynced so the rename itself survives a power loss. A reader sees the
whole old file or the whole new one, never half of one, whenever the writer is killed.

Append-only event logs use :func:`append_line`: one ``write(2)`` of a whole line on an ``O_APPEND`` descriptor,
then fsync. A crash can at worst leave the last line torn; :func:`read_jsonl` skips such a line.

Example::

    from trainguard.atomic import atomic_write_json
    atomic_write_json("out/trainguard-state.json", {"step": 50})
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import secrets
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import MalformedFileError
from .safe_fs import open_append, parse_json, read_tail_lines

__all__ = [
    "TEMP_MARKER",
    "append_line",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_writer",
    "fsync_dir",
    "is_temp_name",
    "read_jsonl",
]

# Temporary files carry this marker so that manifests and listings can recognise (and skip) leftovers of a
# writer that was killed between create and rename.
TEMP_MARKER = ".trainguard-tmp-"

PathLike = str | os.PathLike[str]


def is_temp_name(name: str) -> bool:
    """True for the name of a temporary file left by an interrupted trainguard write."""
    return TEMP_MARKER in name


def fsync_dir(path: PathLike) -> None:
    """fsync a folder so that a rename or create inside it is durable. A no-op where folders cannot be opened."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        # Some filesystems (and Windows) refuse fsync on folders; the rename is still atomic there.
        pass
    finally:
        os.close(fd)


def fsync_file(path: PathLike) -> None:
    """fsync one regular file (opened read-only, without following a link or blocking on a FIFO)."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on a read-only descriptor
            os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _syncfs() -> Any:
    """libc's ``syncfs`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def can_sync_filesystem() -> bool:
    """Whether :func:`sync_filesystem` can work here (Linux's ``syncfs``)."""
    return _syncfs() is not None


def sync_filesystem(path: PathLike) -> bool:
    """Flush every written file of the filesystem holding ``path`` to disk in one call (Linux ``syncfs``): for a
    checkpoint of thousands of files, far cheaper than a fsync each. False where it is unavailable or failed."""
    fn = _syncfs()
    if fn is None:
        return False
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return False
    try:
        return bool(fn(fd) == 0)
    finally:
        os.close(fd)


def _new_file_mode(target: Path) -> int:
    # mkstemp creates 0600; keep the target's mode when replacing it, else honour the umask like open() does.
    try:
        st = target.lstat()  # a link's target's mode is not ours to copy
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
        raise FileNotFoundError
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_writer(path: PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit it atomically replaces ``path``.

    On an exception the temporary file is removed and ``path`` is untouched. The folder must exist
    (``FileNotFoundError`` naming it otherwise).

    Args:
        path: The file to write.
        mode: ``"wb"`` or ``"w"``.
        encoding: Text encoding for ``mode="w"`` (default utf-8).

    Example::

        with atomic_writer("out/report.txt", "w") as f:
            f.write("all good\\n")
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer mode must be 'w' or 'wb', not {mode!r}")
    target = Path(path)
    folder = target.parent
    tmp = folder / f".{target.name}{TEMP_MARKER}{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileNotFoundError:
        # Name what is missing (the folder), not the hidden temporary file the user never asked for.
        raise FileNotFoundError(
            errno.ENOENT, f"cannot write {target}: its folder does not exist (create it first)", str(folder)
        ) from None
    try:
        if mode == "w":
            fh: IO[Any] = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline="")
        else:
            fh = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    try:
        with fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), _new_file_mode(target))
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    with atomic_writer(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically and durably."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Serialise ``obj`` as JSON (with a final newline) and replace ``path`` atomically.

    The object is serialised before anything is written, so a value that is not JSON-able leaves ``path`` as it was.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False)
    atomic_write_text(path, text + "\n")


def append_line(path: PathLike, line: str, *, fsync: bool = True, mode: int = 0o666) -> None:
    """Append one line to ``path`` with a single ``write(2)`` on an ``O_APPEND`` descriptor.

    Lines from several processes never interleave on a local filesystem; a crash can tear only the last line.
    ``path`` must be a regular file or missing (created with ``mode``, less the umask): a link or a special file
    there is an :class:`~trainguard.errors.UnsafeFileError`.
    """
    if "\n" in line:
        raise ValueError("append_line writes exactly one line; the text must not contain a newline")
    data = (line + "\n").encode("utf-8")
    # Never through a link, never into a FIFO or device someone left at this name (safe_fs refuses both).
    fd = open_append(path, mode=mode)
    try:
        written = os.write(fd, data)
        while written < len(data):  # short writes are rare (signals, full disks); finish the line
            written += os.write(fd, data[written:])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: PathLike, *, limit: int = 64 << 20) -> list[dict[str, Any]]:
    """Read a JSONL event file written with :func:`append_line`, skipping a torn or malformed line.

    Only a regular file is read (a FIFO there never blocks: :class:`~trainguard.errors.UnsafeFileError`), and only
    its last ``limit`` bytes: these files are append-only logs whose recent lines matter."""
    records: list[dict[str, Any]] = []
    for raw in read_tail_lines(path, limit=limit):
        raw = raw.strip()
        if not raw:
            continue
        try:
            value = parse_json(raw, source=path, max_depth=32)
        except MalformedFileError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records
