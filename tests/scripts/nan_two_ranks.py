"""Run under torchrun (2 ranks, gloo): NanGuard when only rank 1 sees a non-finite value.

    nan_two_ranks.py RUN_DIR REPORT_DIR

Three runs in one launch (a launch costs more than a run):

- ``loss_only_sync``: at step 3 rank 1's *reported* loss is NaN while its backward ran on a finite loss, so the
  gradients (all-reduced by DDP) stay finite and rank 0 sees nothing wrong locally. Only the guard's all-reduce can
  tell rank 0. Both ranks must raise at step 3, before its update.
- ``loss_only_async``: the same with ``sync=False`` and the flags kept as tensors (the CUDA path): both ranks must
  raise one step later, naming step 3.
- ``nan_forward_sync``: rank 1's forward really produces NaN at step 3; DDP spreads NaN gradients to rank 0. Both
  ranks must raise at step 3 naming the loss on rank 1, with finite weights (no update applied on either rank).

Each rank writes REPORT_DIR/rank{r}.json: a list with one entry per run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

import trainguard
from trainguard import distributed

from _rig import exit_worker, make_tiny_llama, make_trainer

BAD_STEP = 3
run_dir, report_dir = (Path(p) for p in sys.argv[1:3])


class ReportedLossNanOnRank1(Trainer):
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        loss = super().training_step(*args, **kwargs)  # backward already ran on the finite loss
        if distributed.rank() == 1 and self.state.global_step + 1 == BAD_STEP:
            return loss * float("nan")
        return loss


def nan_forward_on_rank1(model: Any) -> None:
    calls = [0]

    def hook(module: Any, inputs: Any, output: Any) -> Any:
        if not module.training:
            return output
        calls[0] += 1
        return output * float("nan") if distributed.rank() == 1 and calls[0] == BAD_STEP else output

    model.lm_head.register_forward_hook(hook)


def run(
    name: str, *, sync: bool | None, trainer_cls: Any = None, real_nan: bool = False, device_flags: bool = False
) -> dict[str, Any]:
    model = make_tiny_llama()
    if real_nan:
        nan_forward_on_rank1(model)
    guard = trainguard.NanGuard(sync=sync, alert_sinks=[])
    guard._device_flags = device_flags  # tensors all-reduced without a host read, as on CUDA
    trainer = make_trainer(run_dir / name, model=model, callbacks=[guard], trainer_cls=trainer_cls, max_steps=6)
    entry: dict[str, Any] = {"run": name, "rank": distributed.rank()}
    try:
        trainer.train()
        entry["error"] = None
    except trainguard.NonFiniteError as err:
        entry["error"] = {"where": err.where, "evidence": err.evidence, "what": err.what}
    entry["global_step"] = trainer.state.global_step
    entry["weights_finite"] = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    distributed.barrier()  # both ranks finished this run: nobody is left in a collective
    return entry


report = [
    run("loss_only_sync", sync=None, trainer_cls=ReportedLossNanOnRank1),
    run("loss_only_async", sync=False, trainer_cls=ReportedLossNanOnRank1, device_flags=True),
    run("nan_forward_sync", sync=None, real_nan=True),
]
(report_dir / f"rank{distributed.rank()}.json").write_text(json.dumps(report))
exit_worker()
