"""``SpikeGuard``: see a loss or gradient-norm spike at the step it happens, and alert, skip the update, or roll back.

The Trainer adapter: per-step values (the cross-rank mean loss, the gradient norm) from the Trainer's one step probe
(:mod:`._step_probe`, shared with NanGuard), the policy. The z-score, the sample ids and the choice of checkpoint
live in :mod:`trainguard.checks.spike`.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, ClassVar

from .. import distributed
from .._util import drop_gradients, utc_now
from ..alerts import AlertSink, get_logger
from ..atomic import append_line
from ..bounds import MAX_FACTOR, finite_number, whole_number, yes_no
from ..checks._layout import checkpoint_step
from ..checks.lineage import checkpoint_origin
from ..checks.nan import StepFlags, process_topology
from ..checks.spike import (
    POLICIES,
    SpikeDetector,
    SpikeFinding,
    dataset_indices,
    rollback_target,
    row_digest,
    rows_of,
    spike_message,
)
from ..checks.spike_history import (
    MAX_RECORDS,
    ResumeSkips,
    Rollback,
    committed_rollbacks,
    describe_steps,
    plan_resume_skips,
    read_history,
)
from ..errors import LossSpikeError
from . import _trainer_compat
from ._base import GuardCallback, find_trainer
from ._step_probe import StepProbe, install_step_probe

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["SPIKES_FILE", "SpikeGuard"]

#: The run's spike history in ``output_dir``: one JSON object a line (every spike, skip and rollback).
SPIKES_FILE = "trainguard-spikes.jsonl"

#: Micro-batches held for one optimizer step at most (gradient accumulation beyond this keeps the newest ones).
_MAX_HELD = 1024


class SpikeGuard(GuardCallback):
    """Catch loss and gradient-norm spikes as they happen and act on them: alert, skip the update, or roll back.

    Each optimizer step's **raw training loss** (the mean of its micro-batches' losses as ``training_step``
    returns them, averaged over ranks) and **gradient norm** (the one the Trainer computes for clipping) are
    compared with the previous ``window`` steps: a value more than ``threshold`` robust standard deviations above
    the window's median (from the median absolute deviation), once ``warmup`` steps have been seen, and more than
    20 times above it as the largest rise the window already holds (a heavy-tailed run's hard rows are its own
    tail, not spikes), is a spike. Inside the warm-up a loss at least 10 times the median so far is named too,
    as an alert only under every policy. The sizes are OLMo-core's (128 steps, 6 deviations, 64 steps of warmup).

    What happens then depends on ``policy``; every spike is an alert naming the step, the z-score and the batch's
    samples (their ``train_dataset`` indices where the rows can be found there, else a digest of their tokens), and
    a line in ``trainguard-spikes.jsonl`` in the ``output_dir``:

    - ``"alert"`` (default): tell, change nothing.
    - ``"skip"``: the spike step's optimizer update is not applied, on every rank together (its gradients are
      dropped before ``optimizer.step()``; the learning-rate schedule still advances, the batch counts as seen).
    - ``"rollback"``: stop at the spike before its update, resume from the newest verified checkpoint at or before
      ``spike_step - skip_batches`` (``trainer.train()`` runs again from it, in the same call), and skip the updates
      of the ``skip_batches`` batches ending at the spike. Every checkpoint committed after that carries the
      rollback in its manifest (with :class:`~trainguard.CheckpointVerifier`), and a later resume with policy
      ``rollback`` from an older checkpoint of that lineage skips the same steps again, with an alert naming them,
      so the run is reproducible. Lines in ``trainguard-spikes.jsonl`` are never obeyed: one that no committed
      manifest confirms is reported (file and line) and ignored. After
      ``max_rollbacks`` rollbacks, or with no verified checkpoint to go back to, the run stops with
      :class:`~trainguard.LossSpikeError`.

    Cost: on CPU every value is already on the host. On an accelerator, with ``alert`` or ``rollback`` the step's
    values are copied to the host behind the step's work and judged one step later (no extra host synchronisation;
    a step that saves, evaluates or ends is judged at once, so a spike is never checkpointed); ``skip`` must decide
    before the update, so it reads two numbers per step. Several ranks share one all-reduce per step: the step
    probe's, which also carries NanGuard's flags.
    Under DeepSpeed (the update happens inside ``backward``) or with an fp16 ``GradScaler`` (its step needs the
    gradients it unscaled) no update can be withheld: ``skip`` acts as ``alert``, a rollback's replay applies the
    batches it would skip, and the guard says so at the start.

    Args:
        policy: ``"alert"``, ``"skip"`` or ``"rollback"``.
        window: Steps in the rolling window.
        threshold: Robust standard deviations above the window's median that make a spike.
        warmup: Steps seen before the z-score judges (again after a resume in a new process: the window is not
            saved); inside it only a loss 10x the median is named, and only alerted.
        skip_batches: With ``rollback``: how many batches, ending with the spike's, are skipped on the replay (PaLM
            skipped a few hundred around each spike; the default skips the spike's own).
        max_rollbacks: With ``rollback``: rollbacks allowed in one ``train()`` call before giving up.
        lookup_rows: Rows of ``train_dataset`` searched for a spike batch's samples (only when a spike happens).
        sync: Judge each step before its update (True) or one step later, from a copy made behind the step's work
            (False: no host synchronisation on an accelerator). None (default): True on CPU and for ``skip``
            (which must decide before the update), False elsewhere.
        alert_sinks: Replace the default alert sinks.
        webhook_url: Also POST warnings and worse to this URL.

    Raises:
        LossSpikeError: From ``trainer.train()`` with ``rollback``, when spikes persist past ``max_rollbacks`` or
            no verified checkpoint precedes the spike.
        ValueError: An unknown ``policy``, a window, threshold or warmup out of range, or ``skip`` with
            ``sync=False``.

    Example::

        guard = trainguard.SpikeGuard(policy="skip")       # or: all_guards(spike_guard={"policy": "skip"})
        trainer = Trainer(..., callbacks=[guard]); trainer.train()
    """

    guard_name: ClassVar[str] = "spike_guard"

    def __init__(
        self,
        *,
        policy: str = "alert",
        window: int = 128,
        threshold: float = 6.0,
        warmup: int = 64,
        skip_batches: int = 1,
        max_rollbacks: int = 3,
        lookup_rows: int = 200_000,
        sync: bool | None = None,
        alert_sinks: list[AlertSink] | None = None,
        webhook_url: str | None = None,
    ) -> None:
        super().__init__(alert_sinks=alert_sinks, webhook_url=webhook_url)
        if policy not in POLICIES:
            raise ValueError(f"SpikeGuard policy must be one of {POLICIES}, got {policy!r}")
        owner = "SpikeGuard"
        # Counts are whole (1.5 batches is refused, not truncated to 1) and every number finite and bounded.
        self.skip_batches = whole_number("skip_batches", skip_batches, low=1, owner=owner)
        self.max_rollbacks = whole_number("max_rollbacks", max_rollbacks, low=0, owner=owner)
        self.lookup_rows = whole_number("lookup_rows", lookup_rows, low=0, owner=owner)
        window = whole_number("window", window, low=2, owner=owner)
        warmup = whole_number("warmup", warmup, low=2, high=window, owner=owner)
        threshold = finite_number("threshold", threshold, low=0, high=MAX_FACTOR, low_open=True, owner=owner)
        sync = yes_no("sync", sync, allow_none=True, owner=owner)
        self.policy = policy
        self.detector = SpikeDetector(window=window, threshold=threshold, warmup=warmup)
        if sync is False and policy == "skip":
            raise ValueError("SpikeGuard policy 'skip' decides before the update: it needs sync=True (or None)")
        self.sync = sync
        #: Every spike seen (all policies), oldest first.
        self.findings: list[SpikeFinding] = []
        #: Steps whose update this guard withheld (spikes under ``skip``, replayed batches under ``rollback``).
        self.skipped_steps: list[int] = []
        #: Rollbacks done in this ``train()`` call, as ``(spike_step, checkpoint)``.
        self.rollbacks: list[tuple[int, str]] = []
        self._skip_steps: set[int] = set()
        #: This lineage's rollbacks (confirmed on resume, or done here), carried into every manifest committed next.
        self._history: list[Rollback] = []
        self._announced: set[tuple[str, int, tuple[int, ...]]] = set()
        self._batches: list[tuple[Any, Any]] = []
        self._probe: StepProbe | None = None
        # The last step's record and its micro-batches, judged one step later (sync=False).
        self._pending: tuple[StepFlags, list[tuple[Any, Any]]] | None = None
        self._sync = True
        self._can_skip = True
        self._hooked = False
        self._group: Any = None
        self._checkpoints: dict[int, str] = {}
        self._rollback_to: str | None = None
        self._give_up: LossSpikeError | None = None
        self._rerunning = False

    # ------------------------------------------------------------------------------------------- step hooks
    def _before_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs: Any = args[1] if len(args) > 1 else kwargs.get("inputs")
        if inputs is not None and hasattr(inputs, "get"):
            # References only: the rows are read (and hashed) when a step turns out to be a spike.
            self._batches.append((inputs.get("input_ids"), inputs.get("attention_mask")))
            if len(self._batches) > _MAX_HELD:  # a loop that never reaches on_pre_optimizer_step: hold no more
                del self._batches[0]

    def _install(self, trainer: Any, device: Any) -> None:
        self._probe = install_step_probe(trainer)
        missing = self._probe.subscribe(
            self, before_step=self._before_step, values=True, sync=self._sync, mean_loss=True
        )
        self._probe.begin(device)
        self._hooked = True
        for feature in missing:
            get_logger().info("[spike_guard] %s is off", feature)

    def _values(self, flags: StepFlags) -> tuple[float | None, float | None]:
        """A step's (mean loss over ranks, gradient norm), None where there is none (or it is NaN)."""
        assert self._probe is not None
        verdict = self._probe.read(flags)
        return verdict.mean_loss, verdict.grad_value

    # ----------------------------------------------------------------------------------------------- events
    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> Any:
        self._checkpoints = {}
        self._rollback_to = None
        self._give_up = None
        rerun, self._rerunning = self._rerunning, False
        if not rerun:  # a new train() call from the user: its own rollback budget, and history from what it resumes
            self.rollbacks = []
            self._skip_steps = set()
            self._history = []
        if resume_from_checkpoint and not isinstance(resume_from_checkpoint, bool):
            folder = os.fspath(resume_from_checkpoint)
            step = checkpoint_step(folder)
            if step is not None:
                self._checkpoints[step] = folder
                # The window keeps what this process saw up to the checkpoint (a rollback); a new process warms up.
                self.detector.forget_after(step)
                self._skip_steps |= self._recorded_skips(trainer, folder, after=step)
        return resume_from_checkpoint

    def _recorded_skips(self, trainer: Any, folder: str, *, after: int) -> set[int]:
        """The steps after ``after`` whose updates a committed rollback of this checkpoint's lineage withheld, to be
        withheld again (policy ``rollback`` only; announced under the others). Only manifests the commit marker
        vouches for count (:mod:`trainguard.checks.spike_history`); ``trainguard-spikes.jsonl`` is read only to
        report its ``rollback`` lines that nothing committed confirms."""
        lineage, committed, problems = committed_rollbacks(folder)
        path = os.path.join(_trainer_compat.output_dir_for(trainer), SPIKES_FILE)
        try:
            history = read_history(path)
        except FileNotFoundError:
            history = []
        except Exception as exc:  # the history only feeds a report: an unreadable one never stops a resume
            get_logger().warning("[spike_guard] could not read %s (%s); it decides nothing", path, exc)
            history = []
        plan = plan_resume_skips(
            committed=committed,
            history=history,
            lineage=lineage,
            after=after,
            skip_batches=self.skip_batches,
            apply=self.policy == "rollback",
            known=self._history,
        )
        name = os.path.basename(os.path.normpath(folder))
        # Carried on: this checkpoint's own history, and what this resume re-applies (a skip not applied is not
        # this branch's history: it trains those batches).
        for record in plan.confirmed:
            if record.key not in {r.key for r in self._history} and (plan.applied or max(record.skip_steps) <= after):
                self._history.append(record)
        self._report_history(name, path, plan, problems)
        return set(plan.skips) if plan.applied else set()

    def _report_history(self, name: str, path: str, plan: ResumeSkips, problems: list[tuple[str, str]]) -> None:
        if not distributed.is_main_process():
            return
        for line, why in plan.unconfirmed:
            self.alert(
                "warning",
                f"{path} line {line}: a rollback record that nothing committed confirms ({why}); ignored: no step is "
                "skipped on its word (a rollback's skips are re-applied only from the manifests of the checkpoints "
                "its run committed after it)",
                evidence={"file": path, "line": line, "reason": why},
            )
        for source, why in [*problems, *plan.refused]:
            self.alert(
                "warning",
                f"{source}'s manifest holds a rollback record that is refused ({why}); ignored",
                evidence={"checkpoint": source, "reason": why},
            )
        fresh = [
            r for r in plan.confirmed if r.key not in self._announced and any(s in plan.skips for s in r.skip_steps)
        ]
        if not fresh:
            return
        self._announced.update(r.key for r in fresh)
        steps = sorted(plan.skips)
        sources = sorted(set(plan.skips.values()))
        spikes = ", ".join(f"step {r.spike_step} (back to checkpoint-{r.checkpoint_step})" for r in fresh)
        if plan.applied:
            what = f"the updates of step(s) {describe_steps(steps)} will be withheld again"
        else:
            what = (
                f"step(s) {describe_steps(steps)} are NOT skipped: policy {self.policy!r} does not re-apply a "
                "rollback's skips (only policy 'rollback' does)"
            )
        self.alert(
            "warning",
            f"resuming from {name}: the rollback(s) at {spikes} committed in {', '.join(sources)}'s manifest; {what}",
            step=steps[0],
            evidence={
                "skip_steps": steps,
                "applied": plan.applied,
                "sources": sources,
                "rollbacks": [r.to_dict() for r in fresh],
            },
        )

    def manifest_record(self) -> dict[str, Any] | None:
        """This lineage's rollbacks, for the manifest of every checkpoint committed from now on (the newest
        :data:`~trainguard.checks.spike_history.MAX_RECORDS`)."""
        if not self._history:
            return None
        return {"rollbacks": [r.to_dict() for r in self._history[-MAX_RECORDS:]]}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        if self._alerter is None or self.trainer is None:
            self._attach(args)
        trainer = self.trainer or find_trainer()
        import torch

        device = getattr(args, "device", None) or torch.device("cpu")
        if self.sync is not None:
            self._sync = self.sync
        else:
            self._sync = getattr(device, "type", "cpu") == "cpu" or self.policy == "skip"
        if trainer is not None:
            self._install(trainer, device)
        fp16_scaler = _trainer_compat.fp16_scaler_active(trainer)
        self._can_skip = _trainer_compat.engine_layout(trainer) != "deepspeed" and not fp16_scaler
        if self.policy != "alert" and not self._can_skip and distributed.is_main_process():
            if fp16_scaler:
                why = "an fp16 GradScaler needs the gradients it unscaled at its step, so no update can be withheld"
            else:
                why = "DeepSpeed applies the update inside backward, so no update can be withheld"
            effect = "policy 'skip' only alerts" if self.policy == "skip" else "a rollback's replay cannot skip batches"
            self.alert("warning", f"{why}: {effect} in this run (use bf16, or no DeepSpeed, to withhold updates)")
        self._group = process_topology()[2]  # torch.distributed when several ranks take part, else None
        self._batches, self._pending = [], None
        return control

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        if not self._hooked or self._probe is None:
            return control
        step = int(state.global_step) + 1
        optimizer = kwargs.get("optimizer")
        taken = self._probe.take(step)  # every step, on every rank: the collective pairs up
        if self._pending is not None:  # sync=False: last step's values, copied while this step ran
            pending, self._pending = self._pending, None
            self._judge_pending(pending, args, control)
            if self._rollback_to is not None or self._give_up is not None:
                # The run goes back to before the spike: this step's update is not applied either.
                self._batches = []
                if self._can_skip:
                    drop_gradients(optimizer)
                return control
        if step in self._skip_steps:
            # A batch a rollback decided to skip: withheld, and kept out of the window (it is the spike again).
            self._skip_steps.discard(step)
            if self._can_skip:
                drop_gradients(optimizer)
            self.skipped_steps.append(step)
            self._batches = []
            self._record({"event": "skipped_batch", "step": step, "reason": "rolled back"})
            return control
        if not self._sync:
            self._pending = (taken, self._batches)
        else:
            self._judge(step, *self._values(taken), args, control, before_update=True, optimizer=optimizer)
        self._batches = []
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        if self._pending is not None and (
            control.should_save
            or control.should_evaluate
            or control.should_training_stop
            or (state.max_steps and state.global_step >= state.max_steps)
        ):
            pending, self._pending = self._pending, None
            self._judge_pending(pending, args, control)
        if self._rollback_to is not None or self._give_up is not None:
            # Nothing of the spike step is saved or evaluated: the run goes back to a checkpoint before it.
            step, why = int(state.global_step), "rollback" if self._rollback_to is not None else "give up"
            self.veto_save(control, why, step=step, event="on_step_end", skip_evaluation=True)
            self.request_stop(control, why, step=step, event="on_step_end")
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        trainer = self.trainer
        step = int(state.global_step)
        self._checkpoints[step] = str(_trainer_compat.checkpoint_layout(trainer, args).folder_for(step))
        return control

    def rerun_request(self, trainer: Any) -> Any:
        """The checkpoint to train again from after this ``train()`` returned (a rollback), or None."""
        target, self._rollback_to = self._rollback_to, None
        self._rerunning = target is not None
        return target

    def after_train(self, trainer: Any, output: Any) -> None:
        error, self._give_up = self._give_up, None
        if error is not None:
            raise error

    def on_train_error(self, trainer: Any, exc: BaseException) -> None:
        self._rollback_to = None
        self._give_up = None

    # ----------------------------------------------------------------------------------------------- acting
    def _judge_pending(self, pending: tuple[StepFlags, list[tuple[Any, Any]]], args: Any, control: Any) -> None:
        flags, batches = pending
        held, self._batches = self._batches, batches
        try:
            self._judge(flags.step, *self._values(flags), args, control, before_update=False)
        finally:
            self._batches = held

    def _judge(
        self,
        step: int,
        loss: float | None,
        grad: float | None,
        args: Any,
        control: Any,
        *,
        before_update: bool,
        optimizer: Any = None,
    ) -> None:
        finding = self.detector.observe(step, loss=loss, grad_norm=grad)
        if finding is None:
            return
        self.findings.append(finding)
        samples = self._samples()
        if finding.warmup:
            # Named inside the warm-up (a loss >= 10x the median so far): too few steps to act on, so only told.
            self._report(finding, f"alert only (inside the warm-up of {self.detector.warmup} steps)", "alert", samples)
        elif self.policy == "skip" and before_update and self._can_skip:
            drop_gradients(optimizer)
            self.skipped_steps.append(step)
            self._report(finding, "update skipped on every rank", "skip", samples)
        elif self.policy == "rollback":
            self._roll_back(finding, samples, optimizer if before_update else None)
        else:
            self._report(finding, "alert only (policy 'alert')", "alert", samples)

    def _roll_back(self, finding: SpikeFinding, samples: dict[str, Any], optimizer: Any) -> None:
        if optimizer is not None and self._can_skip:
            drop_gradients(optimizer)  # the spike's update is never applied: the run goes back anyway
        skip_steps = list(range(finding.step - self.skip_batches + 1, finding.step + 1))
        target = None
        if len(self.rollbacks) < self.max_rollbacks:
            target = self._verified_target(finding.step)
        if target is None:
            reason = (
                f"{self.max_rollbacks} rollback(s) already in this run"
                if len(self.rollbacks) >= self.max_rollbacks
                else f"no verified checkpoint at or before step {finding.step - self.skip_batches}"
            )
            self._give_up = LossSpikeError(
                f"{finding.metric} spike at step {finding.step} (z = {finding.z:.1f}) and no rollback left: {reason}",
                where={"step": finding.step, "field": finding.metric},
                evidence={"finding": finding.to_dict(), **samples, "rollbacks": [s for s, _ in self.rollbacks]},
            )
            self._report(finding, f"stopping the run: {reason}", "stop", samples, level="error")
            return
        self._rollback_to = target
        self.rollbacks.append((finding.step, target))
        self._skip_steps |= set(skip_steps)
        name = os.path.basename(target)
        lineage = checkpoint_origin(target).lineage
        back = checkpoint_step(target)
        if lineage is not None and back is not None:
            # What the checkpoints committed after this rollback carry: the only record a later resume obeys.
            record = Rollback(lineage, finding.step, back, tuple(skip_steps))
            self._history.append(record)
            self._announced.add(record.key)
        self._report(
            finding,
            f"rolling back to {name} and skipping the batch(es) of step(s) {skip_steps[0]}..{skip_steps[-1]}",
            "rollback",
            samples,
            extra={"checkpoint": target, "checkpoint_step": back, "skip_steps": skip_steps, "lineage": lineage},
        )

    def _verified_target(self, spike_step: int) -> str | None:
        """The newest checkpoint of this run at or before ``spike_step - skip_batches`` that verifies, chosen on
        rank 0 and shared, so every rank resumes from the same folder."""
        chosen: str | None = None
        if self.trainer is not None:
            # A checkpoint saved a step or two ago may still be hashing: its manifest must be in before it is judged.
            self.wait_for_other_guards()
        if distributed.is_main_process():
            from ..checks.checkpoint import verify_checkpoint

            candidates = dict(self._checkpoints)
            while candidates:
                step = rollback_target(candidates, spike_step=spike_step, skip_batches=self.skip_batches)
                if step is None:
                    break
                folder = candidates.pop(step)
                try:
                    if os.path.isdir(folder) and verify_checkpoint(folder).ok:
                        chosen = folder
                        break
                except Exception as exc:  # a candidate that cannot even be read is not one to go back to
                    get_logger().warning("[spike_guard] %s could not be verified: %s", folder, exc)
        if self._group is not None:
            chosen = distributed.broadcast_object(chosen)
        return chosen

    def _samples(self) -> dict[str, Any]:
        """The spike batch's samples on every rank: token digests, and ``train_dataset`` indices where found."""
        batches, self._batches = self._batches, []
        rows: list[list[int]] = []
        for input_ids, mask in batches:
            if input_ids is None:
                continue
            try:
                rows.extend(rows_of(input_ids, mask))
            except Exception:  # not token rows (images, embeddings): no sample ids from this micro-batch
                continue
        if self._group is not None:
            rows = [r for part in distributed.gather_object(rows) for r in (part or [])]
        digests = [row_digest(r) for r in rows]
        samples: dict[str, Any] = {"sample_ids": digests}
        trainer = self.trainer
        dataset = getattr(trainer, "train_dataset", None) if trainer is not None else None
        if digests and dataset is not None and distributed.is_main_process():
            found = dataset_indices(digests, dataset, limit=self.lookup_rows, rows=rows)
            samples["dataset_indices"] = sorted({i for d in digests for i in found.get(d, [])})
        return samples

    def _report(
        self,
        finding: SpikeFinding,
        action: str,
        event: str,
        samples: dict[str, Any],
        *,
        level: str = "warning",
        extra: dict[str, Any] | None = None,
    ) -> None:
        record = {"event": event, **finding.to_dict(), **samples, **(extra or {})}
        self._record(record)
        if distributed.is_main_process():
            self.alert(
                level, spike_message(finding, action=action, samples=samples), step=finding.step, evidence=record
            )

    def _record(self, record: dict[str, Any]) -> None:
        trainer = self.trainer
        if trainer is None or not distributed.is_main_process():
            return
        try:
            path = os.path.join(_trainer_compat.output_dir_for(trainer), SPIKES_FILE)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            append_line(path, json.dumps({"time": utc_now(), **record}, sort_keys=True, default=str))
        except Exception as exc:  # the record must never break training; the alert still carries it
            get_logger().warning("[spike_guard] could not record the spike in %s: %s", SPIKES_FILE, exc)

    def summary(self) -> str:
        parts = [f"policy {self.policy}", f"{len(self.findings)} spike(s)"]
        if self.skipped_steps:
            parts.append(f"{len(self.skipped_steps)} update(s) skipped")
        if self.rollbacks:
            parts.append(f"{len(self.rollbacks)} rollback(s)")
        return ", ".join(parts)
