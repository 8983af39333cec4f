"""Committing saves off the training thread: one background thread writes each checkpoint's manifest (its commit
marker) in the order the saves happened, then runs what must follow that commit (the held-back rotation); what it
has to report is collected for the caller's thread (alert sinks such as the Trainer's log stream are not
thread-safe).

Example::

    committer = Committer(write=write_manifest, workers=4)
    committer.submit(Path("out/checkpoint-50"), 50, lineage_record)
    committer.wait()                       # before the next save, at the end of training
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ...alerts import get_logger

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

    def submit(
        self,
        folder: Path,
        step: int,
        record: Mapping[str, Any],
        *,
        after: Callable[[Path], None] | None = None,
        announce: str | None = None,
    ) -> None:
        """Commit ``folder``; then call ``after(folder)`` (only when the manifest was written); report ``announce``
        (info) once committed."""
        job = self._job(folder, step, dict(record), after, announce)
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
    ) -> Callable[[], None]:
        def run() -> None:
            try:
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
