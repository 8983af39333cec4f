"""CheckpointVerifier: a sha256 manifest for every save, and resumes only from a checkpoint that verifies."""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import distributed
from ..alerts import get_logger
from ..checks import checkpoint as _ckpt
from ..checks._resume import on_main_then_share
from ..errors import CheckpointIntegrityError
from ._base import GuardCallback

__all__ = ["CheckpointVerifier"]

_SAVE_HOOK_MARK = "_trainguard_save_hook"


def _default_workers() -> int:
    # Hashing shares the machine with training (data-loader workers, the host side of the step): take a few cores.
    return max(1, min(4, os.cpu_count() or 1))


class CheckpointVerifier(GuardCallback):
    """Writes a sha256 manifest into every checkpoint and makes a resume load only a checkpoint that verifies.

    **On every save** (``on_save``, on every rank): all ranks meet at a barrier, so every rank's files
    (``rng_state_K.pth``, sharded weights and optimizer state) are on disk; then the saving process hands the folder
    to one background thread that hashes every file and writes ``trainguard-manifest.json`` and, last,
    ``trainguard-manifest.sha256``: the commit marker. Training goes on meanwhile; the next save, ``on_train_end``
    and a failing ``train()`` wait for it.

    **Before a resume loads anything** (``trainer.train`` is wrapped at ``on_init_end``; the Trainer loads weights,
    optimizer and state before ``on_train_begin``): ``resume_from_checkpoint=True`` is resolved to the newest
    checkpoint that verifies; newer ones that fail are moved to ``output_dir/trainguard-quarantine/`` (renamed,
    never deleted) and an alert names each and why. An explicit path that fails is refused with
    :class:`~trainguard.CheckpointIntegrityError`. Only the main process checks and renames; every rank gets the
    same answer. If ``train`` was called around the wrapper, ``on_train_begin`` verifies the loaded checkpoint and
    refuses before the first step.

    **Rotation** (``save_total_limit``): the Trainer deletes old checkpoints inside its save, before the new one
    has a manifest; with ``save_total_limit=1`` that leaves, until the manifest is written, no verified checkpoint
    at all. With ``protect_rotation`` (default) that rotation is run after the new manifest is written instead, so
    a kill at any moment leaves at least one verified checkpoint. Disk peak is unchanged (``limit + 1``
    checkpoints), only held a little longer.

    Args:
        verify_resume: Verify before a resume (default True).
        set_aside: Move newer checkpoints that fail to ``trainguard-quarantine/`` (default True). With False they
            are skipped but stay in place, where the Trainer would later save into the same folder again.
        protect_rotation: Defer the Trainer's ``save_total_limit`` rotation until the new checkpoint's manifest is
            written (default True).
        background: Hash off the training thread (default True). False hashes inside ``on_save``.
        workers: Threads hashing one checkpoint's files (default: the CPU count, at most 4, so that hashing leaves
            cores to the data loader).
        alert_sinks: Replace the default alert sinks.
        webhook_url: Also POST alerts to this URL.

    Example::

        trainer = Trainer(..., callbacks=[trainguard.CheckpointVerifier()])
        trainer.train(resume_from_checkpoint=True)   # the newest checkpoint that verifies
    """

    guard_name = "checkpoint_verifier"

    def __init__(
        self,
        *,
        verify_resume: bool = True,
        set_aside: bool = True,
        protect_rotation: bool = True,
        background: bool = True,
        workers: int | None = None,
        alert_sinks: Any = None,
        webhook_url: str | None = None,
    ) -> None:
        super().__init__(alert_sinks=alert_sinks, webhook_url=webhook_url)
        self.verify_resume = bool(verify_resume)
        self.set_aside = bool(set_aside)
        self.protect_rotation = bool(protect_rotation)
        self.background = bool(background)
        self.workers = workers if workers is not None else _default_workers()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._lock = threading.Lock()
        # Reports from the hashing thread, turned into alerts on the training thread (sinks such as the Trainer's
        # log stream are not thread-safe).
        self._messages: list[tuple[str, str, int | None]] = []
        self._deferred_rotation: tuple[Any, dict[str, Any]] | None = None
        self._resume_checked = False
        self._manifests = 0
        self._set_aside: list[str] = []
        self._resumed_from: str | None = None

    # -------------------------------------------------------------------------------------------- wiring
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        super().on_init_end(args, state, control, **kwargs)
        if self.trainer is not None:
            self._install_save_hook(self.trainer)
        return control

    def _install_save_hook(self, trainer: Any) -> None:
        """Wrap this trainer's ``_save_checkpoint``: the only "a save begins" point there is (JIT saves call it
        too). Before the save: finish the previous manifest, so rotation and mtimes see it. During it: hold back
        the rotation until the new manifest exists (``protect_rotation``)."""
        original = getattr(trainer, "_save_checkpoint", None)
        if original is None or getattr(trainer, _SAVE_HOOK_MARK, False):
            return
        verifier = self

        @functools.wraps(original)
        def _save_checkpoint(*args: Any, **kwargs: Any) -> Any:
            verifier.wait()
            if not verifier.protect_rotation:
                return original(*args, **kwargs)
            import transformers.trainer as trainer_module

            rotate = getattr(trainer_module, "rotate_checkpoints", None)
            if rotate is None:
                return original(*args, **kwargs)

            def deferred(*r_args: Any, **r_kwargs: Any) -> None:
                verifier._deferred_rotation = (rotate, dict(r_kwargs, **_positional_rotation(r_args)))

            trainer_module.rotate_checkpoints = deferred
            try:
                return original(*args, **kwargs)
            finally:
                if trainer_module.rotate_checkpoints is deferred:
                    trainer_module.rotate_checkpoints = rotate

        trainer._save_checkpoint = _save_checkpoint
        setattr(trainer, _SAVE_HOOK_MARK, True)

    # ------------------------------------------------------------------------------------------- resume
    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> Any:
        self._resume_checked = True
        self.wait()
        if not self.verify_resume or resume_from_checkpoint is None or resume_from_checkpoint is False:
            return resume_from_checkpoint
        output_dir = getattr(trainer.args, "output_dir", None)
        try:
            outcome = on_main_then_share(self._resolve, output_dir, resume_from_checkpoint)
        except CheckpointIntegrityError as err:
            if distributed.is_main_process():
                self.alert("error", f"resume refused: {err.what}", evidence=err.evidence)
            raise
        if distributed.is_main_process():
            for line in outcome["set_aside"]:
                self.alert("warning", line)
        if outcome["path"] is None:
            return resume_from_checkpoint  # no checkpoint at all: the Trainer raises its own clear error
        self._resumed_from = outcome["path"]
        get_logger().info(
            "[checkpoint_verifier] resuming from %s (%s)", outcome["path"], outcome["status"]
        )
        return outcome["path"]

    def _resolve(self, output_dir: Any, resume_from_checkpoint: Any) -> dict[str, Any]:
        notes: list[str] = []

        def failed(report: _ckpt.CheckpointReport, moved: Path | None) -> None:
            where = f"set aside to {moved}" if moved is not None else "skipped (left in place)"
            notes.append(f"{report.path.name} failed verification, {where}: " + "; ".join(
                p.format() for p in report.problems
            ))
            self._set_aside.append(report.path.name)

        path = _ckpt.resolve_verified_resume(
            output_dir, resume_from_checkpoint, set_aside=self.set_aside, workers=self.workers, on_failure=failed
        )
        status = "not checked"
        if path is not None:
            status = "verified" if _ckpt.has_manifest(path) else "structural checks only: no manifest in this run"
        return {"path": str(path) if path is not None else None, "set_aside": notes, "status": status}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # The fallback when train() was reached around the wrapper (e.g. Trainer.train(trainer, ...)): the checkpoint
        # is loaded by now, but no optimizer step has run; refuse here rather than train on damaged state.
        if self.verify_resume and not self._resume_checked and int(state.global_step or 0) > 0:
            self._resume_checked = True
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"

            def check() -> str | None:
                if not folder.is_dir():
                    return None
                _ckpt.verify_checkpoint(folder, workers=self.workers)
                return str(folder)

            try:
                checked = on_main_then_share(check)
            except CheckpointIntegrityError as err:
                if distributed.is_main_process():
                    self.alert("error", f"the loaded checkpoint fails verification: {err.what}", evidence=err.evidence)
                raise
            if checked is None and distributed.is_main_process():
                self.alert(
                    "warning",
                    f"resumed at step {state.global_step} without the train() wrapper, and {folder} is not there: "
                    "the loaded checkpoint could not be verified",
                )
        return control

    # --------------------------------------------------------------------------------------------- saves
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._flush_messages(state)
        if control.should_save:
            self.wait()  # a save follows: the previous manifest must be complete before its rotation
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if control.should_save:
            self.wait()
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # Every rank reaches on_save, each as soon as its own files are written: meet before hashing so the
        # manifest covers every rank's files (rng_state_K.pth, sharded states).
        distributed.barrier()
        rotation, self._deferred_rotation = self._deferred_rotation, None
        if not args.should_save:
            return control
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        try:
            _ckpt.mark_run_uses_manifests(args.output_dir)
        except OSError as err:
            get_logger().warning("[checkpoint_verifier] could not write %s: %s", _ckpt.RUN_MARKER, err)
        job = functools.partial(self._manifest_job, folder, int(state.global_step), rotation)
        if self.background:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainguard-manifest")
                self._pending.append(self._executor.submit(job))
        else:
            job()
            self._flush_messages(state)
        return control

    def _manifest_job(self, folder: Path, step: int, rotation: tuple[Any, dict[str, Any]] | None) -> None:
        log = get_logger()
        try:
            marker = _ckpt.write_manifest(folder, step=step, workers=self.workers)
        except FileNotFoundError:
            # Removed before it was hashed (save_total_limit=1 cleanup at train end, a user's script): nothing to
            # vouch for. Rotation is skipped: the newest verified checkpoint stays.
            self._message("warning", f"{folder} vanished before its manifest was written; no manifest", step)
            return
        except Exception as err:  # an I/O error must not kill training; the missing marker is itself the evidence
            self._message(
                "error",
                f"could not write the manifest of {folder} ({type(err).__name__}: {err}); it will not be chosen "
                "for a resume, and checkpoint rotation was skipped so older verified checkpoints stay",
                step,
            )
            return
        self._manifests += 1
        log.info("[checkpoint_verifier] wrote %s", marker)
        if rotation is not None:
            rotate, kwargs = rotation
            try:
                rotate(**kwargs)
            except Exception as err:
                self._message("warning", f"deferred checkpoint rotation failed: {type(err).__name__}: {err}", step)

    def _message(self, level: str, text: str, step: int | None) -> None:
        with self._lock:
            self._messages.append((level, text, step))

    def _flush_messages(self, state: Any = None) -> None:
        if not self._messages:
            return  # runs every step: skip the lock while the background writer has nothing to say
        with self._lock:
            messages, self._messages = self._messages, []
        for level, text, step in messages:
            self.alert(level, text, step=step)

    def wait(self) -> None:
        """Block until every manifest submitted so far is written (and its deferred rotation done)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()  # the job catches its own errors; this only waits

    # ------------------------------------------------------------------------------------------------ end
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.wait()
        self._flush_messages(state)
        if self._deferred_rotation is not None:
            # A save without on_save (JIT checkpoint): its folder has no manifest, so keep the older verified ones.
            get_logger().info("[checkpoint_verifier] skipped a deferred rotation: its checkpoint has no manifest")
            self._deferred_rotation = None
        self._resume_checked = False
        self._shutdown()
        return super().on_train_end(args, state, control, **kwargs)

    def on_train_error(self, trainer: Any, exc: BaseException) -> None:
        self.wait()  # a save that completed still gets its commit marker
        self._resume_checked = False
        self._shutdown()
        with self._lock:
            messages, self._messages = self._messages, []
        for _level, text, _step in messages:
            get_logger().warning("[checkpoint_verifier] %s", text)

    def _shutdown(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def summary(self) -> str:
        parts = [f"{self._manifests} manifest(s) written"]
        if self._resumed_from:
            parts.append(f"resumed from {Path(self._resumed_from).name}")
        if self._set_aside:
            parts.append(f"set aside {', '.join(self._set_aside)}")
        return ", ".join(parts)


def _positional_rotation(args: tuple[Any, ...]) -> dict[str, Any]:
    names = ("output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime", "checkpoint_prefix")
    return dict(zip(names, args, strict=False))
