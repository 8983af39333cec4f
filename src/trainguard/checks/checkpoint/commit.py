"""Committing saves off the training thread: one background thread writes each checkpoint's manifest (its commit
marker) in the order the saves happened, then runs what must follow that commit (the held-back rotation); what it
has to report is collected for the caller's thread (alert sinks such as the Trainer's log stream are not
thread-safe).

Example::

    from trainguard import write_manifest
    committer = Committer(write=write_manifest, workers=4)
    committer.submit(Path("out/checkpoint-50"), 50, {"lineage": "20261130T010203Z-3fa9c1", "step": 50})
    committer.wait()                       # before the next save, at the end of training
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ...alerts import get_logger
from .manifest import known_digests

__all__ = ["Committer"]

Message = tuple[str, str, "int | None"]


class Committer:
    """Writes manifests one at a time, in the background (default) or inline.

    Args:
        write: ``write(folder, step=..., workers=..., lineage=...) -> marker path`` (``write_manifest``; passed in so
            that it is looked up where the caller says, e.g. for tests that wrap it).
        workers: Threads hashing one checkpoint's files.
        background: Hash on one background thread (default) or inline in :meth:`submit`.
    """

    def __init__(self, *, write: Callable[..., Path], workers: int | None, background: bool = True) -> None:
        self.write = write
        self.workers = workers
        self.background = background
        self.manifests = 0
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._lock = threading.Lock()
        self._messages: list[Message] = []
        self._checked = threading.Event()
        self._checked.set()
        #: Saves whose pre-commit ``check`` found problems: ``(folder, step, problems)``; taken by the caller.
        self.check_failures: list[tuple[Path, int, list[Any]]] = []

    def submit(
        self,
        folder: Path,
        step: int,
        record: Mapping[str, Any],
        *,
        after: Callable[[Path], None] | None = None,
        announce: str | None = None,
        check: Callable[[Path], list[Any]] | None = None,
        known: Callable[[], Mapping[str, tuple[int, int, str]]] | None = None,
    ) -> None:
        """Commit ``folder``; then call ``after(folder)`` (only when the manifest was written); report ``announce``
        (info) once committed. ``check(folder)`` runs first: problems it returns mean no commit (they are kept in
        :attr:`check_failures`); :meth:`wait_checked` waits for it alone, not for the hashing. ``known()``, on the
        hashing thread, gives digests other ranks computed (:mod:`.split`); the rest is hashed here."""
        self._checked.clear()
        job = self._job(folder, step, dict(record), after, announce, check, known)
        if not self.background:
            job()
            return
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainguard-manifest")
            self._pending.append(self._executor.submit(job))

    def _job(
        self,
        folder: Path,
        step: int,
        record: dict[str, Any],
        after: Callable[[Path], None] | None,
        announce: str | None,
        check: Callable[[Path], list[Any]] | None,
        known: Callable[[], Mapping[str, tuple[int, int, str]]] | None = None,
    ) -> Callable[[], None]:
        def run() -> None:
            try:
                problems = check(folder) if check is not None else []
            except Exception as err:  # a check that cannot run must not pass: no commit, and say why
                problems = [f"the pre-commit check failed ({type(err).__name__}: {err})"]
            finally:
                self._checked.set()
            if problems:
                with self._lock:
                    self.check_failures.append((folder, step, problems))
                return
            try:
                digests = known() if known is not None else None
                with known_digests(digests):
                    marker = self.write(folder, step=step, workers=self.workers, lineage=record)
            except FileNotFoundError:
                # Removed before it was hashed (a user's script): nothing to vouch for. What follows (rotation) is
                # skipped: the newest verified checkpoint stays.
                self.message("warning", f"{folder} vanished before its manifest was written; no manifest", step)
                return
            except Exception as err:  # an I/O error must not kill training; the missing marker is the evidence
                self.message(
                    "error",
                    f"could not write the manifest of {folder} ({type(err).__name__}: {err}); it will not be chosen "
                    "for a resume, and checkpoint rotation was skipped so older verified checkpoints stay",
                    step,
                )
                return
            self.manifests += 1
            get_logger().info("[checkpoint_verifier] wrote %s", marker)
            if announce:
                self.message("info", announce, step)
            if after is not None:
                after(folder)

        return run

    def message(self, level: str, text: str, step: int | None) -> None:
        """Queue a report for the caller's thread (any thread may call it)."""
        with self._lock:
            self._messages.append((level, text, step))

    def has_messages(self) -> bool:
        return bool(self._messages)  # read without the lock: called every step, a stale answer is only late

    def take_messages(self) -> list[Message]:
        with self._lock:
            messages, self._messages = self._messages, []
        return messages

    def wait_checked(self) -> None:
        """Block until the pre-commit check of the newest submitted save has run (milliseconds), not its hashing."""
        self._checked.wait()

    def take_check_failures(self) -> list[tuple[Path, int, list[Any]]]:
        with self._lock:
            failures, self.check_failures = self.check_failures, []
        return failures

    def wait(self) -> None:
        """Block until every commit submitted so far is done (and what followed it)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()  # the job catches its own errors; this only waits

    def shutdown(self) -> None:
        """Wait, then stop the background thread (a later :meth:`submit` starts a new one)."""
        self.wait()
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
