"""``RunLock``: one run per ``output_dir``, refused at Trainer construction, never a stale lock."""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Any

from .. import distributed
from ..alerts import AlertSink
from ..bounds import yes_no
from ..checks.run_lock import INFO_NAME, LOCK_NAME, RunLockHandle, acquire_run_lock, read_holder
from ..errors import RunLockedError, TrainGuardError, at_call_site
from ._base import GuardCallback

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["RunLock"]


class RunLock(GuardCallback):
    """Hold an exclusive, kernel-released lock on ``output_dir`` for the life of the process.

    Taken at ``on_init_end`` (the end of ``Trainer(...)``, before the model is prepared, a checkpoint is loaded or
    a step runs) by the process that writes checkpoints (``args.should_save``: global rank 0, or local rank 0 of
    each node with ``save_on_each_node``). Whether to refuse is shared with every rank through ``any_rank``, so
    all ranks of a job raise :class:`~trainguard.RunLockedError` together and ranks of one job never lock each
    other out. The lock is kept when training ends (a second ``trainer.train()`` or ``auto_find_batch_size``
    retries reuse it) and released when the process exits or :meth:`release` is called.

    Args:
        on_unsupported: What to do where the filesystem refuses ``flock`` (Lustre without ``-o flock``, some FUSE):
            ``"warn"`` (default: alert and run unprotected, because refusing would make the guard unusable there)
            or ``"error"`` (raise :class:`~trainguard.PreflightError`).
        release_at_train_end: Release when ``train()`` finishes (it is taken again by the next ``train()``).
            Default False: after ``train()`` a script usually still writes into ``output_dir`` (``save_model``,
            evaluation, a push), and the run owns the folder until the process ends. True suits notebooks whose
            kernel outlives the run.
        alert_sinks: Replace the default alert sinks.
        webhook_url: Also POST warnings and worse to this URL.

    Raises:
        RunLockedError: At ``Trainer(...)``, when another live process holds the lock; names its PID, host, UTC
            start time and command.
        UnsafeFileError: At ``Trainer(...)``, when a link, FIFO, device or socket is at the lock's name or its
            holder record's (never followed, never blocked on: the start is refused instead of writing beside a
            link's target). The holder record never holds a secret: the command line is redacted and the file is
            ``0600``.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[trainguard.RunLock()])
        # a second process on the same output_dir: RunLockedError naming the first's PID
    """

    guard_name = "run_lock"

    def __init__(
        self,
        *,
        on_unsupported: str = "warn",
        release_at_train_end: bool = False,
        alert_sinks: list[AlertSink] | None = None,
        webhook_url: str | None = None,
    ) -> None:
        super().__init__(alert_sinks=alert_sinks, webhook_url=webhook_url)
        if on_unsupported not in ("warn", "error"):
            raise ValueError(f"RunLock(on_unsupported=...) must be 'warn' or 'error', not {on_unsupported!r}")
        self.on_unsupported = on_unsupported
        self.release_at_train_end = yes_no("release_at_train_end", release_at_train_end, owner="RunLock")
        self.handle: RunLockHandle | None = None
        self._locked_dir: str | None = None
        self._released_dir: str | None = None  # what release() gave back, for a summary that is still true

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        super().on_init_end(args, state, control, **kwargs)
        try:
            self._take(args)
        except TrainGuardError as err:  # it names the holder and what to do: the frames below add nothing
            raise at_call_site(err)  # noqa: B904 - trainguard refused: the message below says why
        return control

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        # Normally a no-op (taken at init); covers a changed args.output_dir and callbacks added after init.
        self._take(args)
        return control

    def _take(self, args: Any) -> None:
        output_dir = os.path.abspath(str(args.output_dir))
        if self._locked_dir == output_dir:  # the same on every rank, so the collectives below stay paired
            return
        job_id: str | None = None
        if getattr(args, "save_on_each_node", False) and distributed.world_size() > 1:
            # Several writers (one per node) may share one filesystem: they carry the job's id and accept each other.
            job_id = distributed.broadcast_object(uuid.uuid4().hex if distributed.is_main_process() else None)
        problem: BaseException | None = None
        handle: RunLockHandle | None = None
        if getattr(args, "should_save", distributed.is_main_process()):
            try:
                handle = acquire_run_lock(
                    output_dir,
                    job_id=job_id,
                    on_unsupported=self.on_unsupported,
                    extra={"rank": distributed.rank(), "world_size": distributed.world_size()},
                )
            except Exception as exc:  # refused, or no output_dir: every rank must learn of it
                problem = exc
        try:
            # No alert: the refused run must not write into a folder another run owns; the error is the message.
            self.refuse_together(problem, placeholder=lambda: _other_rank_refused(output_dir), alert_level=None)
        except BaseException:
            if handle is not None:
                handle.release()  # this rank got its lock, another did not: the job does not start, hold nothing
            raise
        if self.handle is not None and self.handle is not handle:
            self.handle.release()  # output_dir changed between init and train: hold only the current one
        self.handle = handle
        self._locked_dir = output_dir
        self._released_dir = None
        if handle is not None and (not handle.enforced or handle.reach != "ok"):
            self.alert("warning", f"run lock on {output_dir}: {handle.note}", evidence={"reach": handle.reach})

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        if self.release_at_train_end:
            self.release()
        return super().on_train_end(args, state, control, **kwargs)

    def release(self) -> None:
        """Release the lock now (it is otherwise held until the process exits)."""
        if self.handle is not None:
            self.handle.release()
            if self.handle.enforced:
                self._released_dir = self._locked_dir
        self.handle = None
        self._locked_dir = None

    def summary(self) -> str:
        # True when read, also after this process ends: the lock lives as long as the process, so a line printed at
        # the end of a script says so rather than "holds ... (PID n)", which is false by the time anyone acts on it.
        if self.handle is None:
            if self._released_dir is not None:
                return f"{self._released_dir} was locked against other runs; released"
            return "no lock taken on this rank (not a writing rank)" if self._locked_dir else "no lock taken yet"
        if not self.handle.enforced:
            return f"NOT locked ({self.handle.note})"
        if not self.handle.held:
            return f"{self._locked_dir} was locked against other runs; {self.handle.note or 'released'}"
        reach = "" if self.handle.reach == "ok" else f" ({self.handle.reach}: {self.handle.note})"
        return f"{self._locked_dir} locked against other runs until this process exits{reach}"


def _other_rank_refused(output_dir: str) -> RunLockedError:
    """The error of a rank that writes nothing when the writing rank of its job was refused the lock."""
    # This rank writes nothing; the writing rank that was refused raised the full message. Name the
    # holder here too when its record is readable from this node.
    holder = read_holder(os.path.join(output_dir, INFO_NAME)) or {}
    who = (
        f": PID {holder.get('pid')} on {holder.get('host')}, started {holder.get('started_utc')} (UTC), "
        f"command: {holder.get('command')}"
        if holder.get("pid") is not None and "released_utc" not in holder
        else " (see that rank's error)"
    )
    return RunLockedError(
        f"the writing rank of this job could not lock {output_dir}{who}",
        where={
            "file": os.path.join(output_dir, LOCK_NAME),
            "rank": distributed.rank(),
            "host": holder.get("host", "unknown"),
            "pid": holder.get("pid", "unknown"),
        },
        evidence={"holder": holder},
    )
