"""Reproduce every figure in docs/benchmarks.md: run each ``benchmarks/bench_*.py``, then measure ``all_guards()``.

    python benchmarks/run_all.py [--steps 200] [--repeats 7] [--only NAME ...] [--no-scripts]

1. Every ``bench_*.py`` next to this file, one after the other, each in its own process (its figures printed as
   it prints them; a failing script is reported, and the others still run).
2. The overhead of ``trainguard.all_guards()`` on a tiny model against the plain Trainer: a 2-layer Llama (hidden
   32) trained ``--steps`` optimizer steps on CPU without saves, plain and with every guard, interleaved
   (plain, guarded, plain, ...) ``--repeats`` times, fresh ``output_dir`` each run. ``trainer.train()`` wall time
   and this process's CPU time; the median (and the best) of each arm, and the ratio guarded / plain. Goal: 2 %.
   Everything a guard does once per run (fingerprinting the dataset, validating rows, taking the lock, the
   watchdog thread) is inside the timed ``train()``, so the figure is the whole cost of a short run.
3. A summary: each script's exit status and time, and the overhead figures.

Timings on a shared machine are noisy: the CPU time (steadier when other work shares the cores) is printed beside
the wall time. torch uses one thread in part 2 so that both arms compete for the cores the same way.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from _rig import make_lm_dataset, make_tiny_llama, training_args  # noqa: E402


def machine() -> str:
    """One line naming the machine: cores, CPU model, Python, torch."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPU cores ({model}), Python {platform.python_version()}, torch {torch.__version__}; "
        f"load average {load}"
    )


def run_scripts(names: list[str]) -> list[tuple[str, int, float]]:
    """Run each ``bench_*.py`` (all, or those whose name contains one of ``names``); return (name, rc, seconds)."""
    results = []
    for script in sorted(HERE.glob("bench_*.py")):
        if names and not any(n in script.stem for n in names):
            continue
        print(f"\n===== {script.name} =====", flush=True)
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, str(script)], cwd=HERE.parent)
        results.append((script.name, rc, time.perf_counter() - start))
    return results


def _one_run(guarded: bool, steps: int, root: Path, index: int) -> tuple[float, float]:
    """Train ``steps`` steps on the tiny Llama, with or without every guard; return (wall s, CPU s) of train()."""
    from transformers import Trainer

    import trainguard

    out = root / f"{'guarded' if guarded else 'plain'}-{index}"
    trainer = Trainer(
        model=make_tiny_llama(),
        args=training_args(out, max_steps=steps, logging_steps=50, per_device_train_batch_size=4),
        train_dataset=make_lm_dataset(n_rows=64),
        callbacks=trainguard.all_guards() if guarded else [],
    )
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure_overhead(steps: int, repeats: int) -> dict[str, Any]:
    """Median wall and CPU time of ``train()``, plain and with ``all_guards()``, interleaved ``repeats`` times."""
    import logging

    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    logging.getLogger("trainguard").setLevel(logging.WARNING)
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="trainguard-bench-") as tmp:
        _one_run(False, 5, Path(tmp), -1)  # warm-up: imports, kernels, allocator
        _one_run(True, 5, Path(tmp), -2)
        for i in range(repeats):
            for guarded in (False, True):
                times[guarded].append(_one_run(guarded, steps, Path(tmp), i))
                wall, cpu = times[guarded][-1]
                print(
                    f"  run {i + 1}/{repeats} {'all_guards' if guarded else 'plain':>10}: {wall:.3f} s wall, "
                    f"{cpu:.3f} s CPU",
                    flush=True,
                )
    result: dict[str, Any] = {"steps": steps, "repeats": repeats}
    for key, idx in (("wall", 0), ("cpu", 1)):
        plain = statistics.median(t[idx] for t in times[False])
        guarded = statistics.median(t[idx] for t in times[True])
        best_plain = min(t[idx] for t in times[False])
        best_guarded = min(t[idx] for t in times[True])
        result[key] = {
            "plain": plain,
            "guarded": guarded,
            "ratio": guarded / plain,
            "best_ratio": best_guarded / best_plain,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per overhead run (default 200)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved runs per arm (default 7)")
    parser.add_argument("--only", nargs="*", default=[], help="run only the bench scripts whose name contains these")
    parser.add_argument("--no-scripts", action="store_true", help="skip the bench_*.py scripts")
    opts = parser.parse_args()

    print(f"machine: {machine()}", flush=True)
    scripts = [] if opts.no_scripts else run_scripts(opts.only)
    print(f"\n===== all_guards() overhead: {opts.steps} steps, {opts.repeats} interleaved repeats =====", flush=True)
    overhead = measure_overhead(opts.steps, opts.repeats)

    print("\n===== summary =====")
    print(f"machine: {machine()}")
    for name, rc, seconds in scripts:
        print(f"  {name:<28} {'ok' if rc == 0 else f'FAILED (exit {rc})':<16} {seconds:7.1f} s")
    w, c = overhead["wall"], overhead["cpu"]
    print(
        f"  all_guards() overhead, tiny Llama, {overhead['steps']} steps, median of {overhead['repeats']}:\n"
        f"    wall: plain {w['plain']:.3f} s, all_guards {w['guarded']:.3f} s, ratio {w['ratio']:.3f} "
        f"({(w['ratio'] - 1) * 100:+.1f} %); best of each: ratio {w['best_ratio']:.3f}\n"
        f"    CPU:  plain {c['plain']:.3f} s, all_guards {c['guarded']:.3f} s, ratio {c['ratio']:.3f} "
        f"({(c['ratio'] - 1) * 100:+.1f} %); best of each: ratio {c['best_ratio']:.3f}\n"
        f"    goal within 2 %: {'met' if w['ratio'] <= 1.02 else 'NOT met'} (wall)"
    )
    sys.exit(1 if any(rc != 0 for _, rc, _ in scripts) else 0)


if __name__ == "__main__":
    main()
