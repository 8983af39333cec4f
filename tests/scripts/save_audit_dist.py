"""Run under torchrun (2 ranks, gloo): the save audit and resume attestation where every rank must agree.

    save_audit_dist.py ROOT REPORT_DIR

1. ``hollow``: rank 0's save writes an empty embedding (what ZeRO-3 without a gather writes): both ranks stop at that
   save with SaveAuditError, and nothing is committed.
2. ``rng``: rank 1 writes no RNG state at its save: the audit on rank 0 names rng_state_1.pth; both ranks stop.
3. ``attest``: a clean run, an identical resume (no finding on either rank), then a resume with
   ``ignore_data_skip=True`` and ``attest_resume="raise"``: both ranks raise ResumeAttestationError at the first step.

Each rank writes REPORT_DIR/rank{r}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

import trainguard
from trainguard import distributed

from _probes import Probe
from _rig import exit_worker, make_tiny_llama, make_trainer

root, report_dir = (Path(p) for p in sys.argv[1:3])
rank = distributed.rank()
report: dict[str, Any] = {"rank": rank}
SAVE = {"save_strategy": "steps", "save_steps": 2}


def attempt(name: str, trainer: Any, probe: Probe, **train: Any) -> None:
    try:
        trainer.train(**train)
        report[name] = {"raised": None, "steps": probe.steps}
    except trainguard.TrainGuardError as err:
        report[name] = {"raised": type(err).__name__, "what": err.what, "steps": probe.steps}
    verifier = next(c for c in trainer.callback_handler.callbacks if isinstance(c, trainguard.CheckpointVerifier))
    report[name]["findings"] = [(f.level, f.format()) for f in verifier._auditor.findings]


# 1. a hollow save on rank 0
model = make_tiny_llama()
if rank == 0:
    original = model.save_pretrained

    def hollow(*args: Any, **kwargs: Any) -> Any:
        state = dict(kwargs.get("state_dict") or model.state_dict())
        state["model.embed_tokens.weight"] = torch.empty(0)
        kwargs["state_dict"] = state
        return original(*args, **kwargs)

    model.save_pretrained = hollow
probe = Probe()
attempt("hollow", make_trainer(root / "hollow", model=model, callbacks=[trainguard.CheckpointVerifier(), probe],
                               max_steps=6, **SAVE), probe)  # fmt: skip

# 2. no RNG state from rank 1
probe = Probe()
trainer = make_trainer(root / "rng", callbacks=[trainguard.CheckpointVerifier(), probe], max_steps=6, **SAVE)
if rank == 1:
    trainer._save_rng_state = lambda output_dir: None
attempt("rng", trainer, probe)

# 3. attestation
make_trainer(root / "attest", callbacks=[trainguard.CheckpointVerifier()], max_steps=6, **SAVE).train()
resume = {"resume_from_checkpoint": str(root / "attest" / "checkpoint-2")}
probe = Probe()
trainer = make_trainer(root / "attest", callbacks=[trainguard.CheckpointVerifier(), probe], max_steps=6, **SAVE)
attempt("identical", trainer, probe, **resume)
probe = Probe()
verifier = trainguard.CheckpointVerifier(attest_resume="raise")
trainer = make_trainer(root / "attest", callbacks=[verifier, probe], max_steps=6, ignore_data_skip=True, **SAVE)
attempt("no_skip", trainer, probe, **resume)

(report_dir / f"rank{rank}.json").write_text(json.dumps(report))
exit_worker()
