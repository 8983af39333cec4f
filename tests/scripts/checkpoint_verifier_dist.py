"""Run under torchrun (2 ranks, gloo): CheckpointVerifier in a real distributed job.

    checkpoint_verifier_dist.py RUN_DIR REPORT_DIR

1. Train 4 steps, saving at steps 2 and 4. Besides the Trainer's own files (``rng_state_0.pth`` and
   ``rng_state_1.pth`` come from different ranks), every rank writes its own shard file into the checkpoint in
   ``on_save`` (rank 1 half a second late), like sharded FSDP/DeepSpeed layouts. The manifest must cover them all
   and be written once per checkpoint.
2. Rank 0 flips a byte in ``checkpoint-4/model.safetensors``; a new Trainer resumes with
   ``resume_from_checkpoint=True``: every rank must start from step 2, and the folder is set aside once.

Each rank writes REPORT_DIR/rank{r}.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

import trainguard
from trainguard import distributed
from trainguard.checks import checkpoint as ckpt

from _rig import exit_worker, make_trainer

run_dir, report_dir = (Path(p) for p in sys.argv[1:3])
report: dict[str, Any] = {"manifest_writes": []}

real_write = ckpt.write_manifest


def counting_write(folder: Any, **kwargs: Any) -> Path:
    report["manifest_writes"].append(Path(folder).name)
    return real_write(folder, **kwargs)


ckpt.write_manifest = counting_write  # the callback looks it up on the module at each save


class ShardWriter(TrainerCallback):
    """Stands for a sharded save where every rank writes files of its own."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        rank = distributed.rank()
        if rank == 1:
            time.sleep(0.5)  # late: a manifest written without waiting for every rank would miss this file
        folder = run_dir / f"checkpoint-{state.global_step}" / "shards"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{rank}.bin").write_bytes(bytes([rank]) * 1000)


class Began(TrainerCallback):
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        report["resumed_at"] = state.global_step


# 1. manifests over every rank's files
trainer = make_trainer(
    run_dir,
    callbacks=[ShardWriter(), trainguard.CheckpointVerifier()],
    max_steps=4,
    save_strategy="steps",
    save_steps=2,
)
trainer.train()
report["world_size"] = distributed.world_size()

# 2. a resume after the newest checkpoint was damaged
distributed.barrier()
if distributed.is_main_process():
    path = run_dir / "checkpoint-4" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x01
    path.write_bytes(bytes(data))
distributed.barrier()
resumed = make_trainer(
    run_dir,
    callbacks=[trainguard.CheckpointVerifier(), Began()],
    max_steps=6,
    save_strategy="steps",
    save_steps=2,
)
resumed.train(resume_from_checkpoint=True)

(report_dir / f"rank{distributed.rank()}.json").write_text(json.dumps(report))
exit_worker()
