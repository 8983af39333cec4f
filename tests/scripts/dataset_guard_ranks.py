"""Run under torchrun (2 ranks, gloo): train with DatasetGuard and save, then resume on fewer rows.

Each rank writes rank<R>.json: whether its resume was refused, the error's text, and how many steps it ran.
"""

import json
import sys
from pathlib import Path

from transformers import TrainerCallback

from trainguard import DatasetGuard, DatasetMismatchError

from _rig import exit_worker, make_lm_dataset, make_trainer


class Steps(TrainerCallback):
    n = 0

    def on_step_end(self, args, state, control, **kwargs):
        Steps.n += 1
        return control


out = Path(sys.argv[1])
run = out / "run"
common = {"max_steps": -1, "num_train_epochs": 1, "ddp_backend": "gloo"}
# 16 rows, 2 ranks x batch 2: 4 steps per epoch, checkpoints at 2 and 4
make_trainer(
    run, callbacks=[DatasetGuard()], train_dataset=make_lm_dataset(16), save_strategy="steps", save_steps=2, **common
).train()
trainer = make_trainer(run, callbacks=[DatasetGuard(), Steps()], train_dataset=make_lm_dataset(8, seed=1), **common)
doc = {"refused": False, "steps": 0}
try:
    trainer.train(resume_from_checkpoint=True)
except DatasetMismatchError as err:
    doc.update(refused=True, what=err.what, step=err.where.get("step"))
doc["steps"] = Steps.n
rank = trainer.args.process_index
(out / f"rank{rank}.json").write_text(json.dumps(doc))
exit_worker()
