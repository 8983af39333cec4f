"""Run under torchrun (2 ranks, gloo): run lineage in a reused output_dir, in a real distributed job.

    lineage_dist.py ROOT REPORT_DIR

Phases, each in its own folder under ROOT (each rank writes REPORT_DIR/rank{r}.json at the end):

1. ``refuse``: run A saves; a fresh run B into the same folder must be refused on *both* ranks, before step 1.
2. ``rotation``: A saves 2..6; B (``existing_checkpoints="keep"``, ``save_total_limit=2``) saves 2..8.
3. ``stale``: A saves a full checkpoint-2 (``rng_state_0/1.pth`` from both ranks); B saves model-only into it.
4. ``jit``: JIT checkpoints requested on both ranks at the same step: once at a step with no regular save (it must
   be committed), once right after the regular save of step 8 (it must be skipped, not rewrite checkpoint-8).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import trainguard
from trainguard import distributed

from _probes import JitAt, Probe
from _rig import exit_worker, make_trainer

root, report_dir = (Path(p) for p in sys.argv[1:3])
report: dict[str, Any] = {"rank": distributed.rank()}
SAVE = {"save_strategy": "steps", "save_steps": 2}


def train(out: Path, *callbacks: Any, **kwargs: Any) -> Any:
    trainer = make_trainer(out, callbacks=list(callbacks), **kwargs)
    for cb in callbacks:
        if isinstance(cb, JitAt):
            cb.trainer = trainer
    trainer.train()
    return trainer


# 1. a fresh start into another run's checkpoints: refused on every rank, before step 1
train(root / "refuse", trainguard.CheckpointVerifier(), max_steps=2, **SAVE)
began = Probe()
try:
    train(root / "refuse", trainguard.CheckpointVerifier(), began, max_steps=2, **SAVE)
    report["refuse"] = {"raised": None}
except trainguard.LineageError as err:
    report["refuse"] = {"raised": type(err).__name__, "what": err.what, "began_at": began.began_at}

# 2. rotation deletes only this lineage's checkpoints
train(root / "rotation", trainguard.CheckpointVerifier(), max_steps=6, **SAVE)
b = trainguard.CheckpointVerifier(existing_checkpoints="keep")
train(root / "rotation", b, max_steps=8, save_total_limit=2, **SAVE)
report["rotation"] = {"lineage": b.lineage}

# 3. a model-only save into another run's full checkpoint-2
train(root / "stale", trainguard.CheckpointVerifier(), max_steps=2, **SAVE)
b = trainguard.CheckpointVerifier(existing_checkpoints="keep")
train(root / "stale", b, max_steps=2, save_only_model=True, **SAVE)
report["stale"] = {"lineage": b.lineage}

# 4. JIT checkpoints: at a step with no regular save (committed), right after the regular save of step 8 (skipped)
for name, request in (("jit_commit", JitAt(3, "step_end")), ("jit_skip", JitAt(8, "save"))):
    jit = trainguard.CheckpointVerifier()
    train(root / name.replace("_", "-"), jit, request, max_steps=12, enable_jit_checkpoint=True, save_strategy="steps",
          save_steps=4)  # fmt: skip
    report[name] = {"summary": jit.summary()}

(report_dir / f"rank{distributed.rank()}.json").write_text(json.dumps(report))
exit_worker()
