"""Run under torchrun (2 ranks, gloo): DataGuard when only rank 1's train data has rows that teach nothing.

    data_guard_ranks.py RUN_DIR REPORT_DIR

Rank 1 builds its dataset with every label of one row set to -100; rank 0's data is clean. Both ranks must refuse
before step 1 (rank 0 because rank 1 found them), and neither may hang. Each rank writes REPORT_DIR/rank{r}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import trainguard
from trainguard import distributed

from _rig import exit_worker, make_lm_dataset, make_trainer

run_dir, report_dir = (Path(p) for p in sys.argv[1:3])
report: dict[str, Any] = {"steps": 0}
data = make_lm_dataset()
if distributed.rank() == 1:
    data = data.map(
        lambda row, i: {"labels": [-100] * len(row["labels"]) if i == 3 else row["labels"]}, with_indices=True
    )
guard = trainguard.DataGuard(alert_sinks=[])
trainer = make_trainer(run_dir, callbacks=[guard], train_dataset=data, max_steps=4)
try:
    output = trainer.train()
    report["refused"] = None
    report["steps"] = output.global_step
except trainguard.DataValidationError as err:
    report["refused"] = err.what
    report["global_step"] = trainer.state.global_step
report["rank"] = distributed.rank()
distributed.barrier()
(report_dir / f"rank{distributed.rank()}.json").write_text(json.dumps(report))
exit_worker()
