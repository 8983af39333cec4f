"""Run under torchrun (2 ranks, gloo): a run with one poisoned batch (at step 15) and SpikeGuard.

argv: OUT POLICY. Sequential sampling, 2 rows per rank per step, 40 steps, a checkpoint every 10. Each rank writes
rank<R>.json: the spike steps it saw, the steps it skipped, its rollbacks, its final step, a checksum of its weights
and whether they are all finite.
"""

import json
import sys
from pathlib import Path

import torch

from trainguard import LossSpikeError
from trainguard.callbacks.spike_guard import SpikeGuard

from _rig import exit_worker, make_spike_dataset, make_trainer

out, policy = Path(sys.argv[1]), sys.argv[2]
guard = SpikeGuard(policy=policy, window=16, warmup=8)
trainer = make_trainer(
    out / "run",
    callbacks=[guard],
    train_dataset=make_spike_dataset(160, poison=(136, 137)),
    max_steps=40,
    learning_rate=3e-3,
    train_sampling_strategy="sequential",
    save_strategy="steps",
    save_steps=10,
    ddp_backend="gloo",
)
doc = {"error": None}
try:
    trainer.train()
except LossSpikeError as err:
    doc["error"] = err.what
params = [p.detach() for p in trainer.model.parameters()]
doc.update(
    spikes=[f.step for f in guard.findings],
    skipped=guard.skipped_steps,
    rollbacks=[[s, Path(c).name] for s, c in guard.rollbacks],
    step=int(trainer.state.global_step),
    checksum=float(sum(p.double().sum() for p in params)),
    finite=all(bool(torch.isfinite(p).all()) for p in params),
)
(out / f"rank{trainer.args.process_index}.json").write_text(json.dumps(doc))
exit_worker()
