"""What the hang watchdog costs: per event on the training thread, per monitor tick, per dump, per run.

    python benchmarks/bench_watchdog.py [--steps 200] [--repeat 3]

- ``beat()`` / ``step_end()`` / a HangWatchdog event handler: ns per call (best of ``--repeat`` runs of 10^6).
- Re-arming faulthandler's C timer (what the monitor does at most once per tick when it saw progress).
- One monitor check with nothing to report; one Python stack dump of every thread (render only, no file).
- A tiny Trainer run (2-layer Llama, CPU) of ``--steps`` steps with and without ``HangWatchdog`` (best of
  ``--repeat``): the difference is the watchdog's whole cost, including its thread.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path
from typing import Any

from _common import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def ns_per_call(stmt: Any, number: int = 1_000_000, repeat: int = 3) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e9


def trainer_seconds(steps: int, repeat: int) -> tuple[float, float]:
    """Best-of-``repeat`` train() seconds without and with HangWatchdog, interleaved so load drifts hit both."""
    import trainguard

    from _rig import make_lm_dataset, make_trainer

    best = {False: float("inf"), True: float("inf")}
    for _ in range(repeat):
        for watchdog in (False, True):
            with tempfile.TemporaryDirectory() as folder:
                callbacks = [trainguard.HangWatchdog()] if watchdog else []
                trainer = make_trainer(
                    folder,
                    callbacks=callbacks,
                    train_dataset=make_lm_dataset(steps * 2),
                    max_steps=steps,
                    logging_steps=steps,
                )
                start = time.perf_counter()
                trainer.train()
                best[watchdog] = min(best[watchdog], time.perf_counter() - start)
    return best[False], best[True]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()

    from transformers import TrainerControl, TrainerState

    import trainguard
    from trainguard.checks.watchdog import Watchdog, _python_stacks

    out: dict[str, Any] = {"machine": f"{os.cpu_count()} CPU(s), {cpu_model()}", "python": platform.python_version()}
    wd = Watchdog(timeout=600)
    out["time.monotonic() ns"] = round(ns_per_call(time.monotonic, repeat=opts.repeat), 1)
    out["Watchdog.beat() ns"] = round(ns_per_call(wd.beat, repeat=opts.repeat), 1)
    out["Watchdog.step_end() ns"] = round(ns_per_call(wd.step_end, repeat=opts.repeat), 1)
    cb = trainguard.HangWatchdog()
    state, control = TrainerState(), TrainerControl()
    out["HangWatchdog.on_step_begin() ns"] = round(
        ns_per_call(lambda: cb.on_step_begin(None, state, control), repeat=opts.repeat), 1
    )

    with tempfile.TemporaryDirectory() as folder:
        fd = os.open(os.path.join(folder, "pending"), os.O_RDWR | os.O_CREAT | os.O_APPEND)
        rearm = min(timeit.repeat(lambda: faulthandler.dump_traceback_later(600, file=fd), number=2000, repeat=3))
        faulthandler.cancel_dump_traceback_later()
        os.close(fd)
        out["faulthandler re-arm us"] = round(rearm / 2000 * 1e6, 1)
        live = Watchdog(timeout=600, output_dir=folder).start("step")

        def progress_then_check() -> None:
            live.beat()  # progress since the last tick: the check re-arms the C timer
            live._check(time.monotonic())

        with live._lock:
            check = min(timeit.repeat(progress_then_check, number=2000, repeat=3))
        live.stop()
        out["monitor check (progress seen, re-arm) us"] = round(check / 2000 * 1e6, 1)
        # Rendered from another thread, as the monitor does (the main thread's stack is then included).
        timing: list[float] = []

        def render() -> None:
            timing.append(threading.active_count())
            timing.append(min(timeit.repeat(_python_stacks, number=200, repeat=3)))

        worker = threading.Thread(target=render)
        worker.start()
        worker.join()
        out[f"Python stack render, {int(timing[0])} threads ms"] = round(timing[1] / 200 * 1e3, 3)

    without, with_wd = trainer_seconds(opts.steps, opts.repeat)
    out[f"tiny Trainer {opts.steps} steps without s"] = round(without, 3)
    out[f"tiny Trainer {opts.steps} steps with HangWatchdog s"] = round(with_wd, 3)
    out["difference %"] = round((with_wd - without) / without * 100, 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
