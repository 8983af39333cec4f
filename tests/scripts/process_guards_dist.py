"""Run under torchrun (2 ranks, gloo): RunLock, CrashLoopGuard and GracefulStop in a real distributed job.

    process_guards_dist.py LOCKED_DIR RUN_DIR REPORT_DIR

1. A Trainer on LOCKED_DIR (locked by a process outside the job): every rank must get RunLockedError at
   construction, none may hang.
2. A Trainer on RUN_DIR with all three guards, long max_steps; rank 1 alone gets a real SIGTERM from an outside
   ``kill`` after step 3. Both ranks must stop after the same step, with one checkpoint.

Each rank writes REPORT_DIR/rank{r}.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import trainguard
from trainguard import distributed
from trainguard.callbacks import GuardCallback

from _rig import exit_worker, make_trainer

locked_dir, run_dir, report_dir = (Path(p) for p in sys.argv[1:4])
report: dict[str, Any] = {}


class _KillRank1(GuardCallback):
    guard_name = "kill_rank1"

    def __init__(self) -> None:
        super().__init__(alert_sinks=[])
        self.sent_at: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if distributed.rank() == 1 and state.global_step == 3 and self.sent_at is None:
            self.sent_at = state.global_step
            subprocess.Popen(["kill", "-TERM", str(os.getpid())])
        return control


# 1. refused on every rank
try:
    make_trainer(locked_dir, callbacks=[trainguard.RunLock()], max_steps=2)
    report["refused"] = None
except trainguard.RunLockedError as err:
    report["refused"] = str(err)
report["pg_initialised_at_init"] = distributed.world_size() == 2

# 2. graceful stop with the signal on rank 1 only
stop = trainguard.GracefulStop()
killer = _KillRank1()
guards: list[GuardCallback] = [trainguard.RunLock(), trainguard.CrashLoopGuard(), stop, killer]
if hasattr(trainguard, "CheckpointVerifier"):  # verify the stop's checkpoint where the verifier is installed
    guards.append(trainguard.CheckpointVerifier())
trainer = make_trainer(
    run_dir,
    callbacks=guards,
    max_steps=100000,
    logging_steps=1000,
)
output = trainer.train()
report.update(
    rank=distributed.rank(),
    global_step=output.global_step,
    stopped_at_step=stop.stopped_at_step,
    stop_signal=stop.stop_signal.name if stop.stop_signal is not None else None,
    signal_sent_at=killer.sent_at,
)
for cb in trainer.callback_handler.callbacks:
    if isinstance(cb, trainguard.RunLock):
        report["lock"] = cb.summary()
        report["lock_held"] = cb.handle is not None and cb.handle.held
distributed.barrier()
(report_dir / f"rank{distributed.rank()}.json").write_text(json.dumps(report))
exit_worker()
