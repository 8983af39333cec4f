"""Run under torchrun (2 ranks, gloo): GracefulStop's last good save when ranks of a DDP run fail.

    last_good_save_ranks.py MODE RUN_DIR REPORT_DIR

MODE:
- ``eval_oom_all``: every rank raises ``torch.OutOfMemoryError`` from the first prediction step of the evaluation
  after step 3. Every rank reports through the c10d store, all agree, and they save ``checkpoint-3`` together.
- ``eval_oom_rank1``: only rank 1 raises there (``save_on_error_wait=3``). Rank 0 is inside a collective and never
  reports in time: rank 1 gives up the save, warns why, and exits; rank 0 then sees its collective fail.
- ``update_all``: every rank's optimizer raises from inside its 4th update: no rank may save.

``TRAINGUARD_TEST_ENGINE=<layout>`` in the environment runs the same scenario on FSDP (``tests/_engines.py``).

Each rank writes REPORT_DIR/rank{r}.json and leaves with ``os._exit`` (no barrier: in ``eval_oom_rank1`` rank 0
is still inside another collective).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

import trainguard
from trainguard import distributed
from trainguard.alerts import Alert
from trainguard.callbacks.checkpoint_verifier import CheckpointVerifier
from trainguard.callbacks.graceful_stop import GracefulStop

from _rig import make_lm_dataset, make_tiny_llama, training_args

mode = sys.argv[1]
run_dir, report_dir = (Path(p) for p in sys.argv[2:4])
rank = distributed.rank()
OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class Sink:
    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def send(self, alert: Alert) -> None:
        self.alerts.append(alert)


class OomInEval(TrainerCallback):
    def __init__(self, ranks: tuple[int, ...]) -> None:
        self.ranks = ranks

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 3 and distributed.rank() in self.ranks:
            raise OOM


class ExplodeInUpdate(TrainerCallback):
    """Makes the optimizer raise from inside its 4th update, after changing part of the weights (as a fused update
    that died would). Wraps the optimizer the Trainer built (FSDP refuses ``optimizers=``)."""

    calls = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        real_step = inner.step

        def step(*a: Any, **k: Any) -> Any:
            ExplodeInUpdate.calls += 1
            if ExplodeInUpdate.calls == 4:
                with torch.no_grad():
                    inner.param_groups[0]["params"][0].add_(1.0)
                raise OOM
            return real_step(*a, **k)

        inner.step = step


sink = Sink()
stop = GracefulStop(alert_sinks=[sink], save_on_error_wait=3 if mode == "eval_oom_rank1" else 30)
callbacks: list[Any] = [stop, CheckpointVerifier(background=False)]
if mode == "update_all":
    callbacks.append(ExplodeInUpdate())
else:
    callbacks.append(OomInEval((0, 1) if mode == "eval_oom_all" else (1,)))
trainer = Trainer(
    model=make_tiny_llama(),
    args=training_args(
        run_dir,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=100,
        per_device_eval_batch_size=2,
    ),
    train_dataset=make_lm_dataset(),
    eval_dataset=make_lm_dataset(8, seed=1),
    callbacks=callbacks,
)
report: dict[str, Any] = {"rank": rank}
try:
    trainer.train()
    report["error"] = None
except BaseException as err:
    report["error"] = type(err).__name__
    report["message"] = str(err)[:300]
    report["same_object"] = err is OOM
    if stop.saved_on_error is not None:  # on every rank, the commit must have landed before the error got here
        try:
            report["verified_when_caught"] = trainguard.verify_checkpoint(stop.saved_on_error).ok
        except trainguard.TrainGuardError as problem:
            report["verified_when_caught"] = str(problem)[:300]
report["step"] = int(trainer.state.global_step)
report["saved_on_error"] = stop.saved_on_error
report["save"] = stop.last_save.save if stop.last_save is not None else None
report["reason"] = stop.last_save.reason if stop.last_save is not None else None
report["alerts"] = [f"{a.level}: {a.message}" for a in sink.alerts]
(report_dir / f"rank{rank}.json").write_text(json.dumps(report))
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
