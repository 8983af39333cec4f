"""A real Trainer run with HangWatchdog, for tests that make a step stall. One process, or under torchrun.

    python watchdog_train.py OUTPUT_DIR [--stall none|sleep|regex] [--stall-at STEP] [--stall-rank R]
        [--stall-seconds S] [--regex-seconds S] [--action dump|abort] [--timeout S] [--phase-timeout S]
        [--eval-timeout S] [--save-timeout S] [--max-steps N] [--eval-steps N] [--save-steps N]
        [--slow-save S] [--slow-metrics S] [--step-sleep S]

The stall runs inside step ``--stall-at`` (in ``on_step_begin``, after the watchdog's beat, before the forward), in
a function whose name the dump must show: ``sleep_in_step`` (Python ``time.sleep``, the GIL released) or
``regex_in_step`` (a catastrophic regex: C code that holds the GIL). A ticker thread records when Python threads
could run. Prints one ``RESULT {json}`` line on a normal return.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import threading
import time
from typing import Any

import trainguard
from trainguard import distributed
from trainguard.callbacks import GuardCallback

from _rig import make_lm_dataset, make_trainer

_TICKS: list[float] = []


def _ticker() -> None:
    # A pure-Python thread: its gaps show how long no Python thread could run.
    while True:
        _TICKS.append(time.monotonic())
        time.sleep(0.05)


def sleep_in_step(seconds: float) -> None:
    time.sleep(seconds)


def _regex_length(seconds: float) -> int:
    # (a+)+$ on "a"*n + "b" takes about twice as long for each extra "a": calibrate on this machine.
    n = 16
    while True:
        start = time.perf_counter()
        re.match(r"(a+)+$", "a" * n + "b")
        took = time.perf_counter() - start
        if took > 0.05:
            break
        n += 1
    while took < seconds:
        n += 1
        took *= 2
    return n


def regex_in_step(n: int) -> float:
    start = time.monotonic()
    re.match(r"(a+)+$", "a" * n + "b")
    return time.monotonic() - start


class _Stall(GuardCallback):
    guard_name = "stall"

    def __init__(self, opts: argparse.Namespace) -> None:
        super().__init__(alert_sinks=[])
        self.opts = opts
        self.info: dict[str, Any] = {}
        self.regex_n = _regex_length(opts.regex_seconds) if opts.stall == "regex" else 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        o = self.opts
        if o.step_sleep:
            time.sleep(o.step_sleep)
        if state.global_step + 1 != o.stall_at or o.stall == "none" or "wall_start" in self.info:
            return control
        if o.stall_rank >= 0 and distributed.rank() != o.stall_rank:
            return control
        self.info["wall_start"] = time.time()
        start = time.monotonic()
        if o.stall == "sleep":
            sleep_in_step(o.stall_seconds)
        else:
            self.info["regex_n"] = self.regex_n
            self.info["regex_s"] = regex_in_step(self.regex_n)
        end = time.monotonic()
        self.info["wall_end"] = time.time()
        # The longest stretch of the stall in which the ticker thread never ran (no Python thread could).
        marks = [start, *(t for t in list(_TICKS) if start < t < end), end]
        self.info["max_python_gap_s"] = max(b - a for a, b in itertools.pairwise(marks))
        return control

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        time.sleep(self.opts.slow_predict)
        return control


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--stall", choices=("none", "sleep", "regex"), default="none")
    parser.add_argument("--stall-at", type=int, default=3)
    parser.add_argument("--stall-rank", type=int, default=-1)
    parser.add_argument("--stall-seconds", type=float, default=6.0)
    parser.add_argument("--regex-seconds", type=float, default=8.0)
    parser.add_argument("--action", default="dump")
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--first-step-timeout", type=float, default=120.0)
    parser.add_argument("--eval-timeout", type=float, default=None)
    parser.add_argument("--save-timeout", type=float, default=None)
    parser.add_argument("--max-steps", type=int, default=5)
    parser.add_argument("--eval-steps", type=int, default=0)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--slow-save", type=float, default=0.0)
    parser.add_argument("--slow-metrics", type=float, default=0.0)
    parser.add_argument("--slow-predict", type=float, default=0.0)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    opts = parser.parse_args()

    threading.Thread(target=_ticker, name="ticker", daemon=True).start()
    watchdog = trainguard.HangWatchdog(
        opts.timeout,
        action=opts.action,
        first_step_timeout=opts.first_step_timeout,
        eval_timeout=opts.eval_timeout,
        save_timeout=opts.save_timeout,
        abort_grace=60.0,
    )
    stall = _Stall(opts)
    extra: dict[str, Any] = {}
    if opts.eval_steps:
        extra.update(eval_strategy="steps", eval_steps=opts.eval_steps, per_device_eval_batch_size=2)
    if opts.save_steps:
        extra.update(save_strategy="steps", save_steps=opts.save_steps)

    def compute_metrics(_: Any) -> dict[str, float]:
        time.sleep(opts.slow_metrics)  # no Trainer event fires while metrics are computed
        return {"probe": 1.0}

    trainer = make_trainer(
        opts.output_dir,
        callbacks=[watchdog, stall],
        eval_dataset=make_lm_dataset(8, seed=1) if opts.eval_steps else None,
        max_steps=opts.max_steps,
        logging_steps=1,
        **extra,
    )
    if opts.eval_steps:
        trainer.compute_metrics = compute_metrics
    if opts.slow_save:
        original = trainer._save_checkpoint

        def slow_save(*args: Any, **kwargs: Any) -> Any:
            time.sleep(opts.slow_save)  # inside the save: no event until on_save
            return original(*args, **kwargs)

        trainer._save_checkpoint = slow_save
    output = trainer.train()
    result = {
        "rank": distributed.rank(),
        "global_step": output.global_step,
        "reports": [r.evidence() for r in watchdog.reports],
        "summary": watchdog.summary(),
        **stall.info,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
