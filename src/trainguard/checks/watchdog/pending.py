"""The live file of faulthandler's C-level timer, and the dumps earlier processes left in theirs.

faulthandler writes to a file descriptor and cannot create files, so the watchdog creates one beforehand, under a
name a user listing the folder sees: ``output_dir/trainguard-hang-rank{r}-pid{pid}-live.txt``
(:class:`PendingFile`), a header saying what it is and then whatever the timer writes. The timer writes into a pipe
read by a small helper process that appends to that file **and** announces the dump on stderr: neither needs this
process's GIL, so the stacks are on disk and in the job's log while the hang lasts (where the helper cannot start,
the timer writes into the file directly). When Python runs again the watchdog turns the output into a dump file.
With ``action="abort"`` the timer ends the process right after writing, so the next start of a watchdog on that
``output_dir`` and rank claims the leftover (:func:`claim_earlier_dumps`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..._util import pid_alive
from ...alerts import get_logger
from ...errors import MalformedFileError, UnsafeFileError
from ...safe_fs import open_write, read_bytes
from .report import _utc_iso, dump_file_name

__all__ = ["EarlierDump", "PendingFile", "claim_earlier_dumps"]

_PENDING_MARK = "----- faulthandler output (most recent call first) -----\n"
LIVE_SUFFIX = "-live.txt"
# A live file holds a header and faulthandler's dumps of a few stacks: a few MB at most.
_MAX_LEFTOVER = 64 << 20
_LIVE_RE = re.compile(r"^trainguard-hang-rank(\d+)-pid(\d+)-live\.txt$")

# The helper: copies what faulthandler's timer writes (stdin) into the live file and onto stderr, with a banner
# before each dump. It inherits the live file's descriptor rather than opening the path again: the name is
# predictable, and a link planted there between our open and its open would be written through. Plain Python,
# nothing imported beyond the standard library, started once per watchdog start.
_TEE = r"""
import os, sys
out, banner = int(sys.argv[1]), sys.argv[2].encode()
err = sys.stderr.buffer
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    os.write(out, chunk)
    if b"Timeout (" in chunk:
        err.write(banner)
    err.write(chunk)
    err.flush()
"""


class PendingFile:
    """This process's pending file: open while the watchdog runs; ``fd`` is what faulthandler's timer writes to."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.path: Path | None = None
        self.header_len = 0
        #: where faulthandler's timer writes: the helper's pipe, else the file itself
        self.timer_fd: int | None = None
        self._helper: subprocess.Popen[bytes] | None = None

    def open(self, output_dir: Path, rank: int, world: int, started_wall: float) -> None:
        """Create the file with its header and start the helper. When the file cannot be opened, ``fd`` stays None
        (the caller's timer then writes to stderr) and a warning is logged."""
        path = output_dir / f"trainguard-hang-rank{rank}-pid{os.getpid()}{LIVE_SUFFIX}"
        main = threading.main_thread()
        header = (
            "trainguard hang watchdog: the live file of this process, removed when training ends. Stacks below\n"
            "are written by faulthandler's C-level timer while a step is stuck (they appear on stderr too)\n"
            f"rank {rank} of {world}, pid {os.getpid()}, host {socket.gethostname()}, "
            f"started {_utc_iso(started_wall)}\n"
            f"main thread (runs the training loop): Thread 0x{main.ident or 0:016x}\n"
            "Stacks below mean: no progress for the budget and the Python monitor thread could not run, because\n"
            "the GIL was held (C code that does not release it). Each 'Timeout' line starts one dump.\n" + _PENDING_MARK
        )
        try:
            # The name is predictable: never through a link someone planted there (it would truncate the link's
            # target), never a FIFO (it would block the start).
            fd = open_write(path, mode=0o644, truncate=True)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        except (OSError, UnsafeFileError) as exc:
            # faulthandler can still write to stderr: the stacks reach the job's log instead of a file.
            get_logger().warning("trainguard hang watchdog: cannot open %s (%s); C-level dumps go to stderr", path, exc)
            self.fd, self.path, self.header_len = None, None, 0
            return
        data = header.encode()
        os.write(fd, data)
        self.fd, self.path, self.header_len = fd, path, len(data)
        self.timer_fd = self._start_helper(fd, path, rank) or fd

    def _start_helper(self, fd: int, path: Path, rank: int) -> int | None:
        banner = (
            f"\ntrainguard hang watchdog: rank {rank} (pid {os.getpid()}) made no progress and holds the GIL; "
            f"its stacks follow, also in {path}\n"
        )
        try:
            read, write = os.pipe()
            try:
                self._helper = subprocess.Popen(
                    [sys.executable, "-c", _TEE, str(fd), banner],
                    stdin=read, stdout=subprocess.DEVNULL, stderr=None, close_fds=True, pass_fds=(fd,),
                    start_new_session=True,  # a Ctrl-C to the job must not end it before the dump is copied
                )  # fmt: skip
            finally:
                os.close(read)
        except (OSError, ValueError, AttributeError) as exc:
            with contextlib.suppress(NameError, OSError):
                os.close(write)
            get_logger().info("trainguard hang watchdog: no stderr copy of C-level dumps (%s)", exc)
            return None
        return write

    def close(self) -> None:
        """Close and remove the file (take any dump first: it holds none after :meth:`take`)."""
        fd, path = self.fd, self.path
        self.fd, self.path = None, None
        timer_fd, helper = self.timer_fd, self._helper
        self.timer_fd, self._helper = None, None
        if timer_fd is not None and timer_fd != fd:
            os.close(timer_fd)  # the helper reads to the end, then exits
        if helper is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                helper.wait(timeout=5)
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
    Files of this process and of processes still alive, and files without the header every live file starts with,
    are left alone."""
    try:
        leftovers = sorted(p for p in output_dir.iterdir() if (m := _LIVE_RE.match(p.name)) and int(m.group(1)) == rank)
    except OSError:
        return
    for path in leftovers:
        match = _LIVE_RE.match(path.name)
        pid = int(match.group(2)) if match else -1
        if pid == os.getpid() or (pid > 0 and pid_alive(pid)):
            continue
        try:
            # A FIFO or a link planted under our name is not read (it would block, or read someone else's file).
            content = read_bytes(path, limit=_MAX_LEFTOVER, follow=False).decode("utf-8", errors="replace")
            mtime = path.lstat().st_mtime
        except (OSError, MalformedFileError) as exc:
            get_logger().warning("trainguard hang watchdog: cannot read %s (%s); left as it is", path, exc)
            continue
        except UnsafeFileError as exc:
            get_logger().warning("trainguard hang watchdog: %s", exc.what)
            continue
        if _PENDING_MARK not in content:
            # Not a file trainguard wrote (it begins every live file with this header): the name alone is no reason
            # to remove or rename someone's file.
            get_logger().warning(
                "trainguard hang watchdog: %s has a live file's name but not its header; left as it is", path
            )
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
