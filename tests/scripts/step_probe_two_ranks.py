"""Run under torchrun (2 ranks, gloo): NanGuard, SpikeGuard and CheckpointVerifier on one run, counting the
``torch.distributed.all_reduce`` calls each optimizer step makes.

    step_probe_two_ranks.py OUT

Each rank writes OUT/rank{r}.json: the all-reduce calls made between each step's ``on_step_begin`` and its
``on_step_end`` (the guards' step collectives; DDP's gradient reduction runs in C++ and is not counted), and how many
wrappers ``training_step`` carries.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import TrainerCallback

import trainguard

from _rig import exit_worker, make_trainer

out = Path(sys.argv[1])
calls = {"all_reduce": 0}
original = dist.all_reduce


def counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
    calls["all_reduce"] += 1
    return original(*args, **kwargs)


dist.all_reduce = counting_all_reduce


class StepCollectives(TrainerCallback):
    """Last in the list: its on_step_end runs after every guard's."""

    def __init__(self) -> None:
        self.per_step: list[int] = []
        self._start = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._start = calls["all_reduce"]

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.per_step.append(calls["all_reduce"] - self._start)


counter = StepCollectives()
guards = [trainguard.NanGuard(), trainguard.SpikeGuard(window=8, warmup=4), trainguard.CheckpointVerifier()]
trainer = make_trainer(
    out / "run",
    callbacks=[*guards, counter],
    max_steps=6,
    gradient_accumulation_steps=2,
    save_strategy="no",
    ddp_backend="gloo",
)
trainer.train()
depth, step = 0, trainer.training_step
while hasattr(step, "__wrapped__"):
    depth, step = depth + 1, step.__wrapped__
doc = {"per_step": counter.per_step, "training_step_wrappers": depth}
(out / f"rank{trainer.args.process_index}.json").write_text(json.dumps(doc))
exit_worker()
