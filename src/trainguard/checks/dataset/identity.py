"""The run-identity record DatasetGuard keeps in each checkpoint, and the comparison that refuses a wrong resume.

The record (stored in ``trainer_state.json`` under ``stateful_callbacks["DatasetGuard"]["attributes"]
["run_identity"]``) holds the train and eval content fingerprints and row counts, steps per epoch, and the global
batch (world size × per-device batch × gradient accumulation), and the tokenizer's fingerprint when the run has one
(:mod:`trainguard.checks.tokenizer`). On a resume :func:`check_checkpoint_resume` (before the Trainer loads the
checkpoint) and :func:`check_resume_identity` (at a known step) compare the checkpoint's record with the current
run's and raise :class:`~trainguard.DatasetMismatchError` when the data differs, the global batch changed, or no
step would run, naming both sides, what plain Trainer would do and the ways forward; and
:class:`~trainguard.TokenizerMismatchError` when the tokenizer changed, naming each changed field.

Example::

    current = run_identity_record(train_ds, None, world_size=1, per_device_train_batch_size=2,
                                  gradient_accumulation_steps=1, steps_per_epoch=16)
    warnings = check_checkpoint_resume(current, Path("out/checkpoint-50"), max_steps=-1, num_train_epochs=4)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...errors import DatasetMismatchError
from .._resume import read_trainer_state
from ..tokenizer import CHECK_TOKENIZER
from ..tokenizer import check_tokenizer as check_tokenizer_record
from .fingerprint import RECORD_SCHEME, describe_dataset
from .resume import ResumePlan, plan_resume

__all__ = [
    "CHECK_EVAL",
    "CHECK_TOKENIZER",
    "WAYS_FORWARD",
    "check_checkpoint_resume",
    "check_resume_identity",
    "check_run_identity",
    "identify",
    "run_identity_record",
    "stored_record",
    "ways_forward",
]

#: The choices for a changed eval set: warn, refuse, or do not compare.
CHECK_EVAL = ("warn", "raise", "off")


# ---------------------------------------------------------------------------------------------------- the record
def identify(data: Any) -> dict[str, Any]:
    """The identity of ``data`` as the record stores it (:meth:`DatasetIdentity.to_dict`), or, when it cannot be
    fingerprinted, ``fingerprint: None`` with the row count where known and the reason under ``unavailable``."""
    try:
        return describe_dataset(data).to_dict()
    except ValueError as err:
        try:
            rows: int | None = len(data)
        except TypeError:
            rows = None
        return {"fingerprint": None, "num_rows": rows, "kind": type(data).__name__, "unavailable": str(err)}


def run_identity_record(
    train_data: Any,
    eval_data: Any = None,
    *,
    world_size: int,
    per_device_train_batch_size: int,
    gradient_accumulation_steps: int,
    steps_per_epoch: int | None,
    check_eval: str = "warn",
    tokenizer: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run-identity record of a run: train (and, unless ``check_eval="off"``, eval) identities, batch settings,
    global batch and steps per epoch. ``eval_data`` may be one dataset or a dict of named ones; ``tokenizer`` is the
    run's :func:`~trainguard.checks.tokenizer.tokenizer_fingerprint` (stored under ``"tokenizer"`` when given).

    Example::

        run_identity_record(ds, None, world_size=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                            steps_per_epoch=10)["global_batch"]   # 16
    """
    train = identify(train_data)
    evals: dict[str, Any] | None = None
    if check_eval != "off" and eval_data is not None:
        if isinstance(eval_data, dict):
            evals = {str(name): identify(ds) for name, ds in eval_data.items()}
        else:
            evals = {"eval": identify(eval_data)}
    world = int(world_size)
    per_device = int(per_device_train_batch_size)
    accumulation = int(gradient_accumulation_steps)
    record: dict[str, Any] = {
        "scheme": RECORD_SCHEME,
        "train": train,
        "eval": evals,
        "world_size": world,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "global_batch": world * per_device * accumulation,
        "steps_per_epoch": steps_per_epoch,
    }
    if tokenizer is not None:
        record["tokenizer"] = dict(tokenizer)
    return record


def stored_record(trainer_state: Mapping[str, Any], name: str = "DatasetGuard") -> dict[str, Any] | None:
    """The record the guard class ``name`` stored in a checkpoint's ``trainer_state.json`` (parsed), or None.

    Falls back to the ``DatasetGuard`` entry for a subclass; with several instances of one class (transformers then
    stores a list) the last one counts.
    """
    callbacks = trainer_state.get("stateful_callbacks") or {}
    entry = callbacks.get(name) if isinstance(callbacks, dict) else None
    if entry is None and name != "DatasetGuard" and isinstance(callbacks, dict):
        entry = callbacks.get("DatasetGuard")
    if isinstance(entry, list):  # several instances of one class: transformers appends (see trainer_internals §4)
        entry = entry[-1] if entry else None
    if not isinstance(entry, dict):
        return None
    record = (entry.get("attributes") or {}).get("run_identity")
    return record if isinstance(record, dict) else None


# ------------------------------------------------------------------------------------------------- the resume
def check_checkpoint_resume(
    current: Mapping[str, Any],
    checkpoint: str | os.PathLike[str] | None,
    *,
    guard_name: str = "DatasetGuard",
    max_steps: int,
    num_train_epochs: float,
    refuse_empty_resume: bool = True,
    check_eval: str = "warn",
    check_tokenizer: str = "raise",
) -> list[str]:
    """Check a run about to resume from ``checkpoint`` (None: a fresh start) before anything is loaded: read its
    ``trainer_state.json``, and compare the record ``guard_name`` stored there with ``current``.

    Returns:
        Warnings (the train data cannot be fingerprinted, eval set changed, nothing recorded to compare).

    Raises:
        DatasetMismatchError: As :func:`check_run_identity`.
        TokenizerMismatchError: As :func:`check_run_identity`.
        CheckpointIntegrityError: The checkpoint or its ``trainer_state.json`` is missing or unreadable.
    """
    warnings: list[str] = []
    if current["train"].get("fingerprint") is None:
        warnings.append(
            "cannot fingerprint the training data ("
            + str(current["train"].get("unavailable"))
            + "); resumes are checked for batch and step counts only"
        )
    if checkpoint is not None:
        trainer_state = read_trainer_state(checkpoint)
        try:
            global_step = int(trainer_state.get("global_step") or 0)
        except (TypeError, ValueError):
            global_step = 0
        warnings += check_resume_identity(
            stored_record(trainer_state, guard_name),
            current,
            checkpoint=checkpoint,
            global_step=global_step,
            max_steps=max_steps,
            num_train_epochs=num_train_epochs,
            refuse_empty_resume=refuse_empty_resume,
            check_eval=check_eval,
            check_tokenizer=check_tokenizer,
        )
    return warnings


def check_resume_identity(
    stored: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    *,
    checkpoint: str | os.PathLike[str],
    global_step: int,
    max_steps: int,
    num_train_epochs: float,
    refuse_empty_resume: bool = True,
    check_eval: str = "warn",
    check_tokenizer: str = "raise",
) -> list[str]:
    """:func:`check_run_identity` for a resume at ``global_step``, with the :func:`plan_resume` of the new run's
    ``max_steps``/``num_train_epochs`` and the steps per epoch recorded in ``current``."""
    plan = plan_resume(
        int(global_step), current.get("steps_per_epoch"), max_steps=int(max_steps), num_train_epochs=num_train_epochs
    )
    return check_run_identity(
        stored,
        current,
        checkpoint=checkpoint,
        plan=plan,
        refuse_empty_resume=refuse_empty_resume,
        check_eval=check_eval,
        check_tokenizer=check_tokenizer,
    )


# --------------------------------------------------------------------------------------------- record compare
def _ident_text(ident: Mapping[str, Any] | None) -> str:
    if not ident:
        return "not recorded"
    if ident.get("fingerprint") is None:
        return f"not fingerprinted ({ident.get('unavailable', 'unknown reason')})"
    rows = ident.get("num_rows")
    return f"{ident['fingerprint']} ({rows if rows is not None else 'unknown'} rows, read as {ident.get('kind')})"


def _batch_text(record: Mapping[str, Any]) -> str:
    return (
        f"{record.get('global_batch')} (world size {record.get('world_size')} × per-device "
        f"{record.get('per_device_train_batch_size')} × accumulation {record.get('gradient_accumulation_steps')})"
    )


WAYS_FORWARD = (
    "Choose one before calling trainer.train() again (nothing is deleted either way): "
    "(1) resume with the data and batch the checkpoint was trained with; "
    "(2) trainguard.start_fresh(trainer): the old checkpoints move to {archive}, then trainer.train() starts at "
    "step 0; "
    "(3) trainguard.continue_on_new_data(trainer): loads {checkpoint}'s weights, resets step, optimizer and "
    "schedule, archives the old checkpoints the same way, then trainer.train() learns on the new data from those "
    "weights."
)


def ways_forward(checkpoint: str | os.PathLike[str]) -> str:
    """The ``next_step`` text of a refused resume, naming the checkpoint and where the archive would go."""
    ckpt = Path(checkpoint)
    archive = ckpt.parent / "trainguard-archive" / "<UTC time>-<fingerprint>"
    return WAYS_FORWARD.format(archive=archive, checkpoint=ckpt.name)


def check_run_identity(
    stored: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    *,
    checkpoint: str | os.PathLike[str],
    plan: ResumePlan,
    refuse_empty_resume: bool = True,
    check_eval: str = "warn",
    check_tokenizer: str = "raise",
) -> list[str]:
    """Compare the run-identity record stored in a checkpoint with the current run's; refuse a resume that would
    train on other data, with another global batch, not at all, or with another tokenizer.

    Args:
        stored: The record DatasetGuard stored in the checkpoint (None: saved without DatasetGuard).
        current: The record of the run about to resume.
        checkpoint: The checkpoint folder (named in the error).
        plan: What plain Trainer would do on this resume (:func:`plan_resume`).
        refuse_empty_resume: Refuse a resume after which no step would run.
        check_eval: ``"warn"``, ``"raise"`` or ``"off"`` for a changed eval set.
        check_tokenizer: ``"raise"``, ``"warn"`` or ``"off"`` for a changed tokenizer (compared when both records
            hold one; a checkpoint without one gives a note).

    Returns:
        Warnings (eval set changed, nothing recorded to compare, a fingerprint not computable, no tokenizer record).

    Raises:
        DatasetMismatchError: Naming both fingerprints and row counts, what plain Trainer would have done, and the
            ways forward. Checked first: a resume on other data is refused as such even if the tokenizer changed too.
        TokenizerMismatchError: The data and batch match, but the tokenizer differs, naming each changed field
            with both values (:func:`trainguard.checks.tokenizer.check_tokenizer`).

    Example::

        current = run_identity_record(train_ds, None, world_size=1, per_device_train_batch_size=2,
                                      gradient_accumulation_steps=1, steps_per_epoch=16)
        plan = plan_resume(50, 16, max_steps=-1, num_train_epochs=4)          # 14 steps still to train
        check_run_identity(current, current, checkpoint="out/checkpoint-50", plan=plan)   # []: the same run
    """
    ckpt = Path(checkpoint)
    warnings: list[str] = []
    problems: list[str] = []
    fields: list[str] = []
    evidence: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "global_step": plan.global_step,
    }
    if stored is None:
        warnings.append(
            f"{ckpt.name} was saved without DatasetGuard: its data and batch cannot be compared with this run's"
        )
    elif stored.get("scheme") != current.get("scheme"):
        warnings.append(
            f"{ckpt.name} records fingerprints of scheme {stored.get('scheme')}, this trainguard makes scheme "
            f"{current.get('scheme')}: the data cannot be compared"
        )
    else:
        old, new = stored.get("train") or {}, current.get("train") or {}
        evidence.update(checkpoint_train=dict(old), current_train=dict(new))
        if old.get("fingerprint") and new.get("fingerprint"):
            if old["fingerprint"] != new["fingerprint"]:
                fields.append("train fingerprint")
                problems.append(
                    f"the training data differs from the checkpoint's: checkpoint {_ident_text(old)}, "
                    f"this run {_ident_text(new)}"
                )
        else:
            warnings.append(
                f"the training data cannot be compared: checkpoint {_ident_text(old)}, this run {_ident_text(new)}"
            )
        if stored.get("global_batch") is not None and stored.get("global_batch") != current.get("global_batch"):
            fields.append("global_batch")
            problems.append(
                f"the global batch changed: checkpoint {_batch_text(stored)}, this run {_batch_text(current)}; "
                "the checkpoint's step count is in batches of the old size, so the resume would skip the wrong "
                "number of rows"
            )
        elif (
            not fields
            and stored.get("steps_per_epoch") is not None
            and current.get("steps_per_epoch") is not None
            and stored.get("steps_per_epoch") != current.get("steps_per_epoch")
        ):
            fields.append("steps_per_epoch")
            problems.append(
                f"steps per epoch changed: checkpoint {stored.get('steps_per_epoch')}, this run "
                f"{current.get('steps_per_epoch')} (same data and batch: dataloader_drop_last or the sampler changed?)"
            )
        old_eval, new_eval = stored.get("eval") or {}, current.get("eval") or {}
        if check_eval != "off" and old_eval != new_eval and old_eval and new_eval:
            changed = sorted(
                name
                for name in set(old_eval) | set(new_eval)
                if (old_eval.get(name) or {}).get("fingerprint") != (new_eval.get(name) or {}).get("fingerprint")
            )
            if changed:
                text = "; ".join(
                    f"{name}: checkpoint {_ident_text(old_eval.get(name))}, this run {_ident_text(new_eval.get(name))}"
                    for name in changed
                )
                message = f"the eval data differs from the checkpoint's ({text}): metrics before and after differ"
                if check_eval == "raise":
                    fields.append("eval fingerprint")
                    problems.append(message)
                else:
                    warnings.append(message)
    if refuse_empty_resume and plan.steps_to_train <= 0:
        fields.append("max_steps")
        problems.append(
            f"no step would run after this resume: the checkpoint is at step {plan.global_step} and this run's "
            f"max_steps is {plan.max_steps}"
        )
    plain = plan.describe(data_changed="train fingerprint" in fields)
    evidence["plain_trainer"] = plain
    if problems:
        next_step = ways_forward(ckpt)
        if fields == ["max_steps"]:
            next_step = (
                f"Raise max_steps or num_train_epochs so the run goes past step {plan.global_step}, or do not resume "
                "a finished run. " + next_step
            )
        raise DatasetMismatchError(
            f"refusing to resume from {ckpt.name}: " + "; ".join(problems) + f". What plain Trainer would do: {plain}.",
            where={"file": str(ckpt / "trainer_state.json"), "field": ", ".join(fields), "step": plan.global_step},
            next_step=next_step,
            evidence=evidence,
        )
    if stored is not None and check_tokenizer != "off" and (stored.get("tokenizer") or current.get("tokenizer")):
        warnings += check_tokenizer_record(
            stored.get("tokenizer"),
            current.get("tokenizer"),
            where={"file": str(ckpt / "trainer_state.json"), "step": plan.global_step},
            subject=f"refusing to resume from {ckpt.name}",
            next_step=(
                f"Resume with the tokenizer {ckpt.name} was trained with: the Trainer saved it there "
                f"(AutoTokenizer.from_pretrained({str(ckpt)!r})), then pass it as processing_class; or, if the "
                "change is intended, start a fresh run (trainguard.start_fresh(trainer)), or pass "
                "DatasetGuard(check_tokenizer='warn') to resume anyway."
            ),
            mode=check_tokenizer,
        )
    return warnings
