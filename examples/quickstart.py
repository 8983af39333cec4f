"""Quickstart: add trainguard to a Trainer in one line.

Trains a tiny randomly initialised Llama on CPU (no download, well under a minute) with every trainguard guard
attached, then prints what each guard checked and where trainguard wrote its events.

    python examples/quickstart.py [OUTPUT_DIR]
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import trainguard


def tiny_dataset(n_rows: int = 64, seq_len: int = 16, vocab: int = 128) -> list[dict[str, list[int]]]:
    rng = random.Random(0)
    rows = []
    for _ in range(n_rows):
        ids = [rng.randrange(4, vocab) for _ in range(seq_len)]
        rows.append({"input_ids": ids, "attention_mask": [1] * seq_len, "labels": ids})
    return rows


def main() -> None:
    output_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="trainguard-quickstart-"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=4,
        save_strategy="steps",
        save_steps=4,
        save_total_limit=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    guards = trainguard.all_guards()  # the one line: every guard, careful defaults
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(), callbacks=guards)
    result = trainer.train()

    print(f"\ntrained {result.global_step} steps, final loss {result.training_loss:.3f}, output in {output_dir}")
    print(f"trainguard {trainguard.__version__}: {len(guards)} guard(s) attached")
    for guard in guards:
        line = guard.summary()
        if line:  # "" means the guard has nothing to tell about this run (e.g. AdapterGuard without a PEFT model)
            print(f"  {guard.guard_name:<22} {line}")
    events = output_dir / "trainguard-events.jsonl"
    print(f"alerts: {events if events.exists() else 'none raised'}")


if __name__ == "__main__":
    main()
