"""What RunLock, GracefulStop and CrashLoopGuard cost: per step, per start.

    python benchmarks/bench_process_guards.py                      # one process
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/bench_process_guards.py   # + the 2-rank all-reduce

Per step only GracefulStop does anything: one attribute read in one process, one 4-byte ``any_rank`` all-reduce
per step with several ranks (gloo on CPU here). Per start: RunLock's flock and holder record, CrashLoopGuard's read
of a crash log.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

from _common import cpu_model, per_call


def main() -> None:
    import torch.distributed as dist

    import trainguard
    from trainguard import distributed
    from trainguard.checks import crash_loop, run_lock

    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    main_rank = distributed.is_main_process()
    if main_rank:
        print(f"machine: {os.cpu_count()} CPU(s), {cpu_model()}; world size {distributed.world_size()}")

    stop = trainguard.GracefulStop(alert_sinks=[])
    args = SimpleNamespace(output_dir="unused")
    state = SimpleNamespace(global_step=1)
    control = SimpleNamespace(should_save=False, should_training_stop=False, should_evaluate=False)
    stop.on_train_begin(args, state, control)  # installs the handlers, reads the world size once
    calls = 2000 if distributed.is_distributed() else 200000
    per_step = per_call(lambda: stop.on_step_end(args, state, control), calls)
    if main_rank:
        print(f"GracefulStop.on_step_end, no signal: {per_step * 1e6:.2f} µs per step")

    if main_rank:
        with tempfile.TemporaryDirectory() as tmp:

            def lock_once() -> None:
                run_lock.acquire_run_lock(tmp).release()

            print(f"acquire_run_lock + release (flock, holder record, fsync): {per_call(lock_once, 50) * 1e3:.2f} ms")
            out = Path(tmp) / "run"
            oom = RuntimeError("CUDA out of memory")
            for i in range(1000):
                crash_loop.record_start(out, run_id=f"r{i}", step=0)
                crash_loop.record_failure(out, run_id=f"r{i}", step=7, exc=oom)
            per_check = per_call(lambda: crash_loop.find_crash_loop(out, max_repeats=3), 10)
            print(f"find_crash_loop over 1000 recorded runs: {per_check * 1e3:.2f} ms (once per start)")
    stop.on_train_end(args, state, control)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
