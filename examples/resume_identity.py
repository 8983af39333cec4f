"""Run identity on resume: a LoRA run refuses to resume on other data or with another LoRA config, then continues
on the new data from the checkpoint's adapter weights.

Trains a tiny randomly initialised Llama with a LoRA adapter on CPU (no download, well under a minute):

1. trains one epoch on 32 rows, saving checkpoints;
2. tries to resume on 16 new rows: plain Trainer would "train" 0 steps and report success; DatasetGuard refuses;
3. tries to resume with another ``lora_alpha``: plain Trainer would resume silently; LoraConfigGuard refuses;
4. ``trainguard.continue_on_new_data(trainer)``: the adapter weights of the newest checkpoint, step 0, new
   optimizer and schedule, the old checkpoints archived (never deleted); then trains on the new rows.

    python examples/resume_identity.py [OUTPUT_DIR]
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import trainguard


def rows(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    data = []
    for _ in range(n):
        ids = [rng.randrange(4, 128) for _ in range(16)]
        data.append({"input_ids": ids, "attention_mask": [1] * 16, "labels": ids})
    return Dataset.from_list(data)


def lora_model(lora_alpha: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    base = LlamaForCausalLM(
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
    config = LoraConfig(r=8, lora_alpha=lora_alpha, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def trainer_for(output_dir: Path, data: Dataset, lora_alpha: int = 16, epochs: int = 1) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=4,
        save_strategy="steps",
        save_steps=4,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    guards = [trainguard.DatasetGuard(), trainguard.LoraConfigGuard()]
    return Trainer(model=lora_model(lora_alpha), args=args, train_dataset=data, callbacks=guards)


def main() -> None:
    output_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="trainguard-identity-"))
    old_data, new_data = rows(32, seed=0), rows(16, seed=1)

    first = trainer_for(output_dir, old_data).train()
    print(
        f"1. trained {first.global_step} steps on {len(old_data)} rows; checkpoints: "
        f"{sorted(p.name for p in output_dir.glob('checkpoint-*'))}"
    )

    trainer = trainer_for(output_dir, new_data)
    try:
        trainer.train(resume_from_checkpoint=True)
    except trainguard.DatasetMismatchError as err:
        print(f"2. resume on new data refused: {err.what}")

    try:
        # same data, a second epoch: only the LoRA config differs
        trainer_for(output_dir, old_data, lora_alpha=32, epochs=2).train(resume_from_checkpoint=True)
    except trainguard.LoraConfigMismatchError as err:
        print(f"3. resume with another lora_alpha refused: {err.what}")

    loaded_from = trainguard.continue_on_new_data(trainer)
    result = trainer.train()
    print(
        f"4. continued from the weights of {loaded_from.name} (archived at {loaded_from.parent}); "
        f"trained {result.global_step} steps on {len(new_data)} new rows from step 0"
    )


if __name__ == "__main__":
    main()
