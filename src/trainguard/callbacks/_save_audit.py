"""CheckpointVerifier's save audit and resume attestation, as one helper it delegates to (adapter code: it reads the
live run through ``_trainer_compat`` and acts through the verifier's alerts; the decisions are in
:mod:`trainguard.checks.checkpoint.audit` and :mod:`trainguard.checks.checkpoint.attest`).

- **Before step 1** (every rank that writes): the output_dir's filesystem takes an atomic write and rename; the
  model's state dict will serialize (shared tensors ``save_pretrained`` refuses are found without writing).
- **At every save, before its commit marker**: what was written against what the run has (:func:`audit_checkpoint`);
  a hollow save is never committed and, by default, stops the run at that save on every rank.
- **At every save**: the run's facts go into the checkpoint's manifest; at the first step after the save, what that
  step saw (RNG and batch digests per rank) goes into the lineage registry.
- **After a resume loaded everything**, and at its first step: the same facts and observations, compared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import distributed
from ..atomic import atomic_write_text
from ..checks import lineage as _lineage
from ..checks.checkpoint import attest
from ..checks.checkpoint.audit import audit_checkpoint, audit_optimizer
from ..errors import ResumeAttestationError, SaveAuditError, TrainGuardError
from . import _trainer_compat

__all__ = ["ATTEST", "AUDIT", "SaveAuditor"]

AUDIT = ("raise", "alert", "off")
ATTEST = ("alert", "raise", "off")
Alert = Callable[..., Any]
Refuse = Callable[..., None]


class SaveAuditor:
    def __init__(
        self,
        *,
        audit: str,
        attest_resume: str,
        alert: Alert,
        refuse_together: Refuse,
        late_failures: Callable[[], list[Any]] = list,
    ) -> None:
        if audit not in AUDIT:
            raise ValueError(f"audit must be one of {AUDIT}, not {audit!r}")
        if attest_resume not in ATTEST:
            raise ValueError(f"attest_resume must be one of {ATTEST}, not {attest_resume!r}")
        self.audit, self.attest = audit, attest_resume
        self._alert, self._refuse = alert, refuse_together
        self._late_failures = late_failures  # the pre-commit optimizer checks' findings, from the hashing thread
        self._spec: Any = None
        #: files this rank's folder never receives (one node's copy of a node-local save)
        self.absent_ok: tuple[str, ...] = ()
        self.audited = 0
        self.hollow = 0
        self._unmapped_said = False  # the weights' names step aside once per run, said in one warning
        self.findings: list[attest.Finding] = []
        # The first step after a save or a resume: ("save" | "resume", checkpoint name, run id, records)
        self._armed: tuple[str, str, str | None, Any] | None = None
        self._seen: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------ before step 1
    def dry_run(self, trainer: Any) -> None:
        """Every rank, before step 1: can this run's saves succeed at all? Refuses on every rank together."""
        args = trainer.args
        if self.audit == "off" or str(getattr(args, "save_strategy", "no")).endswith("no"):
            return
        problem: SaveAuditError | None = None
        if args.should_save:
            problem = _atomic_rename_works(str(args.output_dir)) or _serializes(trainer)
        self._refuse(
            problem,
            placeholder=lambda: SaveAuditError(
                "another rank's save dry-run failed (see that rank's log)", where={"rank": distributed.rank()}
            ),
            alert_level="error",
            step=0,
        )

    # ------------------------------------------------------------------------------------------ at each save
    def audit_save(self, trainer: Any, folder: Path, step: int) -> bool:
        """Every rank, after the save's files are written and before its commit: True when it may be committed.

        Weights and files are audited here (well under a millisecond); the optimizer's structure (a few
        milliseconds) on the hashing thread before the commit marker (:meth:`pre_commit_check`), its verdict shared
        at the next step (:meth:`check_late`)."""
        problems = []
        self._spec = None
        if self.audit != "off" and trainer is not None and trainer.args.should_save:
            self._spec = dataclasses.replace(_trainer_compat.save_spec(trainer), absent_ok=self.absent_ok)
            self._say_unmapped(self._spec.unmapped, step)
            problems = audit_checkpoint(folder, self._spec, optimizer=False)
            self.audited += 1
        if not distributed.any_rank(bool(problems)):
            return True
        self._fail(folder, step, problems)
        return False

    def _say_unmapped(self, reason: str, step: int) -> None:
        """One warning per run when the saved weights' names cannot be mapped to the run's: that part of the audit
        steps aside (a run is never stopped for what trainguard cannot read), the rest still runs."""
        if not reason or self._unmapped_said:
            return
        self._unmapped_said = True
        if distributed.is_main_process():
            self._alert(
                "warning",
                f"save audit: the saved weights' names are not compared with the run's ({reason}); the files are "
                "still checked to be present, readable and not empty",
                step=step,
            )

    def pre_commit_check(self) -> Callable[[Path], list[Any]] | None:
        """The part of the audit that runs on the hashing thread before the commit marker, for the save just
        audited (None: nothing to check there)."""
        spec = self._spec
        if spec is None or spec.optimizer_params is None:
            return None
        return lambda folder: audit_optimizer(folder, spec)

    def check_late(self, step: int) -> None:
        """Every rank, at the step after a save and after training: the pre-commit check's verdict, shared so that
        every rank stops together when it found a hollow save."""
        failures = self._late_failures() if self.audit != "off" else []
        if not distributed.any_rank(bool(failures)):
            return
        folder, saved_step, problems = failures[0] if failures else (Path("."), step, [])
        self._fail(folder, saved_step, problems)

    def _fail(self, folder: Path, step: int, problems: list[Any]) -> None:
        """Every rank: a save that does not hold what the run has (``problems`` on the ranks that found them)."""
        self.hollow += 1
        shown = "; ".join(p.format() if hasattr(p, "format") else str(p) for p in problems)
        first = getattr(problems[0], "file", "") if problems else ""
        error = SaveAuditError(
            f"{folder.name} does not hold what the run has, so it was not committed: {shown}",
            where={"file": str(folder / first) if first else str(folder), "step": step},
            evidence={
                "checkpoint": str(folder),
                "problems": [p.to_dict() if hasattr(p, "to_dict") else str(p) for p in problems],
            },
        )
        if problems:
            self._alert("error", error.what, step=step, evidence=error.evidence, raised=self.audit == "raise")
        if self.audit == "raise":
            self._refuse(
                error if problems else None,
                placeholder=lambda: SaveAuditError(
                    f"{folder.name} failed the save audit on another rank (see that rank's log); not committed",
                    where={"file": str(folder), "step": step, "rank": distributed.rank()},
                ),
                alert_level=None,
                step=step,
            )

    def facts(self, trainer: Any) -> dict[str, Any] | None:
        """The run's facts at a save, for the manifest (None when attestation is off)."""
        if self.attest == "off" or trainer is None:
            return None
        return _trainer_compat.resume_facts(trainer)

    def arm_after_save(self, checkpoint: str, run: str | None) -> None:
        if self.attest != "off" or self.audit != "off":
            self._armed, self._seen = ("save", checkpoint, run, None), None

    # ------------------------------------------------------------------------------------------ after a resume
    def after_resume(self, trainer: Any, decision: Any, train_dataloader: Any) -> None:
        """Every rank, at ``on_train_begin`` of a resumed run: the loaded facts against the saved ones."""
        if self.attest == "off" or decision is None or decision.path is None:
            return
        live = _trainer_compat.resume_facts(trainer, train_dataloader)
        findings: list[attest.Finding] = []
        if decision.saved_facts is not None:
            findings = attest.compare_facts(decision.saved_facts, live, model_only=decision.model_only)
        reason = attest.zero_step_reason(live)
        if reason:
            name = Path(decision.path).name
            findings.append(attest.Finding("error", f"the resume from {name} would train no step: {reason}"))
        self._report(findings, live.get("global_step"))
        records = (decision.after_save, decision.saved_facts or {}, live)
        self._armed, self._seen = ("resume", Path(decision.path).name, None, records), None

    # ------------------------------------------------------------------------------------ the first step after
    def before_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """On every micro-batch (the hot path): one attribute read unless the first step after a save or resume."""
        if self._armed is None or self._seen is not None or self.attest == "off":
            return
        inputs = args[1] if len(args) > 1 else kwargs.get("inputs")
        self._seen = attest.observe(attest.rng_digest(), attest.batch_digest(inputs))

    def step_end(self, output_dir: str, step: int) -> None:
        """Every rank, at ``on_step_end``: record or compare what the first step after a save or resume saw."""
        if self._armed is None:
            return
        kind, checkpoint, run, records = self._armed
        observations = distributed.gather_object(self._seen)
        self._armed, self._seen = None, None
        if kind == "save":
            self.check_late(step)
            if distributed.is_main_process():
                # On failure a resume from it simply has nothing to compare with.
                with contextlib.suppress(OSError, TrainGuardError):
                    _lineage.record_after_save(output_dir, checkpoint, run=run, observations=observations)
            return
        saved, saved_facts, live_facts = records
        live = _lineage.summarize_ranks(observations)
        if not saved or saved.get("world_size") != live["world_size"]:
            return  # the run stopped before its first step after that save, or the world size changed (named above)
        self._report(attest.compare_observation(saved, live, saved_facts, live_facts), step)

    def _report(self, findings: list[attest.Finding], step: Any) -> None:
        if not findings:
            return
        self.findings.extend(findings)
        if distributed.is_main_process():
            for finding in findings:
                self._alert(finding.level, f"resume attestation: {finding.format()}", step=step)
        errors = [f for f in findings if f.level == "error"]
        if self.attest == "raise" and errors:
            error = ResumeAttestationError(
                "the resume does not continue the saved run: " + "; ".join(f.format() for f in errors),
                where={"step": step},
                evidence={"findings": [f.format() for f in findings]},
            )
            self._refuse(error, placeholder=lambda: error, alert_level=None, step=step)

    def summary(self) -> str:
        parts = []
        if self.audited:
            parts.append(f"{self.audited} save(s) audited" + (f", {self.hollow} hollow" if self.hollow else ""))
        if self.findings:
            parts.append(f"{len(self.findings)} resume finding(s)")
        return ", ".join(parts)


def _atomic_rename_works(output_dir: str) -> SaveAuditError | None:
    probe = Path(output_dir) / f".trainguard-dry-run-{os.getpid()}"
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(probe, "trainguard checks that this filesystem takes an atomic write and rename\n")
        probe.unlink()
    except OSError as err:
        return SaveAuditError(
            f"the output_dir's filesystem does not take an atomic write and rename ({type(err).__name__}: {err}): "
            "no save of this run could be written safely",
            where={"file": str(output_dir)},
            next_step="Give the run an output_dir on a local or POSIX filesystem you can write to.",
        )
    return None


def _serializes(trainer: Any) -> SaveAuditError | None:
    try:
        _trainer_compat.save_spec(trainer)
    except RuntimeError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return SaveAuditError(
            f"the model's weights cannot be saved: {first}; the first save would crash after training up to it",
            where={"file": str(trainer.args.output_dir), "step": 0},
            next_step=(
                "Declare the tie in the model (its class's _tied_weights_keys), or give each shared tensor its own "
                "storage (.clone()) before training; then start again."
            ),
        )
    return None
