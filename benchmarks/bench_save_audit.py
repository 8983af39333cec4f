"""What the save audit and the resume facts cost, against the save they audit.

    python benchmarks/bench_save_audit.py [--sizes small,medium]

For each model size: a real Trainer trains one step, then (best of 5 each) the Trainer's own save of a checkpoint
(``_save_checkpoint``: weights, optimizer, scheduler, RNG, state), and on the same checkpoint what CheckpointVerifier
adds to every save on the training thread: the save spec from the live model (``save_spec``), the audit of the
written files against it (safetensors headers, the optimizer through a memory map), and the run's facts for the
resume attestation (``resume_facts``); and, apart, the optimizer-structure audit that runs on the hashing thread.
Prints milliseconds and the share of the save. Goal: under 2 % on the training thread.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SIZES = {
    # name: (hidden, intermediate, layers, heads), vocab 128 as in the tests' rig
    "small": (256, 688, 4, 4),
    "medium": (1024, 2752, 6, 8),
}


def best_of(fn: Callable[[], Any], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench(name: str, hidden: int, intermediate: int, layers: int, heads: int) -> None:
    from trainguard.callbacks import _trainer_compat
    from trainguard.checks.checkpoint.audit import audit_checkpoint, audit_optimizer

    from _rig import make_lm_dataset, make_tiny_llama, make_trainer  # type: ignore[import-not-found]

    model = make_tiny_llama(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(prefix="trainguard-bench-audit-") as tmp:
        trainer = make_trainer(tmp, model=model, train_dataset=make_lm_dataset(n_rows=16), max_steps=1)
        trainer.train()
        counter = {"step": 1}

        def save() -> None:
            counter["step"] += 1
            trainer.state.global_step = counter["step"]
            trainer._save_checkpoint(trainer.model, None)

        saving = best_of(save)
        folder = Path(tmp) / f"checkpoint-{counter['step']}"
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        spec = _trainer_compat.save_spec(trainer)
        rows = [
            ("save spec from the live model", best_of(lambda: _trainer_compat.save_spec(trainer))),
            ("audit: weights and files", best_of(lambda: audit_checkpoint(folder, spec, optimizer=False))),
            ("resume facts", best_of(lambda: _trainer_compat.resume_facts(trainer))),
        ]
        background = best_of(lambda: audit_optimizer(folder, spec))
        assert audit_checkpoint(folder, spec) == []
    total = sum(seconds for _, seconds in rows)
    print(f"{name}: {params / 1e6:.1f}M parameters, checkpoint {size / 2**20:.0f} MiB, save {saving * 1000:.1f} ms")
    for label, seconds in rows:
        print(f"  {label:<36} {seconds * 1000:7.2f} ms  {100 * seconds / saving:5.2f} % of the save")
    print(f"  {'on the training thread, in all':<36} {total * 1000:7.2f} ms  {100 * total / saving:5.2f} % of the save")
    print(
        f"  {'audit: optimizer (hashing thread)':<36} {background * 1000:7.2f} ms  "
        f"{100 * background / saving:5.2f} % of the save"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="small,medium")
    opts = parser.parse_args()
    for name in opts.sizes.split(","):
        bench(name, *SIZES[name])


if __name__ == "__main__":
    main()
