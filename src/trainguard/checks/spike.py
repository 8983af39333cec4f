"""Loss and gradient-norm spikes: a robust z-score of each step's value against a rolling window of the steps before
it (median and median absolute deviation), beyond the heavy tail that window already holds.

The published practice this follows: OLMo-core's skip-step optimizers compare each step's loss and gradient norm
with the mean and standard deviation of the last 128 steps and skip the update when either is more than 6 standard
deviations above, once half the window (64 steps) has been seen; PaLM recovered from about 20 spikes by restarting
some 100 steps before the spike and skipping the 200-500 batches around it. A mean and standard deviation cried wolf
on healthy small-batch runs (batch size 2, 1 % of rows hard: a few alerts per 450 steps, each naming a legitimately
hard row), so the window's centre and spread are its median and MAD, and a rise no larger than the window's own tail
is not a spike (``benchmarks/bench_spike_detector.py`` measures both rates).

Plain inputs only: floats per step, the batch's token rows, the candidate checkpoints. Nothing here knows about
the Trainer (:class:`~trainguard.SpikeGuard` is the adapter).

Example::

    from trainguard.checks.spike import SpikeDetector
    detector = SpikeDetector(window=16, threshold=6.0, warmup=8)
    for step, loss in enumerate([2.0, 2.1, 1.9, 2.0] * 3 + [9.0], start=1):
        finding = detector.observe(step, loss=loss)
    assert finding is not None and finding.metric == "loss" and finding.z > 6 and not finding.warmup
"""

from __future__ import annotations

import hashlib
import math
from array import array
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..bounds import MAX_COUNT, MAX_FACTOR, finite_number, whole_number

__all__ = [
    "POLICIES",
    "SpikeDetector",
    "SpikeFinding",
    "dataset_indices",
    "rollback_target",
    "row_digest",
    "rows_of",
    "spike_message",
]

#: What SpikeGuard does on a spike: ``alert`` (tell), ``skip`` (drop that step's update on every rank) or
#: ``rollback`` (stop, resume from the newest verified checkpoint before the spike and skip the offending batches).
POLICIES = ("alert", "skip", "rollback")


@dataclass(frozen=True)
class SpikeFinding:
    """One step whose loss or gradient norm is far above the recent ones.

    Args:
        step: The optimizer step (1-based, as ``state.global_step`` after it).
        metric: ``"loss"`` or ``"grad_norm"``: the one with the larger robust z-score.
        value: The step's value of that metric.
        median: The median of the window before the step.
        scale: The window's robust standard deviation (1.4826 × its median absolute deviation, floored).
        z: ``(value - median) / scale``.
        scores: Every metric's robust z-score at this step (for the message and the record).
        window: How many steps the median and deviation were taken over.
        precedent: The largest rise above its own median that the window had seen (a heavy tail's size).
        warmup: True when named inside the warm-up (a loss at least :data:`WARMUP_FACTOR` × the median): such a
            finding is only ever an alert.
        ratio: ``value / median`` (set for every finding; the one that counts under the ratio rule, ``factor``).
    """

    step: int
    metric: str
    value: float
    median: float
    scale: float
    z: float
    scores: Mapping[str, float] = field(default_factory=dict)
    window: int = 0
    precedent: float = 0.0
    warmup: bool = False
    ratio: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "metric": self.metric,
            "value": self.value,
            "median": self.median,
            "scale": self.scale,
            "z": round(self.z, 3),
            "z_scores": {k: round(v, 3) for k, v in self.scores.items()},
            "window": self.window,
            "precedent": self.precedent,
            "warmup": self.warmup,
        }


#: 1.4826 × MAD estimates the standard deviation of normal data; robust to the rare large values it must not count.
_MAD_TO_STD = 1.4826
#: Inside the warm-up, a loss at least this many times the median of the steps so far is named (alert only).
WARMUP_FACTOR = 10.0
#: Values needed before the warm-up rule judges anything (a median of fewer is one or two steps' noise).
WARMUP_MIN_VALUES = 4
#: A rise above the median up to this many times the largest rise the window has already seen is the run's own
#: heavy tail (hard rows at batch size 2), not a spike. Measured: ``benchmarks/bench_spike_detector.py``.
TAIL_FACTOR = 20.0


class _Window:
    """The last ``size`` finite values of one metric with their steps (so a rollback can cut the newer ones), kept
    also sorted (median and MAD by bisection, no sort per step) and with each value's rise above the median it was
    judged against (a sliding maximum of them: the heavy tail the window has seen)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: deque[tuple[int, float, float]] = deque()  # (step, value, rise above its median)
        self._sorted: list[float] = []
        self._rises: deque[tuple[int, float]] = deque()  # decreasing rises: the front is the window's largest

    def __len__(self) -> int:
        return len(self.values)

    def append(self, step: int, value: float) -> None:
        rise = max(value - self.median(), 0.0) if self._sorted else 0.0
        if len(self.values) == self.size:
            old_step, old, _ = self.values.popleft()
            del self._sorted[bisect_left(self._sorted, old)]
            if self._rises and self._rises[0][0] == old_step:
                self._rises.popleft()
        self.values.append((step, value, rise))
        insort(self._sorted, value)
        while self._rises and self._rises[-1][1] <= rise:
            self._rises.pop()
        self._rises.append((step, rise))

    def keep_until(self, step: int) -> None:
        kept = [v for v in self.values if v[0] <= step]
        self.values.clear()
        self._sorted.clear()
        self._rises.clear()
        for item in kept:  # rises as they were judged: the window before them is the same
            self.values.append(item)
            insort(self._sorted, item[1])
            while self._rises and self._rises[-1][1] <= item[2]:
                self._rises.pop()
            self._rises.append((item[0], item[2]))

    def median(self) -> float:
        s, n = self._sorted, len(self._sorted)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2

    def mad_below(self, median: float, bound: float) -> bool:
        """Whether the median absolute deviation is below ``bound``: two bisections, no sort (the hot path)."""
        s = self._sorted
        inside = bisect_left(s, median + bound) - bisect_right(s, median - bound)
        return inside > len(s) // 2

    def mad(self, median: float) -> float:
        deviations = sorted(abs(v - median) for v in self._sorted)
        n = len(deviations)
        return deviations[n // 2] if n % 2 else (deviations[n // 2 - 1] + deviations[n // 2]) / 2

    def precedent(self) -> float:
        return self._rises[0][1] if self._rises else 0.0


class SpikeDetector:
    """Robust z-scores of each step's loss and gradient norm against the ``window`` steps before it.

    A step is a spike when, with at least ``warmup`` values in the window, a metric is

    - more than ``threshold`` robust standard deviations *above* the window's median (1.4826 × the median absolute
      deviation, which the rare large values of a heavy-tailed run do not inflate; a sudden drop is not a spike),
    - and more than :data:`TAIL_FACTOR` (20) times above the median as the largest rise the window has already seen
      (each value's rise above the median it was judged against): a run whose hard rows lift the loss 100× now and
      then has that tail in its window, and one more of them is not a spike; a ×100 in a run without such a tail is.

    Inside the warm-up a loss at least :data:`WARMUP_FACTOR` (10) times the median of the values so far (at least
    :data:`WARMUP_MIN_VALUES` of them), and beyond the tail rule, is named too, with ``warmup=True``: alert only.

    With ``factor`` set, the detector judges by the **ratio rule** instead (NanGuard's ``spike_factor`` on logged
    losses): once ``warmup`` finite values of a metric have been seen, a value above ``factor`` times the window's
    median (a positive median: a ratio against zero or a negative loss means nothing) is a spike; the z-score and the
    tail rule are off. Same window, same median, same NaN handling: one definition of the baseline, two rules.

    Non-finite values are not judged and not kept (NaN and inf are :class:`~trainguard.NanGuard`'s). Every judged
    value joins the window, spikes included, as in OLMo-core: a lasting change of level is a spike at its first
    step only (it is the window's tail from then on), so a skip policy can never freeze a run.

    Args:
        window: Steps in the rolling window (default 128).
        threshold: The robust z-score above which a step is a spike (default 6.0).
        warmup: Steps seen before the z-score judges (default 64: half the default window).
        min_std: A floor on the robust deviation, relative to the median's magnitude, so a perfectly flat window
            (a converged or synthetic loss) does not turn the next tiny wobble into an infinite z-score.
        factor: The ratio rule's factor (above 1); None (default): the z-score rule. With it, ``window`` and
            ``warmup`` may be 1 and ``warmup`` may exceed ``window`` (it counts values seen, not values kept).

    Raises:
        ConfigError: ``window`` below 2, ``warmup`` below 2 or above ``window``, ``threshold`` not positive or not
            finite, or a count that is not a whole number (a ``ValueError``).

    Example::

        detector = SpikeDetector()
        finding = detector.observe(1, loss=2.31, grad_norm=0.9)   # None (no spike), or a SpikeFinding
    """

    def __init__(
        self,
        window: int = 128,
        threshold: float = 6.0,
        warmup: int = 64,
        min_std: float = 1e-3,
        *,
        factor: float | None = None,
    ) -> None:
        owner = "SpikeDetector"
        self.factor = finite_number(
            "factor", factor, low=1, high=MAX_FACTOR, low_open=True, allow_none=True, owner=owner
        )
        low = 2 if self.factor is None else 1
        self.window = whole_number("window", window, low=low, owner=owner)
        high = self.window if self.factor is None else MAX_COUNT
        self.warmup = whole_number("warmup", warmup, low=low, high=high, owner=owner)
        self.threshold = finite_number("threshold", threshold, low=0, high=MAX_FACTOR, low_open=True, owner=owner)
        self.min_std = float(min_std)
        self._windows: dict[str, _Window] = {}
        self._seen: dict[str, int] = {}  # finite values seen per metric (the ratio rule's warm-up)

    def _floor(self, median: float) -> float:
        return self.min_std * max(abs(median), 1e-12)

    def _flags(self, metric: str, value: float) -> bool:
        """Whether ``value`` is a spike of ``metric``: a few bisections, the hot path of every step."""
        win = self._windows.get(metric)
        if self.factor is not None:
            if win is None or not math.isfinite(value) or self._seen.get(metric, 0) < self.warmup:
                return False
            median = win.median()
            return median > 0 and value > self.factor * median
        if win is None or not math.isfinite(value) or len(win) < 2:
            return False
        median = win.median()
        rise = value - median
        if rise <= TAIL_FACTOR * win.precedent():
            return False  # the window has seen rises of this size: the run's own tail
        if len(win) < self.warmup:
            return metric == "loss" and len(win) >= WARMUP_MIN_VALUES and median > 0 and value >= WARMUP_FACTOR * median
        # rise > threshold * scale, with scale = max(1.4826 * MAD, floor): MAD below rise / (threshold * 1.4826)
        if rise <= self.threshold * self._floor(median):
            return False
        return win.mad_below(median, rise / (self.threshold * _MAD_TO_STD))

    def score(self, metric: str, value: float) -> tuple[float, float, float, int] | None:
        """``(z, median, scale, n)`` of ``value`` against the window of ``metric``; None when fewer than 2 values
        are in the window or the value is not finite. Sorts the window: for a finding, not for every step."""
        win = self._windows.get(metric)
        if win is None or not math.isfinite(value) or len(win) < 2:
            return None
        median = win.median()
        scale = max(_MAD_TO_STD * win.mad(median), self._floor(median))
        return (value - median) / scale, median, scale, len(win)

    def observe(self, step: int, *, loss: float | None = None, grad_norm: float | None = None) -> SpikeFinding | None:
        """Judge one step's values, add them to the windows, and return the finding when the step is a spike."""
        values = {m: float(v) for m, v in (("loss", loss), ("grad_norm", grad_norm)) if v is not None}
        flagged = [m for m, v in values.items() if self._flags(m, v)]
        finding = None
        if flagged and self.factor is not None:
            metric = flagged[0]
            win = self._windows[metric]
            median = win.median()
            ratio = values[metric] / median
            finding = SpikeFinding(
                step=int(step),
                metric=metric,
                value=values[metric],
                median=median,
                scale=median,
                z=ratio - 1.0,  # (value - median) / scale, with the median as the scale
                scores={metric: ratio},
                window=len(win),
                precedent=win.precedent(),
                ratio=ratio,
            )
        elif flagged:  # rare: the exact scores, for the message and the record
            scores = {m: s for m, v in values.items() if (s := self.score(m, v)) is not None}
            metric = max(flagged, key=lambda m: scores[m][0])
            z, median, scale, n = scores[metric]
            win = self._windows[metric]
            finding = SpikeFinding(
                step=int(step),
                metric=metric,
                value=values[metric],
                median=median,
                scale=scale,
                z=z,
                scores={m: s[0] for m, s in scores.items()},
                window=n,
                precedent=win.precedent(),
                warmup=n < self.warmup,
                ratio=values[metric] / median if median else 0.0,
            )
        self.add(step, loss=loss, grad_norm=grad_norm)
        return finding

    def add(self, step: int, *, loss: float | None = None, grad_norm: float | None = None) -> None:
        """Add finite values to the windows without judging them."""
        for metric, value in (("loss", loss), ("grad_norm", grad_norm)):
            if value is not None and math.isfinite(float(value)):
                self._windows.setdefault(metric, _Window(self.window)).append(int(step), float(value))
                self._seen[metric] = self._seen.get(metric, 0) + 1

    def forget_after(self, step: int) -> None:
        """Drop every value of a step after ``step`` (a rollback to ``checkpoint-{step}``)."""
        for win in self._windows.values():
            win.keep_until(step)

    def seen(self, metric: str = "loss") -> int:
        """How many values of ``metric`` the window holds."""
        win = self._windows.get(metric)
        return len(win) if win is not None else 0


# ----------------------------------------------------------------------------------------------- the batch's samples
def rows_of(input_ids: Any, attention_mask: Any = None) -> list[list[int]]:
    """The token rows of a batch (a tensor, an array or nested lists), padding removed where a mask says so."""
    ids = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
    mask = attention_mask.tolist() if hasattr(attention_mask, "tolist") else attention_mask
    if ids and isinstance(ids[0], int):
        ids = [ids]
        mask = [mask] if mask is not None else None
    rows: list[list[int]] = []
    for i, row in enumerate(ids or []):
        row_mask = mask[i] if mask is not None and i < len(mask) else None
        if row_mask is not None and len(row_mask) == len(row):
            rows.append([int(t) for t, m in zip(row, row_mask, strict=True) if m])
        else:
            rows.append([int(t) for t in row])
    return rows


def row_digest(tokens: Sequence[int]) -> str:
    """A short, stable id of one sample's tokens: the first 12 hex digits of the SHA-256 of them as int64."""
    if hasattr(tokens, "astype") and hasattr(tokens, "tobytes"):  # a numpy row: the same bytes, no Python ints
        data = tokens.astype("int64").tobytes()
    else:
        data = array("q", [int(t) for t in tokens]).tobytes()
    return hashlib.sha256(data).hexdigest()[:12]


def _signature(tokens: Sequence[int]) -> tuple[int, int]:
    return len(tokens), (int(tokens[0]) if len(tokens) else -1)


def dataset_indices(
    digests: Iterable[str],
    dataset: Any,
    *,
    limit: int = 200_000,
    column: str = "input_ids",
    rows: Sequence[Sequence[int]] | None = None,
) -> dict[str, list[int]]:
    """Where each digest's sample sits in ``dataset`` (a map-style dataset of rows with ``column``): digest ->
    indices. Reads at most ``limit`` rows; digests not found (or a dataset it cannot read) map to nothing.

    With ``rows`` (the samples themselves, whose digests are ``digests``), only dataset rows of the same length and
    first token are hashed. It reads the dataset only when called, which SpikeGuard does only at a spike.
    """
    wanted = set(digests)
    found: dict[str, list[int]] = {}
    if not wanted:
        return found
    signatures = {_signature(r) for r in rows} if rows is not None else None

    def match(index: int, tokens: Any, mask: Any) -> None:
        if mask is not None and len(mask) == len(tokens):
            tokens = [t for t, m in zip(tokens, mask, strict=True) if m]
        if signatures is not None and _signature(tokens) not in signatures:
            return
        digest = row_digest(tokens)
        if digest in wanted:
            found.setdefault(digest, []).append(index)

    try:
        n = min(len(dataset), int(limit))
    except TypeError:  # an iterable dataset: no index to name
        return found
    try:
        columns = getattr(dataset, "column_names", None)
        if columns is not None and column in columns and hasattr(dataset, "with_format"):
            # Arrow to numpy in blocks: several times faster than Python lists of ints.
            view = dataset.with_format("numpy", columns=[c for c in (column, "attention_mask") if c in columns])
            for start in range(0, n, 4096):
                block = view[start : min(n, start + 4096)]
                masks = block.get("attention_mask")
                tokens_block = block[column]
                offsets: Iterable[int] = range(len(tokens_block))
                if masks is None and signatures is not None and getattr(tokens_block, "ndim", 1) == 2:
                    # Rows of one length: compare lengths and first tokens for the whole block at once.
                    import numpy as np

                    width = tokens_block.shape[1]
                    firsts = [first for length, first in signatures if length == width]
                    offsets = np.nonzero(np.isin(tokens_block[:, 0], firsts))[0].tolist() if firsts and width else []
                for offset in offsets:
                    match(start + offset, tokens_block[offset], masks[offset] if masks is not None else None)
            return found
        for index in range(n):
            row = dataset[index]
            tokens = row.get(column) if isinstance(row, Mapping) else None
            if tokens is None:
                return found
            tokens = tokens.tolist() if hasattr(tokens, "tolist") else tokens
            mask = row.get("attention_mask")
            match(index, tokens, mask.tolist() if hasattr(mask, "tolist") else mask)
    except Exception:  # a dataset we cannot read: the digests still name the samples
        return found
    return found


# ---------------------------------------------------------------------------------------------------- the rollback
def rollback_target(candidates: Iterable[int], *, spike_step: int, skip_batches: int) -> int | None:
    """The newest candidate checkpoint step from which every batch to skip is replayed: the newest step at or
    before ``spike_step - skip_batches``; None when there is none."""
    bound = int(spike_step) - int(skip_batches)
    eligible = [int(step) for step in candidates if int(step) <= bound]
    return max(eligible) if eligible else None


def spike_message(finding: SpikeFinding, *, action: str, samples: Mapping[str, Any] | None = None) -> str:
    """One line for the alert: the step, the metric and its z-score, what was done, and the batch's samples."""
    if finding.warmup:
        text = (
            f"{finding.metric} spike at step {finding.step}, inside the warm-up: {finding.value:.4g} is "
            f"{finding.value / finding.median:.0f}x the median of the previous {finding.window} steps "
            f"({finding.median:.4g}); {action}"
        )
    else:
        text = (
            f"{finding.metric} spike at step {finding.step}: {finding.value:.4g} is {finding.z:.1f} robust standard "
            f"deviations above the median of the previous {finding.window} steps ({finding.median:.4g} ± "
            f"{finding.scale:.3g}), beyond any rise they held; {action}"
        )
    if samples:
        indices = samples.get("dataset_indices")
        digests = samples.get("sample_ids")
        if indices:
            text += f"; batch samples (train_dataset indices): {_short(indices)}"
        elif digests:
            text += f"; batch samples (token digests): {_short(digests)}"
    return text


def _short(items: Sequence[Any], limit: int = 16) -> str:
    shown = ", ".join(str(i) for i in list(items)[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"
