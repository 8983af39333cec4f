"""Resume attestation: a resume continues the run it claims to continue, exactly.

Two records make it provable:

- **at each save**, the run's facts (:func:`resume_facts_from`): global step, the optimizer's own step count, the
  learning rate now and at the next step, the schedule and batch settings, the data order settings. They go into
  the checkpoint's ``trainguard-manifest.json``;
- **at the first step after each save**, what that step saw (:func:`observe`): a digest of the RNG state before its
  forward pass and of its first micro-batch, per rank. They go into the output_dir's lineage registry.

A resume compares its own facts after the Trainer loaded everything (:func:`compare_facts`) and its own first step
(:func:`compare_observation`) with those records, and names the cause of every difference.

Example::

    findings = compare_facts(saved_facts, live_facts, model_only=False)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Finding",
    "batch_digest",
    "compare_facts",
    "compare_observation",
    "observe",
    "rng_digest",
    "zero_step_reason",
]

#: The settings that define the learning-rate schedule, the batch and the data order, compared field by field.
SCHEDULE_FIELDS = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "max_steps", "optim")
BATCH_FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size")
ORDER_FIELDS = ("seed", "data_seed", "group_by_length", "dataloader_drop_last", "train_rows")
#: Schedules whose learning rate does not depend on the run's length: training longer or shorter changes nothing.
_NO_HORIZON = frozenset({"constant", "constant_with_warmup", "reduce_lr_on_plateau"})
# Engines whose own loader is known to leave the optimizer empty, and what to do about it.
_ENGINE_HINTS: dict[str, tuple[str, ...]] = {
    "fsdp1_sharded": (
        "known gap of accelerate's FSDP1 SHARDED_STATE_DICT resume (seen with accelerate 1.15): it loads the saved "
        "optimizer into the state dict of a fresh optimizer, which has no entries, so nothing is read; use "
        "fsdp_version 2 or FULL_STATE_DICT for runs that must resume exactly",
    ),
}


@dataclass(frozen=True)
class Finding:
    """One way a resume does not continue the saved run: ``level`` (``warning``/``error``), a headline, and the
    fields that explain it (``field: saved -> now``)."""

    level: str
    what: str
    fields: tuple[str, ...] = ()

    def format(self) -> str:
        return self.what + (f" ({'; '.join(self.fields)})" if self.fields else "")


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
        except OverflowError:  # an integer beyond float range in a crafted record: compared exactly
            return bool(a == b)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return all(_close(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _diffs(saved: Mapping[str, Any], live: Mapping[str, Any], names: tuple[str, ...]) -> list[str]:
    return [
        f"{name}: {saved.get(name)!r} at the save, {live.get(name)!r} now"
        for name in names
        if name in saved and name in live and not _close(saved.get(name), live.get(name))
    ]


def _schedule_name(facts: Mapping[str, Any]) -> str:
    # recorded as str(args.lr_scheduler_type): "constant", or "SchedulerType.CONSTANT" on releases that keep the enum
    return str(facts.get("lr_scheduler_type") or "").rsplit(".", 1)[-1].lower()


def _same_next_lr(saved: Mapping[str, Any], live: Mapping[str, Any]) -> bool:
    return saved.get("next_lr") is not None and _close(saved.get("next_lr"), live.get("next_lr"))


def _global_batch(facts: Mapping[str, Any]) -> int | None:
    """Rows one optimizer step sees: per-device batch x accumulation x ranks (None when a factor is unknown)."""
    total = 1
    for name in BATCH_FIELDS:
        value = facts.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        total *= value
    return total


def compare_facts(saved: Mapping[str, Any], live: Mapping[str, Any], *, model_only: bool) -> list[Finding]:
    """What differs between the facts recorded at a save and the resumed run's, after the Trainer loaded them.

    Example::

        compare_facts({"optimizer_step": 8.0}, {"optimizer_step": None}, model_only=False)   # the optimizer restarted
    """
    findings: list[Finding] = []
    schedule = _diffs(saved, live, SCHEDULE_FIELDS)
    if _same_next_lr(saved, live) and {_schedule_name(saved), _schedule_name(live)} <= _NO_HORIZON:
        # max_steps decides nothing on a constant schedule: a longer run continues at the same rate, bit-identical
        # to one that was never interrupted (the next rate was checked equal above).
        schedule = [d for d in schedule if not d.startswith("max_steps:")]
    batch = _diffs(saved, live, BATCH_FIELDS)
    if batch and _global_batch(saved) is not None and _global_batch(saved) == _global_batch(live):
        # 2 ranks x 4 micro-batches -> 4 x 2, or accumulation traded for batch size: each update sees as many rows.
        batch = []
    if model_only:
        findings.append(
            Finding(
                "warning",
                f"the checkpoint is model-only (save_only_model=True): the optimizer restarts from scratch and the "
                f"learning-rate schedule from its start, at step {live.get('global_step')}",
            )
        )
    elif saved.get("optimizer_step") is not None and not _close(
        saved.get("optimizer_step"), live.get("optimizer_step")
    ):
        findings.append(
            Finding(
                "error",
                f"the optimizer state was not restored: its step count is {live.get('optimizer_step')}, "
                f"{saved.get('optimizer_step')} at the save (the optimizer restarted from scratch)",
                _ENGINE_HINTS.get(str(live.get("engine")), ()),
            )
        )
    if not model_only and not _close(saved.get("next_lr"), live.get("next_lr")):
        # Explained by a setting changed on purpose (more max_steps to train on): a warning naming it. Unexplained
        # (the schedule was not restored, or not the one saved): an error.
        findings.append(
            Finding(
                "warning" if schedule else "error",
                f"the learning rate after the next step is {live.get('next_lr')}; the saved run would have used "
                f"{saved.get('next_lr')}",
                tuple(schedule) or ("the scheduler state was not restored, or is not the one saved",),
            )
        )
        schedule = []
    if schedule:
        findings.append(
            Finding("warning", "the learning-rate schedule settings changed since the save", tuple(schedule))
        )
    if batch:
        findings.append(Finding("warning", "the batch geometry changed since the save", tuple(batch)))
    return findings


def zero_step_reason(live: Mapping[str, Any]) -> str | None:
    """Why a resume at ``global_step`` would train no step (None when it trains), from the resumed run's facts."""
    step, max_steps = live.get("global_step"), live.get("max_steps")
    if not isinstance(step, int) or not isinstance(max_steps, int) or max_steps <= 0 or step < max_steps:
        return None
    if (live.get("args_max_steps") or 0) > 0:
        return f"max_steps={max_steps} is reached: the checkpoint is at step {step}"
    return (
        f"the epochs are exhausted: num_train_epochs={live.get('num_train_epochs')} x "
        f"{live.get('steps_per_epoch')} step(s) per epoch on this data = {max_steps} step(s), and the checkpoint is "
        f"at step {step} (a shorter dataset than the saved run's gives fewer steps per epoch)"
    )


# ------------------------------------------------------------------------------------------ the first step
def rng_digest() -> str:
    """A digest of the Python, NumPy and torch (CPU, and CUDA when present) RNG states."""
    import random

    digest = hashlib.sha256(repr(random.getstate()).encode())
    try:
        import numpy as np

        digest.update(repr(np.random.get_state()).encode())
    except ImportError:  # pragma: no cover - numpy comes with torch
        pass
    import torch

    digest.update(torch.get_rng_state().numpy().tobytes())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for state in torch.cuda.get_rng_state_all():
            digest.update(state.numpy().tobytes())
    return digest.hexdigest()[:32]


def batch_digest(inputs: Any) -> str | None:
    """A digest of a micro-batch's ``input_ids`` (the samples and their order); None when there is none."""
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    if ids is None or not hasattr(ids, "detach"):
        return None
    array = ids.detach().to("cpu").contiguous().numpy()
    return hashlib.sha256(str(array.shape).encode() + array.tobytes()).hexdigest()[:32]


def observe(rng: str | None, batch: str | None) -> dict[str, Any]:
    return {"rng": rng, "batch": batch}


def compare_observation(
    saved: Mapping[str, Any],
    live: Mapping[str, Any],
    saved_facts: Mapping[str, Any],
    live_facts: Mapping[str, Any],
) -> list[Finding]:
    """The first step after a resume against what the uninterrupted run's step after that save saw; each
    difference with its likeliest cause named.

    Example::

        compare_observation({"rng": "a", "batch": "b"}, {"rng": "a", "batch": "c"}, saved_facts, live_facts)
    """
    findings: list[Finding] = []
    if saved.get("batch") and live.get("batch") and saved["batch"] != live["batch"]:
        causes = []
        if live_facts.get("ignore_data_skip"):
            causes.append("ignore_data_skip=True: the Trainer did not skip the batches trained before the save")
        causes += _diffs(saved_facts, live_facts, ORDER_FIELDS + BATCH_FIELDS)
        if not causes:
            causes.append("the data, its order or the collator differ (a changed dataset, sampler or data_collator)")
        findings.append(
            Finding(
                "error",
                "the first batch after the resume is not the batch the uninterrupted run trained next: data is "
                "repeated or skipped",
                tuple(causes),
            )
        )
    if saved.get("rng") and live.get("rng") and saved["rng"] != live["rng"]:
        causes = _diffs(saved_facts, live_facts, ("world_size", "seed"))
        if not causes:
            causes.append("the RNG state of this rank was not restored (a missing rng_state file, or another launcher)")
        findings.append(
            Finding(
                "warning",
                "the random state at the first step after the resume differs from the uninterrupted run's: dropout "
                "and other random draws will differ",
                tuple(causes),
            )
        )
    return findings
