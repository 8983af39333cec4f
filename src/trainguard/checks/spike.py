"""Loss and gradient-norm spikes: a z-score of each step's value against a rolling window of the steps before it.

The published practice this follows: OLMo-core's skip-step optimizers compare each step's loss and gradient norm
with the mean and standard deviation of the last 128 steps and skip the update when either is more than 6 standard
deviations above, once half the window (64 steps) has been seen; PaLM recovered from about 20 spikes by restarting
some 100 steps before the spike and skipping the 200-500 batches around it.

Plain inputs only: floats per step, the batch's token rows, the candidate checkpoints. Nothing here knows about
the Trainer (:class:`~trainguard.SpikeGuard` is the adapter).

Example::

    from trainguard.checks.spike import SpikeDetector
    detector = SpikeDetector(window=16, threshold=6.0, warmup=8)
    for step, loss in enumerate([2.0, 2.1, 1.9, 2.0] * 3 + [9.0], start=1):
        finding = detector.observe(step, loss=loss)
    assert finding is not None and finding.metric == "loss" and finding.z > 6
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..bounds import MAX_FACTOR, finite_number, whole_number

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
        metric: ``"loss"`` or ``"grad_norm"``: the one with the larger z-score.
        value: The step's value of that metric.
        mean: The mean of the window before the step.
        std: The standard deviation of the window before the step.
        z: ``(value - mean) / std``.
        scores: Every metric's z-score at this step (for the message and the record).
        window: How many steps the mean and deviation were taken over.
    """

    step: int
    metric: str
    value: float
    mean: float
    std: float
    z: float
    scores: Mapping[str, float] = field(default_factory=dict)
    window: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "metric": self.metric,
            "value": self.value,
            "mean": self.mean,
            "std": self.std,
            "z": round(self.z, 3),
            "z_scores": {k: round(v, 3) for k, v in self.scores.items()},
            "window": self.window,
        }


class _Window:
    """The last ``size`` finite values of one metric, with their steps (so a rollback can cut the newer ones), and
    their running sums, so a step costs the same whatever the window's length."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: deque[tuple[int, float]] = deque()
        self._sum = 0.0
        self._sq = 0.0
        self._since_exact = 0

    def append(self, step: int, value: float) -> None:
        if len(self.values) == self.size:
            _, old = self.values.popleft()
            self._sum -= old
            self._sq -= old * old
        self.values.append((step, value))
        self._sum += value
        self._sq += value * value
        self._since_exact += 1
        if self._since_exact >= self.size:  # running sums drift with every subtraction: redo them now and then
            self.recompute()

    def recompute(self) -> None:
        self._sum = math.fsum(v for _, v in self.values)
        self._sq = math.fsum(v * v for _, v in self.values)
        self._since_exact = 0

    def stats(self) -> tuple[float, float, int]:
        n = len(self.values)
        if n < 2:
            return 0.0, 0.0, n
        mean = self._sum / n
        var = max(self._sq - n * mean * mean, 0.0) / (n - 1)
        return mean, math.sqrt(var), n


class SpikeDetector:
    """Z-scores of each step's loss and gradient norm against the ``window`` steps before it.

    A step is a spike when a metric is more than ``threshold`` standard deviations *above* the window's mean (a
    sudden drop is not a spike) and at least ``warmup`` steps are in the window. Non-finite values are not judged
    and not kept (NaN and inf are :class:`~trainguard.NanGuard`'s). Every judged value joins the window, spikes
    included, as in OLMo-core: a lasting change of level stops being a spike once the window has seen it, so a skip
    policy can never freeze a run for good.

    Args:
        window: Steps in the rolling window (default 128).
        threshold: The z-score above which a step is a spike (default 6.0).
        warmup: Steps seen before any step is judged (default 64: half the default window).
        min_std: A floor on the standard deviation, relative to the mean's magnitude, so a perfectly flat window
            (a converged or synthetic loss) does not turn the next tiny wobble into an infinite z-score.

    Raises:
        ConfigError: ``window`` below 2, ``warmup`` below 2 or above ``window``, ``threshold`` not positive or not
            finite, or a count that is not a whole number (a ``ValueError``).

    Example::

        detector = SpikeDetector()
        finding = detector.observe(1, loss=2.31, grad_norm=0.9)   # None (warming up), or a SpikeFinding
    """

    def __init__(self, window: int = 128, threshold: float = 6.0, warmup: int = 64, min_std: float = 1e-3) -> None:
        self.window = whole_number("window", window, low=2, owner="SpikeDetector")
        self.warmup = whole_number("warmup", warmup, low=2, high=self.window, owner="SpikeDetector")
        self.threshold = finite_number(
            "threshold", threshold, low=0, high=MAX_FACTOR, low_open=True, owner="SpikeDetector"
        )
        self.min_std = float(min_std)
        self._windows: dict[str, _Window] = {}

    def score(self, metric: str, value: float) -> tuple[float, float, float, int] | None:
        """``(z, mean, std, n)`` of ``value`` against the window of ``metric``; None in warmup or when not finite."""
        if not math.isfinite(value):
            return None
        win = self._windows.get(metric)
        if win is None:
            return None
        mean, std, n = win.stats()
        if n < self.warmup:
            return None
        std = max(std, self.min_std * max(abs(mean), 1e-12))
        return (value - mean) / std, mean, std, n

    def observe(self, step: int, *, loss: float | None = None, grad_norm: float | None = None) -> SpikeFinding | None:
        """Judge one step's values, add them to the windows, and return the finding when the step is a spike."""
        values = {"loss": loss, "grad_norm": grad_norm}
        scores: dict[str, tuple[float, float, float, int]] = {}
        for metric, value in values.items():
            if value is None:
                continue
            scored = self.score(metric, float(value))
            if scored is not None:
                scores[metric] = scored
        self.add(step, loss=loss, grad_norm=grad_norm)
        over = {m: s for m, s in scores.items() if s[0] > self.threshold}
        if not over:
            return None
        metric = max(over, key=lambda m: over[m][0])
        z, mean, std, n = over[metric]
        return SpikeFinding(
            step=int(step),
            metric=metric,
            value=float(values[metric]),  # type: ignore[arg-type]
            mean=mean,
            std=std,
            z=z,
            scores={m: s[0] for m, s in scores.items()},
            window=n,
        )

    def add(self, step: int, *, loss: float | None = None, grad_norm: float | None = None) -> None:
        """Add finite values to the windows without judging them."""
        for metric, value in (("loss", loss), ("grad_norm", grad_norm)):
            if value is not None and math.isfinite(float(value)):
                self._windows.setdefault(metric, _Window(self.window)).append(int(step), float(value))

    def forget_after(self, step: int) -> None:
        """Drop every value of a step after ``step`` (a rollback to ``checkpoint-{step}``)."""
        for win in self._windows.values():
            kept = [(s, v) for s, v in win.values if s <= step]
            win.values.clear()
            win.values.extend(kept)
            win.recompute()

    def seen(self, metric: str = "loss") -> int:
        """How many values of ``metric`` the window holds."""
        win = self._windows.get(metric)
        return len(win.values) if win is not None else 0


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
    text = (
        f"{finding.metric} spike at step {finding.step}: {finding.value:.4g} is {finding.z:.1f} standard deviations "
        f"above the mean of the previous {finding.window} steps ({finding.mean:.4g} ± {finding.std:.3g}); {action}"
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
