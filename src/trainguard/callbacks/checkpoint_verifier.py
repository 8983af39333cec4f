"""CheckpointVerifier: one run lineage per output_dir, a commit marker for every save, and resumes only from a
checkpoint of this lineage that verifies."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import distributed
from .._util import default_workers
from ..alerts import get_logger
from ..bounds import whole_number, yes_no
from ..checks import checkpoint as _ckpt
from ..checks import lineage as _lineage
from ..checks._layout import JIT_SENTINEL, CheckpointLayout
from ..checks._resume import on_main_then_share
from ..checks.checkpoint import start as _start
from ..checks.checkpoint.commit import Committer
from ..checks.checkpoint.manifest import known_digests
from ..errors import CheckpointIntegrityError, LineageError, ResumeAttestationError, TrainGuardError
from . import _nodes, _trainer_compat
from ._base import GuardCallback
from ._save_audit import SaveAuditor
from ._split_hashing import SplitHasher
from ._step_probe import install_step_probe

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["CheckpointVerifier"]

_EXISTING = _start.EXISTING_CHECKPOINTS


class CheckpointVerifier(GuardCallback):
    """Keeps an output_dir to one run lineage, commits every save with a sha256 manifest, and makes a resume load
    only a checkpoint of this lineage that verifies.

    **Before step 1** (``trainer.train`` is wrapped at ``on_init_end``: the Trainer loads a resumed checkpoint before
    ``on_train_begin``):

    - a *fresh start* into an output_dir that already holds ``checkpoint-N`` folders is refused with
      :class:`~trainguard.LineageError` naming them (``existing_checkpoints`` allows it deliberately). Checkpoints
      of this same Trainer's earlier ``train()`` (a notebook cell run again, ``model_init`` runs) are not another
      run's: a new lineage starts beside them, as the plain Trainer starts again from step 0;
    - ``resume_from_checkpoint=True`` resolves to the newest checkpoint *of the current run lineage* that verifies;
      newer ones of it that fail are moved to ``output_dir/trainguard-quarantine/`` (renamed, never deleted), and
      other runs' checkpoints are never chosen; an explicit path that fails is refused with
      :class:`~trainguard.CheckpointIntegrityError`. A resume continues the lineage of the checkpoint it loads.

    **Every save** (``_save_checkpoint`` is wrapped on this trainer, so JIT checkpoints are covered too): a folder
    already at ``checkpoint-N`` that this run did not just commit is moved into ``trainguard-archive/`` first, so
    the manifest lists only what this save wrote (a second save of the same step by this run is skipped); a saving
    marker goes in before the Trainer writes. When every rank's files are written, one background thread hashes
    them and writes ``trainguard-manifest.json`` (which records the lineage, run, step and how it was saved) and,
    last, ``trainguard-manifest.sha256``: the commit marker. Training goes on meanwhile.

    **Rotation** (``save_total_limit``) deletes only this lineage's committed checkpoints, never another run's, a
    legacy one, one set aside or the newest, and only after the new checkpoint's manifest is written.

    Args:
        verify_resume: Verify before a resume (default True).
        set_aside: Move newer checkpoints of the lineage that fail to ``trainguard-quarantine/`` (default True).
            With False they are skipped but stay in place.
        protect_rotation: Run the Trainer's ``save_total_limit`` rotation after the new checkpoint's manifest is
            written, not before (default True).
        existing_checkpoints: What a fresh start does when ``output_dir`` already holds checkpoints: ``"refuse"``
            (default), ``"keep"`` (start a new lineage beside them; they are never resumed, saved over or rotated by
            it) or ``"archive"`` (move them into ``trainguard-archive/`` first, as :func:`~trainguard.start_fresh`).
        audit: The save audit before each commit marker (``docs/save-audit.md``): ``"raise"`` (default: a hollow save
            is not committed and the run stops at it, on every rank, with :class:`~trainguard.SaveAuditError`;
            every step trained on top of it would be lost work), ``"alert"`` (not committed, the run goes on) or
            ``"off"``. Also a save dry-run before step 1.
        attest_resume: After a resume loaded everything, and at its first step, compare with what the run had at
            that save (optimizer, learning rate, batch geometry, data position, RNG): ``"alert"`` (default),
            ``"raise"`` (:class:`~trainguard.ResumeAttestationError` on an error-level finding) or ``"off"``.
        background: Hash off the training thread (default True). False hashes inside ``on_save``.
        workers: Threads hashing one checkpoint's files (default: the CPU count, at most 4).
        alert_sinks: Replace the default alert sinks.
        webhook_url: Also POST alerts to this URL.

    Raises:
        LineageError: At ``train()``: a fresh start into an output_dir holding checkpoints (``"refuse"``), or
            ``resume_from_checkpoint=True`` where every checkpoint belongs to another lineage.
        CheckpointIntegrityError: At ``train()``: the explicit checkpoint, or every checkpoint of the lineage,
            fails verification.

    Example::

        trainer = Trainer(..., callbacks=[trainguard.CheckpointVerifier()])
        trainer.train(resume_from_checkpoint=True)   # the newest checkpoint of this run lineage that verifies
    """

    guard_name = "checkpoint_verifier"

    def __init__(
        self,
        *,
        verify_resume: bool = True,
        set_aside: bool = True,
        protect_rotation: bool = True,
        existing_checkpoints: str = "refuse",
        audit: str = "raise",
        attest_resume: str = "alert",
        background: bool = True,
        workers: int | None = None,
        alert_sinks: Any = None,
        webhook_url: str | None = None,
    ) -> None:
        super().__init__(alert_sinks=alert_sinks, webhook_url=webhook_url)
        if existing_checkpoints not in _EXISTING:
            raise ValueError(f"existing_checkpoints must be one of {_EXISTING}, not {existing_checkpoints!r}")
        self.verify_resume = yes_no("verify_resume", verify_resume, owner="CheckpointVerifier")
        self.set_aside = yes_no("set_aside", set_aside, owner="CheckpointVerifier")
        self.protect_rotation = yes_no("protect_rotation", protect_rotation, owner="CheckpointVerifier")
        self.existing_checkpoints = existing_checkpoints
        self.background = yes_no("background", background, owner="CheckpointVerifier")
        # Hashing shares the machine with training (data-loader workers, the host side of the step): a few cores.
        workers = whole_number("workers", workers, low=1, high=1024, allow_none=True, owner="CheckpointVerifier")
        self.workers = workers if workers is not None else default_workers(4)
        # Looked up on the package at every commit, so a wrapped write_manifest (tests, tools) is the one used.
        self._committer = Committer(
            write=lambda *a, **k: _ckpt.write_manifest(*a, **k), workers=self.workers, background=self.background
        )
        self._split = SplitHasher(workers=self.workers)
        self._deferred_rotation: tuple[str, int | None, str | None] | None = None
        self._save: dict[str, Any] | None = None  # the save in progress, from before_save to its commit
        self._resume_checked = False
        self._skipped_saves = 0
        self._set_aside: list[str] = []
        self._resumed_from: str | None = None
        self.lineage: str | None = None
        self.run: str | None = None
        self._adopts_unrecorded = False
        self._parent: _lineage.CheckpointOrigin | None = None
        self._registered: str | None = None
        # Lineages this Trainer trained in (each train() that reached on_train_begin): a later fresh train() on the
        # same Trainer starts beside their checkpoints instead of refusing them as another run's.
        self._own_lineages: set[str] = set()
        self._hooked = False
        self._decision: _start.StartDecision | None = None
        self._began = False
        self._nodes: _nodes.NodeView | None = None
        self._node_gaps: list[Any] = []
        self._auditor = SaveAuditor(
            audit=audit,
            attest_resume=attest_resume,
            alert=self.alert,
            refuse_together=self.refuse_together,
            late_failures=self._late_audit_failures,
        )

    # -------------------------------------------------------------------------------------------- wiring
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        super().on_init_end(args, state, control, **kwargs)
        self.context.add_background(self, self.wait)  # others wait for its manifests through the context
        if self.trainer is not None:
            missing = _trainer_compat.install_checkpoint_hooks(self.trainer, self)
            for feature in missing:
                get_logger().warning("[checkpoint_verifier] off on this transformers version: %s", feature)
            self._hooked = not any(feature.startswith("save hooks") for feature in missing)
            if self._auditor.attest != "off":
                install_step_probe(self.trainer).subscribe(self, before_step=self._auditor.before_step)
        return control

    # ------------------------------------------------------------------------------------------- resume
    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> Any:
        self._resume_checked = True
        self.context.add_background(self, self.wait)  # also when added with add_callback() after __init__
        self.wait()
        output_dir = getattr(trainer.args, "output_dir", None)
        fresh = resume_from_checkpoint is None or resume_from_checkpoint is False
        node_local = self._survey_nodes(trainer, output_dir)

        def decide(max_step: int | None = None) -> _start.StartDecision:
            if fresh:
                return _start.decide_fresh_start(output_dir, self.existing_checkpoints, self._own_lineages)
            return _start.decide_resume(
                output_dir,
                resume_from_checkpoint,
                verify=self.verify_resume,
                # one node's copy may fail where another's does not: leave it in place for the user to gather
                set_aside=self.set_aside and not node_local,
                workers=self.workers,
                max_step=max_step,
            )

        # Every rank hashes its share of the checkpoint the resume verifies first (one folder for all of them).
        known = self._split.share_verify(output_dir, resume_from_checkpoint) if self._splits() and not fresh else None
        try:
            if node_local and self._nodes is not None:
                decision: _start.StartDecision = _nodes.decide_on_every_node(
                    self._nodes,
                    decide,
                    resume=resume_from_checkpoint,
                    bounded=resume_from_checkpoint is True and self.verify_resume,
                    gaps=self._node_gaps,
                )
            else:
                with known_digests(known):
                    decision = on_main_then_share(decide)
        except (CheckpointIntegrityError, LineageError) as err:
            if distributed.is_main_process():
                self.alert(
                    "error", f"{'start' if fresh else 'resume'} refused: {err.what}", evidence=err.evidence, raised=True
                )
            raise
        self._adopt(decision)
        self._decision = decision
        if not fresh and decision.path is not None:
            self._check_engine(trainer, decision.path)
        if fresh or decision.path is None:
            return resume_from_checkpoint  # no checkpoint at all: the Trainer raises its own clear error
        self._resumed_from = decision.path
        get_logger().info("[checkpoint_verifier] resuming from %s (%s)", decision.path, decision.status)
        return decision.path

    def _check_engine(self, trainer: Any, path: str) -> None:
        """Before anything loads, on every rank together: can this run's engine read the checkpoint at all?"""
        from ..checks.checkpoint.layouts import checkpoint_layout, loader_mismatch

        problem = None
        what = loader_mismatch(checkpoint_layout(path), _trainer_compat.engine_layout(trainer))
        if what is not None:
            problem = ResumeAttestationError(
                f"refusing to resume from {Path(path).name}: {what}",
                where={"file": str(path), "rank": distributed.rank()},
                next_step=(
                    "Resume with the engine and state-dict type that wrote it, or start a new run (a new output_dir) "
                    "from its weights (for FSDP's sharded files, `accelerate merge-weights` makes them loadable)."
                ),
            )
        self.refuse_together(
            problem,
            placeholder=lambda: ResumeAttestationError(
                f"refusing to resume from {Path(path).name}: another rank cannot load it (see that rank's log)",
                where={"rank": distributed.rank()},
            ),
        )

    def _survey_nodes(self, trainer: Any, output_dir: Any) -> bool:
        """Before step 1, on every rank: the job's nodes and whether they share ``output_dir``; what each node's copy
        will lack, said now rather than at the resume. True when each node has a folder of its own."""
        self._nodes = _nodes.survey(str(output_dir) if output_dir else None)
        self._node_gaps = []
        self._auditor.absent_ok = ()
        if self._nodes is None:
            return False
        self._node_gaps = _nodes.node_gaps(self._nodes, trainer)
        if distributed.is_main_process():
            for level, text in _nodes.storage_notes(self._nodes, trainer, self._node_gaps):
                self.alert(level, text) if level != "info" else get_logger().info("[checkpoint_verifier] %s", text)
        node_local = not self._nodes.shared
        if node_local and getattr(trainer.args, "save_on_each_node", False):
            self._auditor.absent_ok = tuple(g.path for g in self._node_gaps[self._nodes.node])
        return node_local

    def _splits(self) -> bool:
        """Whether hashing is split over the ranks: several of them, writing into one folder."""
        return distributed.is_distributed() and (self._nodes is None or self._nodes.shared)

    def _writes(self, args: Any) -> bool:
        """Whether this rank writes trainguard's files for its folder: the Trainer's writer, once per folder (a
        folder every node sees gets them from rank 0 only, even with ``save_on_each_node``)."""
        if self._nodes is not None and self._nodes.shared:
            return distributed.is_main_process()
        return bool(getattr(args, "should_save", distributed.is_main_process()))

    def _adopt(self, decision: _start.StartDecision) -> None:
        self.lineage, self.run = decision.lineage, decision.run
        self._adopts_unrecorded = decision.adopts_unrecorded
        self._parent = decision.parent
        self._registered = None
        self._set_aside.extend(decision.failed)
        node_writer = self._nodes is not None and not self._nodes.shared and distributed.is_local_main_process()
        if distributed.is_main_process() or node_writer:
            for level, line in decision.notes:
                self.alert(level, line)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        if not self._resume_checked:
            # train() was reached around the wrapper (e.g. Trainer.train(trainer, ...)): whatever was loaded is
            # loaded, but no optimizer step has run; refuse here rather than train on damaged or foreign state.
            self._resume_checked = True
            if int(state.global_step or 0) > 0:
                self._check_loaded(args, state)
            else:
                try:
                    self._adopt(
                        on_main_then_share(
                            _start.decide_fresh_start, args.output_dir, self.existing_checkpoints, self._own_lineages
                        )
                    )
                except LineageError as err:
                    if distributed.is_main_process():
                        self.alert("error", f"start refused: {err.what}", evidence=err.evidence, raised=True)
                    raise
        if self.lineage is None:
            self._adopt(_start.StartDecision())
        self._own_lineages.add(str(self.lineage))
        if self._writes(args) and self._registered != self.run and args.output_dir:
            # After every guard's before_train passed and the checkpoint loaded: only a run that trains becomes the
            # output_dir's current lineage.
            try:
                _lineage.record_run(
                    args.output_dir,
                    lineage=str(self.lineage),
                    run=str(self.run),
                    adopts_unrecorded=self._adopts_unrecorded,
                    resumed_from=self._parent,
                    world_size=distributed.world_size(),
                )
                self._registered = self.run
            except (OSError, TrainGuardError) as err:
                get_logger().warning("[checkpoint_verifier] could not record the run lineage: %s", err)
        trainer = self.trainer
        if trainer is not None and not self._began:  # auto_find_batch_size re-enters on_train_begin: once
            self._began = True
            self._auditor.dry_run(trainer)
            if int(state.global_step or 0) > 0:
                self._auditor.after_resume(trainer, self._decision, kwargs.get("train_dataloader"))
        return control

    def _check_loaded(self, args: Any, state: Any) -> None:
        folder = _trainer_compat.checkpoint_layout(self.trainer, args).folder_for(state.global_step)
        try:
            checked = (
                on_main_then_share(_start.check_loaded, folder, args.output_dir, self.workers)
                if self.verify_resume
                else None
            )
        except CheckpointIntegrityError as err:
            if distributed.is_main_process():
                self.alert(
                    "error",
                    f"the loaded checkpoint fails verification: {err.what}",
                    evidence=err.evidence,
                    raised=True,
                )
            raise
        if checked is not None:
            self._adopt(checked)
            self._decision = checked
        elif self.verify_resume and distributed.is_main_process():
            self.alert(
                "warning",
                f"resumed at step {state.global_step} without the train() wrapper, and {folder} is not there: "
                "the loaded checkpoint could not be verified",
            )

    # --------------------------------------------------------------------------------- save hooks (compat)
    def _record(self, trainer: Any, step: int, saved_by: str) -> dict[str, Any]:
        args = trainer.args
        return {
            "lineage": self.lineage,
            "run": self.run,
            "step": step,
            "saved_by": saved_by,
            "save_only_model": bool(getattr(args, "save_only_model", False)),
            "world_size": distributed.world_size(),
            "save_on_each_node": bool(getattr(args, "save_on_each_node", False)),
            "parent": self._parent.path.name if self._parent is not None else None,
            **self._node_copy(args),
        }

    def _node_copy(self, args: Any) -> dict[str, Any]:
        """For one node's copy of a node-local save: which node, and what it lacks to be resumed alone."""
        view = self._nodes
        if view is None or view.shared or not getattr(args, "save_on_each_node", False):
            return {}
        lacks = [{"path": g.path, "why": g.why} for g in self._node_gaps[view.node] if not g.harmless]
        return {"node_copy": {"node": view.node, "nodes": view.count, "lacks": lacks}}

    def before_save(self, trainer: Any, run_dir: str) -> bool:
        """Every rank, before the Trainer writes: clear the target folder and put the saving marker in."""
        self.wait()  # the previous manifest first: rotation and the folder checks below must see it
        if self.lineage is None:  # a save outside train() (e.g. a direct _save_checkpoint call)
            self._adopt(_start.StartDecision())
        step = int(trainer.state.global_step)
        folder = CheckpointLayout(run_dir).folder_for(step)
        jit = (folder / JIT_SENTINEL).is_file()  # JIT checkpointing writes it just before calling the save
        decision, commit = "save", True
        if self._writes(trainer.args):
            try:
                target = _lineage.prepare_save_target(folder, lineage=self.lineage, run=self.run, step=step)
                if target.action == "skip":
                    decision = "skip"
                else:
                    _lineage.begin_save(folder, self._record(trainer, step, "jit" if jit else "pending"))
                    if target.action == "moved":
                        # An earlier train() of this same Trainer saved there: the plain Trainer would overwrite it
                        # in place, so moving it is no news; another run's or a plain Trainer's folder is.
                        previous = target.previous.lineage if target.previous is not None else None
                        level = "info" if previous in self._own_lineages else "warning"
                        self._message(level, f"{target.reason}; moved to {target.moved_to} (nothing deleted)", step)
            except OSError as err:
                # Without the move, the Trainer would write into a folder that holds files it did not write: let the
                # save happen (the run must not die for it), but never commit it.
                commit = False
                self._message(
                    "error",
                    f"could not prepare {folder} for the save ({type(err).__name__}: {err}); the save goes ahead but "
                    "gets no commit marker, so a resume will not choose it",
                    step,
                )
        decision = distributed.broadcast_object(decision)  # rank 0's files decide; every rank saves, or none
        if decision == "skip":
            self._skipped_saves += 1
            self._message(
                "info",
                f"a second save of step {step} ({'a JIT checkpoint' if jit else 'no on_save'}) was skipped: "
                f"{folder.name} is already committed by this run at this step",
                step,
            )
            return False
        self._save = {"folder": folder, "run_dir": run_dir, "step": step, "jit": jit, "commit": commit}
        return True

    def after_save(self, trainer: Any, run_dir: str) -> None:
        """Every rank, after the Trainer's save returned. A save with ``on_save`` to come is committed there (after
        callbacks before this one added their files); a save that bypasses ``on_save`` is committed now."""
        save = self._save
        if save is None:
            return
        if bool(getattr(trainer.control, "should_save", False)):
            save["saved_by"] = "on_save"
            return
        self._save = None
        save["saved_by"] = "jit" if save["jit"] else "direct (no on_save)"
        distributed.barrier()  # every rank's files are written
        save["commit"] = self._auditor.audit_save(trainer, save["folder"], save["step"]) and save["commit"]
        if self._writes(trainer.args):
            self._commit(trainer, save, announce=True)

    def rotate(self, run_dir: str, limit: int | None, best: str | None) -> None:
        if self.protect_rotation:
            self._deferred_rotation = (run_dir, limit, best)
            return
        self._run_rotation((run_dir, limit, best), newest=None, step=None)

    def end_of_training_candidates(self, run_dir: str, best: str | None) -> list[str]:
        # The Trainer deletes every listed checkpoint but the best: list only this lineage's, never its newest.
        mine = _lineage.lineage_checkpoints(run_dir, self.lineage)
        return [str(o.path) for o in mine[:-1]]

    def _run_rotation(
        self, rotation: tuple[str, int | None, str | None], newest: Path | None, step: int | None
    ) -> None:
        run_dir, limit, best = rotation
        try:
            deleted = _lineage.rotate(
                run_dir, limit=limit, lineage=self.lineage, protect=[best, newest], unfinished=newest is None
            )
        except Exception as err:
            self._message("warning", f"checkpoint rotation failed: {type(err).__name__}: {err}", step)
            return
        if deleted:
            get_logger().info(
                "[checkpoint_verifier] save_total_limit=%s: deleted %s of this lineage",
                limit,
                ", ".join(p.name for p in deleted),
            )

    # --------------------------------------------------------------------------------------------- saves
    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        self._auditor.step_end(str(args.output_dir), int(state.global_step))
        self._flush_messages(state)
        if control.should_save:
            self.wait()  # a save follows: the previous manifest must be complete before its rotation
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        if control.should_save:
            self.wait()
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        # Every rank reaches on_save, each as soon as its own files are written: meet before hashing so the
        # manifest covers every rank's files (rng_state_K.pth, sharded states, files other callbacks add here).
        distributed.barrier()
        save, self._save = self._save, None
        if save is None:
            if self._hooked:
                return control  # this save was skipped (already committed by this run at this step)
            # The save hooks are not installed (the Trainer was not found at on_init_end): commit what is there.
            layout = _trainer_compat.checkpoint_layout(self.trainer, args)
            folder = layout.folder_for(state.global_step)
            save = {"folder": folder, "run_dir": str(layout.root), "step": int(state.global_step), "jit": False,
                    "commit": True, "saved_by": "on_save"}  # fmt: skip
        # The audit is a collective (every rank agrees), so it runs before the writing-rank-only part.
        save["commit"] = self._auditor.audit_save(self.trainer, save["folder"], save["step"]) and save["commit"]
        self._auditor.arm_after_save(save["folder"].name, self.run)
        if save["commit"] and self._splits():
            save["known"] = self._split.share_save(save["folder"], writer=self._writes(args))
        if not self._writes(args):
            self._deferred_rotation = None
            return control
        self._commit(self.trainer, save, announce=False)
        if not self.background:
            self._flush_messages(state)
        return control

    def _commit(self, trainer: Any, save: dict[str, Any], *, announce: bool) -> None:
        rotation, self._deferred_rotation = self._deferred_rotation, None
        if not save["commit"]:
            return  # the folder could not be prepared: no marker, and no rotation of the verified ones
        record = (
            self._record(trainer, save["step"], save["saved_by"])
            if trainer is not None
            else {"lineage": self.lineage, "run": self.run, "step": save["step"], "saved_by": save["saved_by"]}
        )
        facts = self._auditor.facts(trainer)
        if facts is not None:
            record["resume"] = facts
        guards = self._guard_records(trainer)
        if guards:
            record["guards"] = guards
        step = save["step"]
        after = functools.partial(self._after_commit, rotation, step) if rotation is not None else None
        note = (
            f"committed {save['folder'].name}, saved without on_save ({save['saved_by']}): it has its manifest like "
            "every other save"
        )
        self._committer.submit(
            save["folder"],
            step,
            record,
            after=after,
            announce=note if announce else None,
            check=self._auditor.pre_commit_check(),
            known=save.get("known"),
        )

    def _guard_records(self, trainer: Any) -> dict[str, Any]:
        """What the other guards on this trainer commit with this save (:meth:`GuardCallback.manifest_record`)."""
        records: dict[str, Any] = {}
        for callback in list(getattr(getattr(trainer, "callback_handler", None), "callbacks", []) or []):
            if callback is self or not isinstance(callback, GuardCallback):
                continue
            try:
                value = callback.manifest_record()
            except Exception as err:  # a guard's record must never cost the commit
                get_logger().warning("[checkpoint_verifier] %s gave no manifest record: %s", callback.guard_name, err)
                continue
            if value:
                records[callback.guard_name] = dict(value)
        return records

    def _late_audit_failures(self) -> list[Any]:
        self._committer.wait_checked()  # the optimizer check of the last save: milliseconds, not the hashing
        return self._committer.take_check_failures()

    def _after_commit(self, rotation: tuple[str, int | None, str | None], step: int, folder: Path) -> None:
        self._run_rotation(rotation, newest=folder, step=step)

    def _message(self, level: str, text: str, step: int | None) -> None:
        self._committer.message(level, text, step)

    def _flush_messages(self, state: Any = None) -> None:
        if not self._committer.has_messages():
            return  # runs every step: skip the lock while the background writer has nothing to say
        messages = self._committer.take_messages()
        if not distributed.is_main_process():
            for level, text, _step in messages:
                if level in ("warning", "error"):
                    get_logger().warning("[checkpoint_verifier] %s", text)
            return
        for level, text, step in messages:
            self.alert(level, text, step=step)

    def wait(self) -> None:
        """Block until every manifest submitted so far is written (and its deferred rotation done), and this rank's
        shares of split manifests are on disk."""
        self._split.wait()
        self._committer.wait()

    # ------------------------------------------------------------------------------------------------ end
    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        self.wait()
        self._flush_messages(state)
        self._deferred_rotation = None
        self._resume_checked = False
        self._began = False
        self._committer.shutdown()
        return super().on_train_end(args, state, control, **kwargs)

    def after_train(self, trainer: Any, output: Any) -> None:
        self.wait()  # a save after on_train_end (the user's own _save_checkpoint call) still gets its marker
        self._auditor.check_late(int(trainer.state.global_step))  # a hollow last save (no step followed it)
        for _level, text, _step in self._committer.take_messages():
            get_logger().info("[checkpoint_verifier] %s", text)

    def on_train_error(self, trainer: Any, exc: BaseException) -> None:
        self._committer.shutdown()  # a save that completed still gets its commit marker
        self._resume_checked = False
        for _level, text, _step in self._committer.take_messages():
            get_logger().warning("[checkpoint_verifier] %s", text)

    @property
    def manifests_written(self) -> int:
        """Manifests this guard has written so far (its saves committed)."""
        return int(self._committer.manifests)

    def key_figures(self) -> dict[str, Any]:
        lineage = {"lineage": str(self.lineage)} if self.lineage else {}
        return {**lineage, "manifests_written": self.manifests_written, **super().key_figures()}

    def summary(self) -> str:
        parts = [f"{self.manifests_written} manifest(s) written"]
        if self.lineage:
            parts.append(f"lineage {self.lineage}")
        if self._resumed_from:
            parts.append(f"resumed from {Path(self._resumed_from).name}")
        if self._skipped_saves:
            parts.append(f"{self._skipped_saves} repeated save(s) skipped")
        if self._set_aside:
            parts.append(f"set aside {', '.join(self._set_aside)}")
        if self._split.hashed_files:
            parts.append(f"hashed {self._split.hashed_files} file(s) as this rank's share")
        audit = self._auditor.summary()
        return ", ".join([*parts, audit] if audit else parts)
