"""Non-finite values and loss health: finiteness, patience, loss spikes and zero-loss streaks.

Plain functions and small classes on plain inputs (floats, tensors, metric dicts); nothing here knows about the
Trainer. :class:`~trainguard.NanGuard` adapts them to Trainer events; they are just as usable in a custom loop.

Two kinds of helper live here:

- Host-side (``is_finite``, ``nonfinite_metrics``, ``nonfinite_parameters``, :class:`LossHealth`,
  :class:`Patience`): they return Python values. On a tensor that lives on an accelerator, reading the answer is a
  host-device synchronisation; call them where the program synchronises anyway (a log, a save, an evaluation).
- Device-side (``nonfinite_flag``): returns a 0-dim boolean *tensor* on the value's device, so checking every step
  costs one tiny kernel and no synchronisation; the flag is read later, once, where it is cheap.

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

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ...bounds import MAX_FACTOR, finite_number, whole_number
from ..spike import SpikeDetector

__all__ = [
    "LossEvent",
    "LossHealth",
    "NonFiniteFinding",
    "Patience",
    "describe_value",
    "is_finite",
    "nonfinite_flag",
    "nonfinite_metrics",
    "nonfinite_parameters",
]


def _is_tensor(value: Any) -> bool:
    # Duck-typed so that this module never imports torch for plain floats.
    return type(value).__module__.startswith("torch") and hasattr(value, "dtype") and hasattr(value, "numel")


def is_finite(value: Any) -> bool:
    """True when ``value`` holds no NaN and no infinity.

    Accepts Python and NumPy numbers, NumPy arrays and torch tensors (every element must be finite; integer and
    boolean dtypes are always finite). Reading a tensor on an accelerator synchronises with it.

    Args:
        value: A number, array or tensor.

    Raises:
        TypeError: ``value`` is not numeric (a string, None, a dict, ...).

    Example::

        is_finite(0.5)                           # True
        is_finite(float("nan"))                  # False
        is_finite(torch.tensor([1.0, math.inf])) # False
    """
    if isinstance(value, bool):
        return True
    if isinstance(value, numbers.Integral):
        return True
    if isinstance(value, numbers.Real):
        return math.isfinite(float(value))
    if _is_tensor(value):
        import torch

        if not (value.is_floating_point() or value.is_complex()):
            return True
        return bool(torch.isfinite(value).all())
    if type(value).__module__ == "numpy" or hasattr(value, "__array__"):
        import numpy as np

        array = np.asarray(value)
        if array.dtype.kind not in "fc":
            if array.dtype.kind in "iub":
                return True
            raise TypeError(f"is_finite() needs a number, array or tensor, got {type(value).__name__}")
        return bool(np.isfinite(array).all())
    raise TypeError(f"is_finite() needs a number, array or tensor, got {type(value).__name__}")


def describe_value(value: Any) -> str:
    """``"NaN"``, ``"+Inf"``, ``"-Inf"`` or the number itself, for messages."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return repr(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return f"{number:.6g}"


def nonfinite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of ``metrics`` that are NaN or infinite, as ``{name: value}``.

    Strings, booleans, None and other non-numeric entries are ignored (metric dicts often carry them).

    Example::

        nonfinite_metrics({"eval_loss": float("nan"), "eval_runtime": 1.2, "note": "x"})  # {"eval_loss": nan}
    """
    found: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or value is None or isinstance(value, (str, bytes)):
            continue
        try:
            finite = is_finite(value)
        except TypeError:
            continue
        if not finite:
            try:
                found[name] = float(value)
            except (TypeError, ValueError):  # a non-scalar array or tensor
                found[name] = math.nan
    return found


def nonfinite_flag(value: Any) -> Any:
    """A 0-dim boolean tensor on ``value``'s device: True when any element of ``value`` is NaN or infinite.

    No host-device synchronisation: the result stays on the device until someone reads it. Flags from several
    values combine with ``|`` on the device.

    Args:
        value: A torch tensor.

    Example::

        loss, grad_norm = torch.tensor(2.3), torch.tensor(float("inf"))   # on the GPU, in a real step
        bad = nonfinite_flag(loss)            # no sync
        bad = bad | nonfinite_flag(grad_norm) # still no sync
        if bool(bad):                         # one sync, where it is cheap
            print("skip this update")
    """
    import torch

    finite = torch.isfinite(value)
    return finite.logical_not() if finite.dim() == 0 else finite.all().logical_not()


def _local_shard(param: Any) -> Any:
    """The part of ``param`` this process holds: a DTensor's local shard (FSDP2), a ZeRO-3 partition (the parameter
    itself is an empty placeholder there), or the parameter."""
    if param is None:
        return None
    to_local = getattr(param, "to_local", None)
    if callable(to_local):
        return to_local()
    partition = getattr(param, "ds_tensor", None)
    if partition is not None and param.numel() == 0:
        return partition
    return param


def nonfinite_parameters(named_parameters: Iterable[tuple[str, Any]], *, limit: int = 5) -> list[str]:
    """Names of parameters holding a NaN or infinity (at most ``limit``, in model order).

    Sharded parameters are checked where they live: a DTensor's local shard (FSDP2), a ZeRO-3 partition; the caller
    shares the verdict across ranks.

    One float32 sum per parameter on its device and a single read of all the results: one pass over the weights,
    no temporary the size of a weight, and one synchronisation; meant for save time, where the save reads every
    weight anyway. Any NaN or infinity makes the sum non-finite, so nothing is missed; a sum that overflows
    although every element is finite is re-checked element-wise, so nothing is wrongly named.

    Example::

        bad = nonfinite_parameters(model.named_parameters())   # ["model.layers.0.mlp.up_proj.weight", ...]
    """
    import torch

    names: list[str] = []
    params: list[Any] = []
    sums: list[Any] = []
    for name, param in named_parameters:
        local = _local_shard(param)
        if local is None or local.numel() == 0 or not local.is_floating_point():
            continue
        names.append(name)
        params.append(local.detach())
        sums.append(params[-1].sum(dtype=torch.float32))
    if not sums:
        return []
    by_device: dict[Any, list[int]] = {}
    for index, total in enumerate(sums):
        by_device.setdefault(total.device, []).append(index)
    bad: list[int] = []
    for indices in by_device.values():
        finite = torch.isfinite(torch.stack([sums[i] for i in indices])).tolist()
        suspects = [i for i, ok in zip(indices, finite, strict=True) if not ok]
        bad.extend(i for i in suspects if not bool(torch.isfinite(params[i]).all()))
    return [names[i] for i in sorted(bad)[:limit]]


@dataclass(frozen=True)
class NonFiniteFinding:
    """One non-finite value seen in a run.

    Args:
        step: The optimizer step the value belongs to (1-based, as ``state.global_step`` after that step).
        field: Which value: ``"loss"``, ``"grad_norm"``, ``"parameters"``, ``"eval_loss"`` or a metric's name.
        value: The value when this process saw it (``nan``, ``inf``, ``-inf``), else None.
        rank: The lowest rank that saw it (None when not known).
        detail: More location: the micro-batch, parameter names, the loss scale.
    """

    step: int
    field: str
    value: float | None = None
    rank: int | None = None
    detail: str = ""

    def describe(self) -> str:
        """``"loss is NaN (micro-batch 3 of 4)"``, ``"parameters are non-finite (model.norm.weight)"``."""
        verb = "are" if self.field == "parameters" else "is"
        text = f"{self.field} {verb} " + ("non-finite" if self.value is None else describe_value(self.value))
        return f"{text} ({self.detail})" if self.detail else text


class Patience:
    """Counts consecutive bad observations and says when they exceed a tolerance.

    Args:
        patience: How many bad observations in a row are tolerated; the next one exhausts it. 0 tolerates none.

    Example::

        p = Patience(2)
        [p.update(bad) for bad in (True, True, False, True, True, True)]
        # [False, False, False, False, False, True]
    """

    def __init__(self, patience: int) -> None:
        self.patience = whole_number("patience", patience, low=0, owner="Patience")
        self.streak = 0
        self.total = 0

    def update(self, bad: bool) -> bool:
        """Record one observation; True when this one makes the streak longer than ``patience``."""
        if not bad:
            self.streak = 0
            return False
        self.streak += 1
        self.total += 1
        return self.streak > self.patience

    def reset(self) -> None:
        self.streak = 0
        self.total = 0


@dataclass(frozen=True)
class LossEvent:
    """A loss-health warning from :class:`LossHealth`.

    Args:
        kind: ``"spike"`` or ``"zero_loss"``.
        step: The step given to :meth:`LossHealth.update` (None when none was given).
        value: The loss that raised it.
        message: One sentence for a person.
        evidence: The numbers behind it.
    """

    kind: str
    step: int | None
    value: float
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)


class LossHealth:
    """NaN-safe loss watcher: spikes against a running median, and streaks of exactly 0.0.

    Non-finite losses are ignored here (they are errors, caught elsewhere): they neither count as spikes nor
    enter the window, so one NaN can never poison the baseline, unlike a running *mean*, and a NaN compared with a
    threshold can never silently pass as "no spike".

    The spike judgement is :class:`~trainguard.checks.spike.SpikeDetector`'s (SpikeGuard's detector) with its ratio
    rule (``factor=spike_factor``): the same window, median and NaN handling; this class adds the once-per-episode
    reporting and the zero-loss streak.

    Args:
        spike_factor: A loss above ``spike_factor`` times the median of the window is a spike. None disables it.
            The median (not the mean) so that one earlier spike does not raise the bar for the next.
        spike_window: How many recent finite losses form the baseline.
        spike_warmup: No spike is reported before this many finite losses were seen (early losses fall fast).
        zero_loss_steps: Report when this many losses in a row are exactly 0.0 (all labels masked, a loss
            multiplied by zero). None disables it.

    A spike is reported once per episode: consecutive spikes after the first are counted, not re-reported. Spikes
    are only judged while the baseline median is positive (a ratio against a zero or negative loss means nothing).

    Example::

        health = LossHealth(spike_factor=10.0, spike_window=100, spike_warmup=20, zero_loss_steps=5)
        for step, loss in enumerate([2.3] * 30 + [40.0], 1):
            for event in health.update(loss, step=step):
                print(event.message)          # a spike at step 31
    """

    def __init__(
        self,
        *,
        spike_factor: float | None = 10.0,
        spike_window: int = 100,
        spike_warmup: int = 20,
        zero_loss_steps: int | None = 5,
    ) -> None:
        owner = "LossHealth"
        self.spike_factor = finite_number(
            "spike_factor", spike_factor, low=1, high=MAX_FACTOR, low_open=True, allow_none=True, owner=owner
        )
        self.spike_window = whole_number("spike_window", spike_window, low=1, owner=owner)
        self.spike_warmup = whole_number("spike_warmup", spike_warmup, low=1, owner=owner)
        self.zero_loss_steps = whole_number("zero_loss_steps", zero_loss_steps, low=1, allow_none=True, owner=owner)
        self._detector = (
            None
            if self.spike_factor is None
            else SpikeDetector(window=self.spike_window, warmup=self.spike_warmup, factor=self.spike_factor)
        )
        self._in_spike = False
        self.spikes = 0
        self.zero_streak = 0

    def update(self, loss: float, *, step: int | None = None) -> list[LossEvent]:
        """Record one loss; return the warnings it raises (usually none)."""
        value = float(loss)
        events: list[LossEvent] = []
        if not math.isfinite(value):
            self.zero_streak = 0
            return events
        if self.zero_loss_steps is not None:
            self.zero_streak = self.zero_streak + 1 if value == 0.0 else 0
            if self.zero_streak == self.zero_loss_steps:
                events.append(
                    LossEvent(
                        "zero_loss",
                        step,
                        value,
                        f"the loss has been exactly 0.0 for {self.zero_streak} logged values in a row: "
                        "usually every label is masked (-100), so nothing is learned",
                        {"consecutive": self.zero_streak},
                    )
                )
        if self._detector is not None:
            finding = self._detector.observe(step if step is not None else 0, loss=value)
            if finding is not None:
                self.spikes += 1
                if not self._in_spike:
                    events.append(
                        LossEvent(
                            "spike",
                            step,
                            value,
                            f"loss spike: {value:.6g} is {finding.ratio:.1f}x the median {finding.median:.6g} "
                            f"of the last {finding.window} losses (threshold {self.spike_factor:g}x)",
                            {
                                "loss": value,
                                "median": finding.median,
                                "ratio": finding.ratio,
                                "factor": self.spike_factor,
                                "window": finding.window,
                            },
                        )
                    )
            self._in_spike = finding is not None
        return events
