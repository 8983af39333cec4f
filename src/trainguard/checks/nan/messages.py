"""What a non-finite finding says: the finding itself, its headline, message, evidence and error.

Plain functions on plain inputs (a :class:`~.flags.StepVerdict`, a :class:`~.values.NonFiniteFinding`, the action,
the ``output_dir``); nothing here knows about the Trainer. Every message names the step, the rank where more than
one takes part, the value, and what to do next (the newest checkpoint written before the bad step).

Example::

    finding = finding_from_parameters(8, ["model.norm.weight"], rank=1)
    print(finding_headline(finding))   # "parameters are non-finite at step 8 on rank 1 (model.norm.weight)"
    raise nonfinite_error(finding, action="raise", output_dir="out", detected_at=None, weights_in_memory="finite")
    # raises: NonFiniteError
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ... import distributed
from ...errors import NonFiniteError
from .._resume import checkpoint_dirs, checkpoint_step
from .flags import StepVerdict
from .values import NonFiniteFinding, describe_value

__all__ = [
    "finding_evidence",
    "finding_from_metrics",
    "finding_from_parameters",
    "finding_from_verdict",
    "finding_headline",
    "finding_message",
    "newest_checkpoint_before",
    "nonfinite_error",
    "stop_evidence",
]


def newest_checkpoint_before(output_dir: str | None, step: int) -> Path | None:
    """The newest ``checkpoint-N`` in ``output_dir`` with ``N < step`` (None when there is none)."""
    if not output_dir:
        return None
    try:
        older = [d for d in checkpoint_dirs(output_dir) if (checkpoint_step(d) or 0) < step]
    except OSError:
        return None
    return older[-1] if older else None


def _resume_from(output_dir: str | None, finding: NonFiniteFinding) -> str | None:
    checkpoint = newest_checkpoint_before(output_dir, finding.step)
    return str(checkpoint) if checkpoint is not None else None


# ------------------------------------------------------------------------------------------------- findings
def finding_from_verdict(verdict: StepVerdict, field_name: str, *, detail: str = "") -> NonFiniteFinding:
    """The finding for ``field_name`` (``"loss"`` or ``"grad_norm"``) of a bad step: the value where this rank saw
    it (and, for the loss, which micro-batch), the lowest rank that saw it."""
    value: float | None = None
    if field_name == "loss" and verdict.local_loss_bad:
        for index, loss in enumerate(verdict.losses):
            number = float(loss)
            if not math.isfinite(number):
                value = number
                if not detail and len(verdict.losses) > 1:
                    detail = f"micro-batch {index + 1} of {len(verdict.losses)}"
                break
    elif field_name == "grad_norm" and verdict.grad_norm is not None:
        number = float(verdict.grad_norm)
        value = number if not math.isfinite(number) else None
    rank = verdict.loss_rank if field_name == "loss" else verdict.grad_rank
    return NonFiniteFinding(step=verdict.step, field=field_name, value=value, rank=rank, detail=detail)


def finding_from_metrics(step: int, bad: Mapping[str, float]) -> NonFiniteFinding:
    """The finding for non-finite evaluation metrics (``bad`` from :func:`~.values.nonfinite_metrics`, not empty):
    named after the first ``*_loss`` among them, else the first; the others in the detail."""
    name = next((key for key in bad if key.endswith("_loss")), next(iter(bad)))
    others = [key for key in bad if key != name]
    return NonFiniteFinding(
        step=step, field=name, value=bad[name], detail=("also " + ", ".join(others)) if others else ""
    )


def finding_from_parameters(step: int, names: list[str], rank: int) -> NonFiniteFinding:
    """The finding for non-finite weights: ``names`` as seen on ``rank``, or none (on another rank's shard)."""
    return NonFiniteFinding(
        step=step,
        field="parameters",
        rank=rank if names else None,
        detail=", ".join(names) if names else "on another rank's shard",
    )


# ------------------------------------------------------------------------------------------------- messages
def finding_headline(finding: NonFiniteFinding) -> str:
    """``"loss is NaN at step 8 on rank 1 (micro-batch 3 of 4)"`` (the rank only in a distributed run)."""
    verb = "are" if finding.field == "parameters" else "is"
    value = "non-finite" if finding.value is None else describe_value(finding.value)
    text = f"{finding.field} {verb} {value} at step {finding.step}{_rank_text(finding)}"
    return f"{text} ({finding.detail})" if finding.detail else text


def _rank_text(finding: NonFiniteFinding) -> str:
    if finding.rank is None or not distributed.is_distributed():
        return ""
    return f" on rank {finding.rank}"


def finding_evidence(finding: NonFiniteFinding, **extra: Any) -> dict[str, Any]:
    """The alert's / error's evidence: field, step, value, rank, detail, then ``extra`` (None values left out, except
    ``resume_from``, always there: None when no earlier checkpoint exists)."""
    evidence: dict[str, Any] = {"field": finding.field, "step": finding.step}
    if finding.value is not None:
        evidence["value"] = describe_value(finding.value)
    if finding.rank is not None:
        evidence["rank"] = finding.rank
    if finding.detail:
        evidence["detail"] = finding.detail
    evidence.update({k: v for k, v in extra.items() if v is not None or k == "resume_from"})
    return evidence


def finding_message(finding: NonFiniteFinding, *, action: str, output_dir: str | None, detected_at: int | None) -> str:
    """The one-paragraph message: the headline, where the check read it (when later than the step), and what
    ``action`` did: with ``"warn"``, that training goes on; else that no checkpoint of the step was written and the
    newest good one."""
    what = f"{finding_headline(finding)}"
    if detected_at is not None and detected_at != finding.step:
        what += f" (read at step {detected_at}: the check is asynchronous)"
    if action == "warn":
        return what + "; action='warn': training continues and checkpoints may hold non-finite weights"
    checkpoint = _resume_from(output_dir, finding)
    tail = "no checkpoint of this step was written"
    tail += f"; newest good checkpoint: {checkpoint}" if checkpoint else "; no earlier checkpoint exists"
    if action == "stop":
        return f"{what}; training stopped, {tail}"
    return f"{what}; {tail}"


def stop_evidence(
    finding: NonFiniteFinding, *, output_dir: str | None, weights_in_memory: str | None
) -> dict[str, Any]:
    """The evidence of ``action="stop"``: the finding, the checkpoint to resume from, the weights in memory."""
    return finding_evidence(finding, resume_from=_resume_from(output_dir, finding), weights_in_memory=weights_in_memory)


def nonfinite_error(
    finding: NonFiniteFinding,
    *,
    action: str,
    output_dir: str | None,
    detected_at: int | None,
    weights_in_memory: str | None,
) -> NonFiniteError:
    """The :class:`~trainguard.NonFiniteError` for ``finding``: where (step, rank, field), the checkpoint to resume
    from, and what to change; ``weights_in_memory`` (``"finite"``, ``"non-finite"`` or None) says whether the model in
    memory may still be saved."""
    checkpoint = _resume_from(output_dir, finding)
    where: dict[str, Any] = {"step": finding.step}
    if finding.rank is not None:
        where["rank"] = finding.rank
    where["field"] = finding.field
    next_step = (
        f"Resume from {checkpoint} (trainer.train(resume_from_checkpoint={checkpoint!r})) "
        if checkpoint
        else "Start again "
    )
    next_step += (
        "with a lower learning rate, gradient clipping (max_grad_norm) or bf16 instead of fp16; inspect the "
        f"batch of step {finding.step}."
    )
    if weights_in_memory == "non-finite":
        next_step += " The model in memory holds non-finite weights: do not save or push it."
    return NonFiniteError(
        finding_message(finding, action=action, output_dir=output_dir, detected_at=detected_at),
        where=where,
        next_step=next_step,
        evidence=finding_evidence(
            finding, resume_from=checkpoint, detected_at_step=detected_at, weights_in_memory=weights_in_memory
        ),
    )
