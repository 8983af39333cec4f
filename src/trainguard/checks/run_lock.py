"""An exclusive, kernel-released lock on a run's ``output_dir``.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``output_dir/.trainguard.lock``. The kernel drops a ``flock`` when the
last descriptor of its open file is closed, which happens when the holder exits for any reason, SIGKILL and the
OOM killer included: a lock can never go stale, so there is no PID-file cleanup and no "is that PID still alive"
guess. The lock file itself is never written, renamed or deleted (an atomic rename would give the path a new inode
and silently split the lock in two); who holds it is recorded beside it in ``.trainguard.lock.json`` (PID, host,
UTC start time, command), written after the lock is taken.

The holder record may be read by anyone who can see the folder, so it never holds a secret: the command line is
redacted (:func:`trainguard.redact.redact_argv`: ``--hub_token``, ``--api-key=``, ``HF_TOKEN=``, token-like
words) before it is written, the file is created ``0600``, and a record read back (an older one may predate the
redaction) is redacted again before it is shown. Neither the lock file nor the record is opened through a symbolic
link, and neither blocks on a FIFO: a link or special file planted at either name is an
:class:`~trainguard.errors.UnsafeFileError` naming it (the start is refused rather than writing beside a link's
target). A record that cannot be parsed or holds fields of the wrong type is "unreadable" (:func:`load_holder`),
never a traceback.

One process may take the same lock several times (two Trainers on one ``output_dir`` in a notebook): the handle is
shared and counted, and released when the last user releases it. Children created with ``fork`` (DataLoader
workers) drop their copy of the descriptor at once, so a holder killed with SIGKILL frees the lock even while
its workers are still exiting.

Network filesystems: see :func:`lock_filesystem_note` and ``docs/run-lock.md``. On NFSv4 ``flock`` is emulated
with POSIX locks held by the server and works across clients; with ``local_lock=flock|all`` or ``nolock`` (NFSv3)
it is node-local; on Lustre it is cluster-wide only with the ``flock`` mount option (``localflock``: node-local;
neither: the call fails); FUSE filesystems vary. What can be detected from ``/proc/mounts`` is reported.

Example::

    with acquire_run_lock("out") as handle:   # RunLockedError if another live process holds it
        print(handle.lock_file)                # ... train while holding it
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .._util import utc_now
from ..alerts import get_logger
from ..errors import MalformedFileError, PreflightError, RunLockedError, TrainGuardError, UnsafeFileError
from ..redact import redact_argv, redact_command, redact_json
from ..safe_fs import display_name, open_read, open_write, parse_json, read_bytes

__all__ = [
    "INFO_NAME",
    "LOCK_NAME",
    "FilesystemInfo",
    "RunLockHandle",
    "acquire_run_lock",
    "filesystem_info",
    "load_holder",
    "lock_filesystem_note",
    "lock_status",
    "read_holder",
]

LOCK_NAME = ".trainguard.lock"
INFO_NAME = ".trainguard.lock.json"

PathLike = str | os.PathLike[str]

# flock fails with these when the filesystem cannot lock at all (Lustre without -o flock, some FUSE, old NFS).
_UNSUPPORTED_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP}
_BUSY_ERRNOS = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}


def _command() -> str:
    argv = list(sys.argv) or [sys.executable]
    # `python -m pkg` shows as the module's file in argv[0]; keep what the user typed recognisable and short.
    # The record is readable by whoever can see the folder: a --hub_token must not reach it.
    text = shlex.join([sys.executable.rsplit("/", 1)[-1], *redact_argv(argv)])
    return text if len(text) <= 2000 else text[:1997] + "..."


# ------------------------------------------------------------------------------------------ filesystem facts
@dataclass(frozen=True)
class FilesystemInfo:
    """The mount that holds a path, from ``/proc/mounts`` (``fstype`` is ``"unknown"`` where it is unreadable)."""

    fstype: str
    mountpoint: str
    options: tuple[str, ...] = ()


def filesystem_info(path: PathLike) -> FilesystemInfo:
    """The filesystem type, mount point and mount options of the mount holding ``path`` (Linux; else unknown).

    Example::

        filesystem_info("out").fstype   # "ext4", "nfs4", "lustre", "fuse.gcsfuse", ...
    """
    target = os.path.realpath(os.fspath(path))
    while not os.path.exists(target) and os.path.dirname(target) != target:
        target = os.path.dirname(target)
    best = FilesystemInfo("unknown", "")
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
    except OSError:
        return best
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        # /proc/mounts escapes spaces and tabs in mount points as octal (\040).
        mountpoint = parts[1].encode().decode("unicode_escape")
        inside = target == mountpoint or target.startswith(mountpoint.rstrip("/") + "/")
        if inside and len(mountpoint) >= len(best.mountpoint):
            best = FilesystemInfo(parts[2], mountpoint, tuple(parts[3].split(",")))
    return best


def lock_filesystem_note(info: FilesystemInfo) -> tuple[str, str]:
    """How far a ``flock`` on this filesystem reaches: ``("ok" | "node-local" | "uncertain", explanation)``.

    ``ok``: the lock excludes every process that can see the folder. ``node-local``: it excludes processes on this
    machine only; a run on another node would not be refused. ``uncertain``: the filesystem does not say.
    """
    fstype, opts = info.fstype, set(info.options)
    local_lock = next((o.split("=", 1)[1] for o in opts if o.startswith("local_lock=")), "none")
    if fstype == "nfs4":
        if local_lock in ("flock", "all"):
            return "node-local", f"NFSv4 mounted with local_lock={local_lock}: flock excludes this node only"
        return "ok", (
            "NFSv4: flock is emulated with POSIX locks held by the server and excludes every client; "
            "if the holder's node dies, the server frees the lock when its lease expires (about 90 s)"
        )
    if fstype == "nfs":
        if "nolock" in opts or local_lock in ("flock", "all"):
            return "node-local", "NFS mounted with nolock/local_lock: flock excludes this node only"
        return "uncertain", "NFSv2/3: flock goes through lockd (NLM); it excludes other clients only if lockd runs"
    if fstype == "lustre":
        if "flock" in opts:
            return "ok", "Lustre mounted with -o flock: the lock is cluster-wide"
        if "localflock" in opts:
            return "node-local", "Lustre mounted with -o localflock: flock excludes this node only"
        return "uncertain", "Lustre without -o flock: flock may fail or be node-local"
    if fstype.startswith("fuse") or fstype in ("cifs", "smb3", "smbfs", "9p", "virtiofs", "ceph", "gpfs", "beegfs"):
        return "uncertain", f"{fstype}: whether flock reaches other machines depends on the filesystem and its options"
    return "ok", f"{fstype}: local filesystem, flock is reliable"


# ------------------------------------------------------------------------------------------------ the lock
_REGISTRY: dict[str, RunLockHandle] = {}
_REGISTRY_LOCK = threading.RLock()


@dataclass
class RunLockHandle:
    """A held (or, on a filesystem that cannot lock, unenforced) run lock. Use as a context manager or call
    :meth:`release`.

    Attributes:
        output_dir: The locked folder.
        lock_file: ``output_dir/.trainguard.lock``.
        info_file: ``output_dir/.trainguard.lock.json``, the holder record.
        holder: The record written to ``info_file``.
        enforced: False when the filesystem refused ``flock`` (see ``note``): the run goes on unprotected.
        note: What the filesystem means for the lock (network filesystems, unsupported locking).
        reach: ``ok``, ``node-local`` or ``uncertain`` (see :func:`lock_filesystem_note`).
    """

    output_dir: Path
    lock_file: Path
    info_file: Path
    holder: dict[str, Any]
    enforced: bool = True
    note: str = ""
    reach: str = "ok"
    _fd: int | None = field(default=None, repr=False)
    _users: int = field(default=1, repr=False)
    _recorded: bool = field(default=False, repr=False)

    @property
    def held(self) -> bool:
        """True while this process holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Give the lock back (once every user of this shared handle has released it). Idempotent."""
        with _REGISTRY_LOCK:
            if self._users > 0:
                self._users -= 1
            if self._users > 0:
                return
            if _REGISTRY.get(str(self.lock_file)) is self:
                del _REGISTRY[str(self.lock_file)]
            fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self._record_release()
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def _record_release(self) -> None:
        if not self._recorded:  # the record could not be written (a link or FIFO there): nothing to update
            return
        try:
            record = dict(self.holder)
            record["released_utc"] = utc_now()
            _write_holder(self.info_file, record)
        except OSError as exc:  # the kernel releases the lock anyway; the record is a courtesy
            get_logger().debug("could not update %s on release: %s", display_name(self.info_file), exc)
        except TrainGuardError as exc:  # a link or FIFO planted there while the run held the lock
            get_logger().warning("could not update %s on release: %s", display_name(self.info_file), exc.what)

    def __enter__(self) -> RunLockHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _drop_in_child() -> None:
    # After fork the child shares the parent's open file description; closing the child's descriptor keeps the
    # parent's lock (only LOCK_UN or the last close would drop it) and lets the kernel free it when the parent dies.
    for handle in list(_REGISTRY.values()):
        fd, handle._fd = handle._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _REGISTRY.clear()


def _release_all_at_exit() -> None:
    for handle in list(_REGISTRY.values()):
        handle._users = 1
        with contextlib.suppress(OSError):
            handle.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_in_child)
atexit.register(_release_all_at_exit)


# Fields of a holder record and the types they must have; a record breaking them is unreadable, not shown.
_HOLDER_FIELDS: dict[str, tuple[type, ...]] = {
    "pid": (int,),
    "host": (str,),
    "started_utc": (str,),
    "released_utc": (str,),
    "command": (str,),
    "cwd": (str,),
    "lock_id": (str,),
    "job_id": (str, type(None)),
    "rank": (int,),
    "world_size": (int,),
}
# A holder record is a few hundred bytes; a huge one is not ours.
_HOLDER_LIMIT = 1 << 20


def _write_holder(info_file: Path, record: dict[str, Any]) -> None:
    """Write the record in place: ``0600``, never through a link, never into a FIFO (UnsafeFileError)."""
    data = (json.dumps(redact_json(record), indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    # In place, not by rename: the record is only written by the lock's holder, and a reader that finds it empty
    # for an instant treats it as "not written yet" (which it handles); a rename would copy an older record's mode.
    fd = open_write(info_file, mode=0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def load_holder(info_file: PathLike) -> dict[str, Any]:
    """The holder record in ``info_file``, checked and redacted.

    Raises:
        FileNotFoundError: There is no record, or it is empty (its holder is writing it this instant).
        UnsafeFileError: A link, FIFO, device or socket is at that name (never followed, never blocks).
        MalformedFileError: It is not a JSON object with fields of the right types (too deep, ``1e999``, a list,
            a PID that is not a number, ...).
    """
    # Never through a link: the record is written with O_NOFOLLOW, so a link there was planted.
    data = read_bytes(info_file, limit=_HOLDER_LIMIT, follow=False)
    if not data.strip():  # written in place: between its truncate and its write, a reader finds it empty
        raise FileNotFoundError(errno.ENOENT, "the holder record is empty (being written)", os.fspath(info_file))
    value = parse_json(data, source=info_file)
    name = display_name(info_file)
    if not isinstance(value, dict):
        raise MalformedFileError(f"{name} is not a JSON object", where={"file": name})
    for key, types in _HOLDER_FIELDS.items():
        if key in value and (not isinstance(value[key], types) or isinstance(value[key], bool)):
            raise MalformedFileError(
                f"{name}: field {key!r} is {type(value[key]).__name__}, not {' or '.join(t.__name__ for t in types)}",
                where={"file": name, "field": key},
            )
    record: dict[str, Any] = redact_json(value)
    if "command" in record:
        record["command"] = redact_command(record["command"])
    return record


def read_holder(info_file: PathLike) -> dict[str, Any] | None:
    """The holder record in ``info_file`` (checked and redacted, :func:`load_holder`), or None when it is missing,
    unreadable or unsafe to open. Never raises, never blocks."""
    try:
        return load_holder(info_file)
    except (OSError, TrainGuardError):
        return None


def _proc_lock_pids(lock_file: Path) -> list[int]:
    """PIDs that hold a lock on ``lock_file`` according to ``/proc/locks`` (Linux, this machine only)."""
    try:
        st = os.stat(lock_file)
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            lines = fh.readlines()
    except OSError:
        return []
    exact = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: list[int] = []
    by_inode: list[int] = []
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 12345 fe:00:2146828 0 EOF"; blocked waiters carry "->" and are skipped.
        if "->" in parts or len(parts) < 6:
            continue
        pid_text, ident = parts[4], parts[5]
        if not pid_text.lstrip("-").isdigit():
            continue
        if ident == exact:
            pids.append(int(pid_text))
        elif ident.rsplit(":", 1)[-1] == str(st.st_ino):
            by_inode.append(int(pid_text))  # overlay and stacked filesystems report the lower device
    return sorted(set(pids or by_inode))


def _probe_held(lock_file: Path) -> bool | None:
    """True if some process holds the lock, False if free, None if the filesystem cannot tell (or the lock file is
    a link or special file: never followed, never blocks on)."""
    try:
        fd = open_read(lock_file, follow=False)
    except FileNotFoundError:
        return False
    except (OSError, UnsafeFileError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return True if exc.errno in _BUSY_ERRNOS else None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def lock_status(output_dir: PathLike) -> dict[str, Any]:
    """Whether ``output_dir``'s run lock is held and by whom, without taking it (for ``trainguard inspect``).

    Returns ``{"lock_file", "exists", "held" (True/False/None if unknown), "holder" (the record, redacted, or
    None), "holder_error" (why a record that exists cannot be shown: unreadable, or a link or FIFO; else None),
    "problem" (the lock file is a link or special file; else None), "holder_pids" (from /proc/locks, this machine
    only), "held_by_this_process", "filesystem", "reach", "note"}``.
    Never creates anything, never blocks on a FIFO. ``/proc/locks`` is read first; only when it shows no holder is
    the lock probed with a shared, non-blocking ``flock`` that is dropped at once.

    Example::

        lock_status("out")["held"]
    """
    folder = Path(output_dir)
    lock_file = folder / LOCK_NAME
    info = filesystem_info(folder)
    reach, note = lock_filesystem_note(info)
    ours = str(folder.resolve() / LOCK_NAME) in _REGISTRY
    holder, holder_error = _holder_or_error(folder / INFO_NAME)
    problem: str | None = None
    try:
        os.close(open_read(lock_file, follow=False))
    except UnsafeFileError as err:
        problem = err.what
    except OSError:
        pass  # missing (exists is False) or not ours to open (the flock probe says what it can)
    status: dict[str, Any] = {
        "lock_file": str(lock_file),
        "exists": os.path.lexists(lock_file),
        "held": False,
        "holder": holder,
        "holder_error": holder_error,
        "problem": problem,
        "holder_pids": [],
        "held_by_this_process": ours,
        "filesystem": info.fstype,
        "reach": reach,
        "note": note,
    }
    if not status["exists"]:
        return status
    if problem is not None:
        status["held"] = None
        return status
    pids = _proc_lock_pids(lock_file)
    status["holder_pids"] = pids
    status["held"] = True if (pids or ours) else _probe_held(lock_file)
    return status


def _holder_or_error(info_file: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The holder record (redacted) and None, or None and why a record that is there cannot be shown."""
    try:
        return load_holder(info_file), None
    except FileNotFoundError:
        return None, None
    except TrainGuardError as err:
        return None, f"unreadable: {err.what}"
    except OSError as err:
        return None, f"unreadable: {display_name(info_file)}: {err.strerror or err}"


def _locked_error(output_dir: Path, lock_file: Path, info_file: Path) -> RunLockedError:
    found, holder_error = _holder_or_error(info_file)
    holder = found or {}
    pids = [p for p in _proc_lock_pids(lock_file) if p > 0]  # 0: a holder in another PID namespace
    same_host = holder.get("host") in (None, socket.gethostname())
    # The record is written just after the lock is taken, so for an instant it can still be the previous
    # holder's (then it carries released_utc, or /proc/locks names another PID): the kernel's word wins.
    stale = "released_utc" in holder or (pids and same_host and holder.get("pid") not in pids)
    if stale or not holder:
        holder = {
            "pid": pids[0] if pids else "unknown",
            "host": socket.gethostname() if pids else "unknown",
            "note": f"its record is {holder_error}" if holder_error else "the holder had not written its record yet",
        }
    pid = holder.get("pid", "unknown")
    host = holder.get("host", "unknown")
    started = holder.get("started_utc", "unknown")
    command = holder.get("command", "unknown")
    return RunLockedError(
        f"{output_dir} is in use by another run: PID {pid} on {host}, started {started}, command: {command}",
        where={"file": str(lock_file), "host": host, "pid": pid},
        next_step=(
            f"Wait for PID {pid} on {host} to finish, stop it, or give this run another output_dir. The kernel "
            "releases the lock when that process exits (even on SIGKILL), so no cleanup is ever needed."
        ),
        evidence={"holder": holder, "holder_pids": pids, "info_file": str(info_file)},
    )


def acquire_run_lock(
    output_dir: PathLike,
    *,
    job_id: str | None = None,
    on_unsupported: str = "warn",
    wait_s: float = 1.0,
    extra: dict[str, Any] | None = None,
) -> RunLockHandle:
    """Take the exclusive run lock on ``output_dir`` (created if missing) without blocking.

    Args:
        output_dir: The run's output folder.
        job_id: An id shared by the writing processes of one distributed job (``save_on_each_node`` on a shared
            filesystem): a lock held under the same id is this job's own and is not a conflict.
        on_unsupported: ``"warn"`` (default): where the filesystem cannot lock at all, return an unenforced handle
            whose ``note`` says why; ``"error"``: raise :class:`PreflightError` instead.
        wait_s: How long a busy lock is retried before refusing. Short on purpose: it only absorbs a
            ``trainguard inspect`` probe and the instant between another holder's lock and its record.
        extra: More fields for the holder record.

    Returns:
        A :class:`RunLockHandle`; the same shared handle when this process already holds the lock.

    Raises:
        RunLockedError: Another live process holds the lock; the message names its PID, host, start and command.
        PreflightError: The filesystem cannot lock and ``on_unsupported="error"``.

    Example::

        handle = acquire_run_lock("out")
        handle.release()
    """
    if on_unsupported not in ("warn", "error"):
        raise ValueError(f"on_unsupported must be 'warn' or 'error', not {on_unsupported!r}")
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _not_writable(folder, folder, exc) from None
    # Resolve the folder, never the lock file: a link planted at the lock's name is refused, not followed (its
    # target's folder would get the holder record).
    lock_file = folder.resolve() / LOCK_NAME
    with _REGISTRY_LOCK:  # one acquisition at a time in this process; two threads must share, not refuse
        existing = _REGISTRY.get(str(lock_file))
        if existing is not None and existing.held:
            existing._users += 1
            return existing
        handle = _acquire(folder, lock_file, job_id, on_unsupported, wait_s, extra or {})
        if handle.held:
            _REGISTRY[str(lock_file)] = handle
        return handle


def _not_writable(folder: Path, path: Path, exc: OSError) -> PreflightError:
    return PreflightError(
        f"output_dir {folder} is not writable: {exc.strerror or exc} ({path}); every checkpoint of this run would "
        "fail to save",
        where={"file": str(path)},
        next_step="Point output_dir at a folder this user can write (a read-write mount, your own folder), or fix "
        "its permissions, then start again.",
        evidence={"errno": exc.errno},
    )


def _acquire(
    folder: Path, lock_file: Path, job_id: str | None, on_unsupported: str, wait_s: float, extra: dict[str, Any]
) -> RunLockHandle:
    info_file = lock_file.with_name(INFO_NAME)
    reach, note = lock_filesystem_note(filesystem_info(folder))
    holder: dict[str, Any] = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_utc": utc_now(),
        "command": _command(),
        "cwd": os.getcwd(),
        "lock_id": uuid.uuid4().hex,
        "job_id": job_id,
        **extra,
    }
    # O_NOFOLLOW, O_NONBLOCK, regular files only: a link or FIFO at the lock's name is an UnsafeFileError.
    try:
        fd = open_write(lock_file, mode=0o644, truncate=False)
    except OSError as exc:
        # A read-only mount, or another user's lock file on shared storage: every save of this run would fail too.
        raise _not_writable(folder, lock_file, exc) from None
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno in _BUSY_ERRNOS:
                other = read_holder(info_file) or {}
                if job_id is not None and other.get("job_id") == job_id and "released_utc" not in other:
                    os.close(fd)
                    shared = f"held by this job's writer PID {other.get('pid')} on {other.get('host')}; {note}"
                    return RunLockHandle(folder, lock_file, info_file, other, True, shared, reach, None, 0)
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise _locked_error(folder, lock_file, info_file) from None
                time.sleep(0.05)
                continue
            os.close(fd)
            if exc.errno in _UNSUPPORTED_ERRNOS:
                why = f"the filesystem refused flock on {lock_file} ({errno.errorcode.get(exc.errno, exc.errno)})"
                if on_unsupported == "error":
                    raise PreflightError(
                        f"cannot lock {folder}: {why}",
                        where={"file": str(lock_file)},
                        next_step="Use an output_dir on a filesystem with locking (Lustre: mount with -o flock), "
                        "or RunLock(on_unsupported='warn') to run unprotected.",
                        evidence={"errno": exc.errno, "note": note},
                    ) from exc
                return RunLockHandle(folder, lock_file, info_file, holder, False, f"{why}; {note}", "none", None, 0)
            raise
    handle = RunLockHandle(folder, lock_file, info_file, holder, True, note, reach, fd)
    try:
        _write_holder(info_file, holder)
    except BaseException:
        handle.release()
        raise
    handle._recorded = True
    return handle
