"""The pending file of faulthandler's C-level timer, and the dumps earlier processes left in theirs.

faulthandler writes to a file descriptor and cannot create files, so the watchdog opens a hidden file beforehand:
``output_dir/.trainguard-hang-rank{r}-pid{pid}.pending`` (:class:`PendingFile`), a header and then whatever the
timer writes. When Python runs again the watchdog takes that output and turns it into a dump file. With
``action="abort"`` the timer ends the process right after writing, so the next start of a watchdog on that
``output_dir`` and rank claims the leftover (:func:`claim_earlier_dumps`).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..._util import pid_alive
from ...alerts import get_logger
from .report import _utc_iso, dump_file_name

__all__ = ["EarlierDump", "PendingFile", "claim_earlier_dumps"]

_PENDING_MARK = "----- faulthandler output (most recent call first) -----\n"


class PendingFile:
    """This process's pending file: open while the watchdog runs; ``fd`` is what faulthandler's timer writes to."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.path: Path | None = None
        self.header_len = 0

    def open(self, output_dir: Path, rank: int, world: int, started_wall: float) -> None:
        """Create the file with its header. When it cannot be opened, ``fd`` stays None (the caller's timer then
        writes to stderr) and a warning is logged."""
        path = output_dir / f".trainguard-hang-rank{rank}-pid{os.getpid()}.pending"
        main = threading.main_thread()
        header = (
            "trainguard hang watchdog: stacks written by faulthandler's C-level timer\n"
            f"rank {rank} of {world}, pid {os.getpid()}, host {socket.gethostname()}, "
            f"started {_utc_iso(started_wall)}\n"
            f"main thread (runs the training loop): Thread 0x{main.ident or 0:016x}\n"
            "Stacks below mean: no progress for the budget and the Python monitor thread could not run, because\n"
            "the GIL was held (C code that does not release it). Each 'Timeout' line starts one dump.\n" + _PENDING_MARK
        )
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        except OSError as exc:
            # faulthandler can still write to stderr: the stacks reach the job's log instead of a file.
            get_logger().warning("trainguard hang watchdog: cannot open %s (%s); C-level dumps go to stderr", path, exc)
            self.fd, self.path, self.header_len = None, None, 0
            return
        data = header.encode()
        os.write(fd, data)
        self.fd, self.path, self.header_len = fd, path, len(data)

    def close(self) -> None:
        """Close and remove the file (take any dump first: it holds none after :meth:`take`)."""
        fd, path = self.fd, self.path
        self.fd, self.path = None, None
        if fd is not None:
            os.close(fd)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()  # our own file, empty of dumps (any dump was collected first)

    def size(self) -> int:
        """The file's size in bytes: more than ``header_len`` when the timer wrote a dump (0 when not open)."""
        return os.fstat(self.fd).st_size if self.fd is not None else 0

    def take(self, size: int) -> str:
        """What the timer wrote, up to ``size`` bytes of file; the file goes back to its header."""
        fd = self.fd
        if fd is None:
            return ""
        body = os.pread(fd, size - self.header_len, self.header_len).decode("utf-8", "replace")
        os.ftruncate(fd, self.header_len)  # O_APPEND: the next dump goes right after the header again
        return body


@dataclass
class EarlierDump:
    """A dump an earlier process of this rank left in its pending file, now renamed to a dump file."""

    pid: int
    file: Path
    content: str
    body: str
    mtime: float


def claim_earlier_dumps(output_dir: Path, rank: int) -> Iterator[EarlierDump]:
    """Turn the pending files of earlier processes of ``rank`` (ended by faulthandler's exit, or killed while stuck)
    into dump files named after the time they were written, one at a time; remove their empty pending files.
    Files of this process and of processes still alive are left alone."""
    pattern = f".trainguard-hang-rank{rank}-pid*.pending"
    try:
        leftovers = sorted(output_dir.glob(pattern))
    except OSError:
        return
    for path in leftovers:
        match = re.search(r"-pid(\d+)\.pending$", path.name)
        pid = int(match.group(1)) if match else -1
        if pid == os.getpid() or (pid > 0 and pid_alive(pid)):
            continue
        try:
            content = path.read_text(encoding="utf-8", errors="replace")
            mtime = path.stat().st_mtime
        except OSError:
            continue
        _, _, body = content.partition(_PENDING_MARK)
        if not body.strip():
            with contextlib.suppress(OSError):
                path.unlink()  # ours, and empty: the earlier process ended without a stall
            continue
        target = output_dir / dump_file_name(rank, mtime)
        try:
            os.replace(path, target)
        except OSError as exc:
            get_logger().warning("trainguard hang watchdog: cannot rename %s (%s)", path, exc)
            continue
        yield EarlierDump(pid=pid, file=target, content=content, body=body, mtime=mtime)
