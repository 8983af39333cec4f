"""Run under torchrun (2 ranks, gloo): PreflightGuard's decisions are the same on every rank.

1. A run whose checkpoints cannot fit is refused before step 1 on both ranks (only rank 0 writes checkpoints and
   measures the disk; rank 1 learns it through the collective).
2. A run that fills the disk stops at the same step on both ranks, before writing the checkpoint that cannot fit.

argv: DISK (a small tmpfs) OUT (where each rank writes its result as JSON)
"""

import json
import sys
from pathlib import Path

from trainguard import PreflightError, PreflightGuard, distributed

from _rig import exit_worker, make_trainer

disk, out = Path(sys.argv[1]), Path(sys.argv[2])
result = {}

trainer = make_trainer(
    disk / "refused",
    callbacks=[PreflightGuard(disk_margin_bytes=16 * 1024)],
    max_steps=20,
    save_strategy="steps",
    save_steps=2,
)
try:
    trainer.train()
    result["refused"] = None
except PreflightError as err:
    result["refused"] = {"step": trainer.state.global_step, "what": err.what}

trainer = make_trainer(
    disk / "fills",
    callbacks=[PreflightGuard(check_disk=False, disk_margin_bytes=16 * 1024)],
    max_steps=20,
    save_strategy="steps",
    save_steps=2,
)
try:
    trainer.train()
    result["stopped"] = None
except PreflightError as err:
    result["stopped"] = {"step": trainer.state.global_step, "where_step": err.where.get("step"), "what": err.what}

(out / f"rank{distributed.rank()}.json").write_text(json.dumps(result))
exit_worker()
