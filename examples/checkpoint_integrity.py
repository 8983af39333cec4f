"""Checkpoint integrity: every save gets a sha256 manifest; a damaged newest checkpoint is set aside and the run
resumes from the newest one that verifies.

Trains a tiny randomly initialised Llama on CPU (no download, a few seconds), saving at steps 2 and 4. Then it flips
one byte in ``checkpoint-4/model.safetensors`` (what a bad disk, a torn copy or a partial sync does). Plain
``Trainer.train(resume_from_checkpoint=True)`` would load that file without a word; with ``CheckpointVerifier``
the resume sets ``checkpoint-4`` aside (renamed into ``trainguard-quarantine/``, never deleted) and continues from
``checkpoint-2``. Last, a second experiment started fresh in the same folder is refused (it would save over this
run's checkpoints and rotate them away), then started beside them on purpose as a new run lineage.

    python examples/checkpoint_integrity.py [OUTPUT_DIR]

From a shell: ``trainguard verify OUTPUT_DIR`` prints the same table, and ``cd OUTPUT_DIR/checkpoint-2 &&
sha256sum -c trainguard-manifest.sha256`` checks a manifest with GNU coreutils alone.
"""

from __future__ import annotations

import logging
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import trainguard
from trainguard.checks.checkpoint import QUARANTINE_DIR, scan_output_dir
from trainguard.checks.lineage import checkpoint_origin


def tiny_dataset(n_rows: int = 32, seq_len: int = 16, vocab: int = 128) -> list[dict[str, list[int]]]:
    rng = random.Random(0)
    rows = []
    for _ in range(n_rows):
        ids = [rng.randrange(4, vocab) for _ in range(seq_len)]
        rows.append({"input_ids": ids, "attention_mask": [1] * seq_len, "labels": ids})
    return rows


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


class ShowStart(TrainerCallback):
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        print(f"  training starts at step {state.global_step}")
        return control


def make_trainer(output_dir: Path, max_steps: int, **verifier: Any) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=100,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    callbacks = [trainguard.CheckpointVerifier(**verifier), ShowStart()]
    return Trainer(model=tiny_model(), args=args, train_dataset=tiny_dataset(), callbacks=callbacks)


def show(output_dir: Path) -> None:
    for report in scan_output_dir(output_dir):
        lineage = checkpoint_origin(report.path).lineage or "-"
        print(f"  {report.path.name:<14} lineage {lineage:<24} {report.status}")
        for problem in report.problems:
            print(f"      {problem.format()}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="  log: %(message)s")
    output_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="trainguard-integrity-"))

    print(f"1. train 4 steps into {output_dir}, saving at steps 2 and 4")
    make_trainer(output_dir, max_steps=4).train()
    show(output_dir)

    target = output_dir / "checkpoint-4" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    print(f"\n2. flipped one bit in {target.relative_to(output_dir)} (same size, valid header)")
    show(output_dir)
    try:
        trainguard.verify_checkpoint(output_dir / "checkpoint-4")
    except trainguard.CheckpointIntegrityError as err:
        print(f"  verify_checkpoint raised CheckpointIntegrityError:\n    {err.what}\n    next: {err.next_step}")

    print("\n3. resume with resume_from_checkpoint=True (plain Trainer would load the damaged checkpoint-4)")
    make_trainer(output_dir, max_steps=6).train(resume_from_checkpoint=True)
    print(f"  set aside: {sorted(p.name for p in (output_dir / QUARANTINE_DIR).iterdir())}")
    show(output_dir)

    print("\n4. a second experiment, started fresh in the same folder")
    try:
        make_trainer(output_dir, max_steps=2).train()
    except trainguard.LineageError as err:
        print(f"  LineageError before step 1:\n    {err.what}\n    next: {err.next_step}")

    print("\n5. the same, beside the first run on purpose: CheckpointVerifier(existing_checkpoints='keep')")
    make_trainer(output_dir, max_steps=2, existing_checkpoints="keep").train()
    show(output_dir)


if __name__ == "__main__":
    main()
