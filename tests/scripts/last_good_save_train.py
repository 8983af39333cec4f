"""Run under torchrun (2 ranks, gloo): GracefulStop's last good save when every rank dies of an OOM in evaluation.

    last_good_save_train.py RUN_DIR REPORT_DIR

Both ranks raise ``torch.OutOfMemoryError`` from the first prediction step of the evaluation after step 3. In a run
of several processes the last good save is a documented no-op (a save is a collective that a rank stuck elsewhere
or already gone would never join): each rank must warn why, save nothing, and let the original error out promptly.

Each rank writes REPORT_DIR/rank{r}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from trainguard import distributed
from trainguard.alerts import Alert
from trainguard.callbacks.checkpoint_verifier import CheckpointVerifier
from trainguard.callbacks.graceful_stop import GracefulStop

from _rig import exit_worker, make_lm_dataset, make_trainer

run_dir, report_dir = (Path(p) for p in sys.argv[1:3])


class Sink:
    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def send(self, alert: Alert) -> None:
        self.alerts.append(alert)


class OomInEval(TrainerCallback):
    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 3:
            raise self.error

    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (evaluation)")


sink = Sink()
stop = GracefulStop(alert_sinks=[sink])
oom = OomInEval()
trainer = make_trainer(
    run_dir,
    callbacks=[stop, CheckpointVerifier(background=False), oom],
    eval_dataset=make_lm_dataset(8, seed=1),
    max_steps=6,
    eval_strategy="steps",
    eval_steps=3,
    save_strategy="steps",
    save_steps=100,
)
report: dict[str, Any] = {"rank": distributed.rank()}
try:
    trainer.train()
    report["error"] = None
except Exception as err:
    report["error"] = type(err).__name__
    report["same_object"] = err is OomInEval.error
report["saved_on_error"] = stop.saved_on_error
report["reason"] = stop.last_save.reason if stop.last_save is not None else None
report["warned"] = any(a.level == "warning" and "no last save" in a.message for a in sink.alerts)
(report_dir / f"rank{distributed.rank()}.json").write_text(json.dumps(report))
exit_worker()
