"""How often SpikeDetector cries wolf on healthy heavy-tailed runs, and how fast it sees a real spike.

    python benchmarks/bench_spike_detector.py [--runs 300] [--steps 450]

Simulated, no Trainer (the detector is a pure function of the loss and gradient-norm sequence), batch size 2:
each row's loss is a decaying base times log-normal noise, and (but for ``none``) 1 % of rows are legitimately
hard:

- ``mild``: a hard row's loss and gradient are 1.5-3x the base (a hard example);
- ``random ids``: what the tiny Llama of the tests shows with rows of random ids: the base loss falls from 4.8 to
  0.01 while a hard row stays at 2-4 (so 100-300x the base late in the run) with a gradient norm of 1-20.

Healthy runs give the false-alarm rate (alerts per 1,000 steps, and the share of runs with any alert). Spike runs
add one step at a random step after warm-up whose loss and gradient norm are multiplied by 100, 10 or 5, and give
the detection rate within 5 steps and the delay. "before" is the mean/standard-deviation z-score SpikeGuard used
until issue #26 item 7 (OLMo-core's rule), reproduced here; "after" is :class:`~trainguard.checks.spike.SpikeDetector`.
Both with the defaults: window 128, threshold 6, warm-up 64.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from _common import cpu_model


class MeanStdDetector:
    """The rule before: z = (value - mean) / std over the window, judged once ``warmup`` values are in."""

    def __init__(self, window: int = 128, threshold: float = 6.0, warmup: int = 64) -> None:
        self.window, self.threshold, self.warmup = window, threshold, warmup
        self.values: dict[str, deque[float]] = {}
        self.sums: dict[str, tuple[float, float]] = {}

    def observe(self, step: int, *, loss: float, grad_norm: float) -> Any:
        hit = None
        for metric, value in (("loss", loss), ("grad_norm", grad_norm)):
            win = self.values.setdefault(metric, deque())
            n = len(win)
            if n >= self.warmup:
                total, squares = self.sums.get(metric, (0.0, 0.0))
                mean = total / n
                std = max(math.sqrt(max(squares - n * mean * mean, 0.0) / (n - 1)), 1e-3 * abs(mean))
                if (value - mean) / std > self.threshold:
                    hit = metric
            win.append(value)
            if len(win) > self.window:
                win.popleft()
            self.sums[metric] = (math.fsum(win), math.fsum(v * v for v in win))
        return hit


def run(rng: random.Random, steps: int, tail: str, spike: tuple[int, float] | None) -> Iterable[tuple[float, float]]:
    """One run's (loss, grad_norm) per step."""
    for t in range(1, steps + 1):
        if tail in ("none", "mild"):
            base, grad_base = 0.05 + 2.0 * math.exp(-t / 120), 0.2 + 1.5 * math.exp(-t / 120)
        else:
            base, grad_base = 0.01 + 4.8 * math.exp(-t / 15), 0.03 + 2.0 * math.exp(-t / 30)
        losses, grads = [], []
        for _ in range(2):  # batch size 2
            if rng.random() < 0.01 and tail == "random ids":
                losses.append(2 * rng.uniform(2.0, 4.0) - base)  # the step's mean: 2-4, as the tiny Llama shows
                grads.append(2 * rng.uniform(1.0, 20.0))
                continue
            hard = rng.uniform(1.5, 3.0) if rng.random() < 0.01 and tail == "mild" else 1.0
            losses.append(base * hard * rng.lognormvariate(0, 0.15))
            grads.append(grad_base * hard * rng.lognormvariate(0, 0.3))
        loss, grad = sum(losses) / 2, math.sqrt(sum(g * g for g in grads)) / 2
        if spike is not None and t == spike[0]:
            loss, grad = loss * spike[1], grad * spike[1]
        yield loss, grad


def measure(make: Callable[[], Any], runs: int, steps: int, tail: str, factor: float | None) -> tuple[float, ...]:
    rng = random.Random(1 if factor is None else int(factor) * 7919)
    alerts = runs_alerting = caught = 0
    delays: list[int] = []
    for _ in range(runs):
        spike_step = rng.randrange(100, steps - 10) if factor is not None else None
        detector = make()
        hits = [
            s
            for s, (loss, grad) in enumerate(
                run(rng, steps, tail, (spike_step, factor) if spike_step else None), start=1
            )
            if detector.observe(s, loss=loss, grad_norm=grad)
        ]
        if spike_step is None:
            alerts += len(hits)
            runs_alerting += bool(hits)
        else:
            late = [s - spike_step for s in hits if 0 <= s - spike_step < 5]
            if late:
                caught += 1
                delays.append(late[0])
    if factor is None:
        return 1000 * alerts / (runs * steps), 100 * runs_alerting / runs
    return 100 * caught / runs, (statistics.fmean(delays) if delays else math.nan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--steps", type=int, default=450)
    opts = parser.parse_args()

    from trainguard.checks.spike import SpikeDetector

    print(f"machine: {os.cpu_count()} CPU(s), {cpu_model()}; {opts.runs} runs of {opts.steps} steps, batch size 2")
    rules: dict[str, Callable[[], Any]] = {
        "before (mean/std)": MeanStdDetector,
        "after (median/MAD + tail)": SpikeDetector,
    }
    for tail in ("none", "mild", "random ids"):
        print(f"\n{tail if tail == 'none' else '1 % hard rows, ' + tail}")
        for name, make in rules.items():
            start = time.perf_counter()
            rate, share = measure(make, opts.runs, opts.steps, tail, None)
            line = f"  {name:27s} healthy: {rate:6.2f} alerts / 1,000 steps, {share:5.1f} % of runs alert"
            for factor in (100.0, 10.0, 5.0):
                found, delay = measure(make, opts.runs, opts.steps, tail, factor)
                line += f" | x{factor:g}: {found:5.1f} % caught, delay {delay:.2f}"
            print(line + f"  ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
