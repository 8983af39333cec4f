"""A real training run with trainguard's process guards, for tests that kill, signal or crash it.

Run directly (one process) or under torchrun. Prints one ``RESULT {json}`` line on a normal return.

    python guarded_train.py OUTPUT_DIR [--max-steps N] [--guards run_lock,crash_loop_guard,graceful_stop]
        [--progress FILE] [--step-sleep S] [--oom-at STEP] [--oom-if-batch-over N] [--apply-oom-fix]
        [--batch N] [--signals TERM,USR1] [--kill-rank R --kill-at STEP [--kill-signal KILL]]
        [--save-steps N] [--resume] [--max-repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from typing import Any

import torch

import trainguard
from trainguard import distributed
from trainguard.callbacks import GuardCallback

from _rig import make_trainer


class _Probe(GuardCallback):
    """Test plumbing: writes progress, sleeps per step, raises a fake CUDA OOM, sends a real signal to itself."""

    guard_name = "probe"

    def __init__(self, opts: argparse.Namespace) -> None:
        super().__init__(alert_sinks=[])
        self.opts = opts
        self.batches: list[tuple[int, int]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.batches.append((args.per_device_train_batch_size, args.gradient_accumulation_steps))
        if self.opts.progress:
            with open(f"{self.opts.progress}.pid{distributed.rank()}", "w") as fh:
                fh.write(str(os.getpid()))
        return control

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        o = self.opts
        if o.oom_at is not None and state.global_step == o.oom_at and args.per_device_train_batch_size > o.oom_over:
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)"
            )
        if o.step_sleep:
            time.sleep(o.step_sleep)
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        o = self.opts
        if o.progress and distributed.is_main_process():
            with open(o.progress, "a") as fh:
                fh.write(f"{state.global_step}\n")
        if o.kill_rank is not None and distributed.rank() == o.kill_rank and state.global_step == o.kill_at:
            if o.kill_signal == "KILL":  # dies here, before this step's save: no record, no cleanup
                os.kill(os.getpid(), signal.SIGKILL)
            # An outside process sends the signal, so it lands at an arbitrary point of a later step.
            subprocess.Popen(["kill", f"-{o.kill_signal}", str(os.getpid())])
        return control


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--guards", default="run_lock,crash_loop_guard,graceful_stop")
    parser.add_argument("--progress", default="")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--oom-at", type=int, default=None)
    parser.add_argument("--oom-over", type=int, default=0)
    parser.add_argument("--apply-oom-fix", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--signals", default="TERM,USR1")
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-at", type=int, default=3)
    parser.add_argument("--kill-signal", default="TERM")
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-repeats", type=int, default=3)
    opts = parser.parse_args()

    names = [g for g in opts.guards.split(",") if g]
    guards: list[GuardCallback] = []
    stop: trainguard.GracefulStop | None = None
    for name in names:
        if name == "run_lock":
            guards.append(trainguard.RunLock())
        elif name == "crash_loop_guard":
            guards.append(trainguard.CrashLoopGuard(apply_oom_fix=opts.apply_oom_fix, max_repeats=opts.max_repeats))
        elif name == "graceful_stop":
            stop = trainguard.GracefulStop(signals=opts.signals.split(","))
            guards.append(stop)
        elif name == "checkpoint_verifier":
            guards.append(trainguard.CheckpointVerifier())
    probe = _Probe(opts)
    trainer = make_trainer(
        opts.output_dir,
        callbacks=[*guards, probe],
        max_steps=opts.max_steps,
        per_device_train_batch_size=opts.batch,
        logging_steps=1000,
        **({"save_strategy": "steps", "save_steps": opts.save_steps} if opts.save_steps else {}),
    )
    output = trainer.train(resume_from_checkpoint=True if opts.resume else None)
    result = {
        "rank": distributed.rank(),
        "global_step": output.global_step,
        "stopped": stop.stopped if stop is not None else None,
        "stopped_at_step": stop.stopped_at_step if stop is not None else None,
        "stop_signal": stop.stop_signal.name if stop is not None and stop.stop_signal is not None else None,
        "batches": probe.batches,
        "summaries": {g.guard_name: g.summary() for g in guards},
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
