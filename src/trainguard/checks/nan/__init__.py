"""Non-finite values in a training run: the checks behind :class:`~trainguard.NanGuard`.

Plain functions and small classes on plain inputs (floats, tensors, metric dicts, paths); nothing here knows about
the Trainer. ``NanGuard`` adapts them to Trainer events (``callbacks/nan_guard.py``); they are just as usable in a
custom training loop.

Modules, one concern each:

- :mod:`.values`: finiteness of numbers, arrays, tensors, metrics and weights (``is_finite``, ``nonfinite_flag``,
  ``nonfinite_metrics``, ``nonfinite_parameters``, ``describe_value``), :class:`NonFiniteFinding`,
  :class:`Patience`, and :class:`LossHealth` (NaN-safe loss spikes and zero-loss streaks);
- :mod:`.flags`: one optimizer step's flags: :class:`StepFlagCollector` observes each micro-batch's loss and the
  gradient norm (on the host, or as device ops without a sync), shares them across ranks in one all-reduce, copies
  them to the host asynchronously and reads them as a :class:`StepVerdict`;
- :mod:`.messages`: findings from a verdict, from metrics or from weights, and what they say: headline, message,
  evidence, :class:`~trainguard.NonFiniteError`, and :func:`newest_checkpoint_before` (where to resume from).

Example::

    from trainguard.checks.nan import LossHealth, is_finite
    losses = [2.31, 2.05, 1.98, 0.0, 0.0]           # e.g. read from trainer.state.log_history
    health = LossHealth(spike_factor=10.0, zero_loss_steps=5)
    for step, loss in enumerate(losses, 1):
        if not is_finite(loss):
            raise SystemExit(f"loss is {loss} at step {step}")
        for event in health.update(loss, step=step):
            print(event.message)
"""

from __future__ import annotations

from .flags import StepFlagCollector, StepFlags, StepVerdict, process_topology
from .messages import (
    finding_evidence,
    finding_from_metrics,
    finding_from_parameters,
    finding_from_verdict,
    finding_headline,
    finding_message,
    newest_checkpoint_before,
    nonfinite_error,
    stop_evidence,
)
from .values import (
    LossEvent,
    LossHealth,
    NonFiniteFinding,
    Patience,
    describe_value,
    is_finite,
    nonfinite_flag,
    nonfinite_metrics,
    nonfinite_parameters,
)

__all__ = [
    "LossEvent",
    "LossHealth",
    "NonFiniteFinding",
    "Patience",
    "StepFlagCollector",
    "StepFlags",
    "StepVerdict",
    "describe_value",
    "finding_evidence",
    "finding_from_metrics",
    "finding_from_parameters",
    "finding_from_verdict",
    "finding_headline",
    "finding_message",
    "is_finite",
    "newest_checkpoint_before",
    "nonfinite_error",
    "nonfinite_flag",
    "nonfinite_metrics",
    "nonfinite_parameters",
    "process_topology",
    "stop_evidence",
]
