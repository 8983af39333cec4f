"""The lineage registry (``trainguard-checkpoints.json``) as ranks and saves grow: file size and write time per save.

    python benchmarks/bench_registry_scale.py [--ranks 8,128,1024] [--saves 1000]

For each world size: one ``record_run``, then ``--saves`` calls of ``record_after_save`` (what the main process does
after the first step that follows each save, with every rank's RNG and batch digests gathered), a new run every
100 saves. Prints the file size after the last save (and its largest over the saves) and the median and worst write
time per save (read, summarize, atomic write with fsync). Goal: the size does not grow with ranks or saves, and stays
far under the 1 MiB the registry is read with.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_model


def _observations(world: int, save: int) -> list[dict[str, str]]:
    return [{"rng": f"{save:012x}{rank:020x}", "batch": f"{rank:012x}{save:020x}"} for rank in range(world)]


def bench(world: int, saves: int) -> dict[str, float]:
    from trainguard.checks import lineage
    from trainguard.checks._layout import RUN_MARKER

    with tempfile.TemporaryDirectory(prefix="trainguard-bench-registry-") as tmp:
        out = Path(tmp)
        line = lineage.new_id()
        lineage.record_run(out, lineage=line, run="run-0", adopts_unrecorded=False, world_size=world)
        run, times, largest = "run-0", [], 0
        for save in range(1, saves + 1):
            if save % 100 == 0:
                run = f"run-{save}"
                lineage.record_run(out, lineage=line, run=run, adopts_unrecorded=False, world_size=world)
            observations = _observations(world, save)
            start = time.perf_counter()
            lineage.record_after_save(out, f"checkpoint-{save}", run=run, observations=observations)
            times.append(time.perf_counter() - start)
            largest = max(largest, (out / RUN_MARKER).stat().st_size)
        assert lineage.current_scope(out).lineage == line, "the current lineage was lost"
        return {
            "size": (out / RUN_MARKER).stat().st_size,
            "largest": largest,
            "median_ms": statistics.median(times) * 1000,
            "worst_ms": max(times) * 1000,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="8,128,1024")
    parser.add_argument("--saves", type=int, default=1000)
    options = parser.parse_args()
    print(f"machine: {cpu_model()}; {options.saves} saves, a new run every 100")
    print(f"{'ranks':>6} {'size (KiB)':>11} {'largest (KiB)':>14} {'write median (ms)':>18} {'write worst (ms)':>17}")
    for world in (int(n) for n in options.ranks.split(",")):
        row = bench(world, options.saves)
        print(
            f"{world:>6} {row['size'] / 1024:>11.1f} {row['largest'] / 1024:>14.1f} "
            f"{row['median_ms']:>18.2f} {row['worst_ms']:>17.2f}"
        )


if __name__ == "__main__":
    main()
