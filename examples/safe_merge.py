"""safe_merge: merge a trained LoRA adapter into its base and publish it as an immutable, checked version.

Trains a LoRA adapter on a tiny randomly initialised Llama for a few steps on CPU (no download, seconds), merges
the checkpoint into ``versions/v001``, prints the version folder and its metadata, then shows that an untrained
adapter is refused ("weights did not change") instead of being published as a copy of the base.

    python examples/safe_merge.py [WORK_DIR]
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import trainguard


def tiny_llama() -> LlamaForCausalLM:
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


def tiny_dataset(n_rows: int = 32, seq_len: int = 16) -> list[dict[str, list[int]]]:
    rng = random.Random(0)
    rows = []
    for _ in range(n_rows):
        ids = [rng.randrange(4, 128) for _ in range(seq_len)]
        rows.append({"input_ids": ids, "attention_mask": [1] * seq_len, "labels": ids})
    return rows


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="trainguard-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    tiny_llama().save_pretrained(work / "base")  # the base model, as you would have it on disk

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(), lora)
    args = TrainingArguments(
        output_dir=str(work / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=4,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=2,
    )
    Trainer(model=model, args=args, train_dataset=tiny_dataset()).train()

    version = trainguard.safe_merge(
        work / "run" / "checkpoint-4",
        work / "base",
        work / "versions",
        dataset_fingerprint="example-data-v1",
        metrics={"train_steps": 4},
        disk_margin_bytes=1 << 20,
    )
    meta = json.loads((version / "trainguard-version.json").read_text())
    print(f"\npublished {version}")
    print("files:", ", ".join(sorted(p.name for p in version.iterdir())))
    shown = {k: meta[k] for k in ("created_utc", "source_checkpoint", "source_step", "dataset_fingerprint", "metrics")}
    shown["lora"] = {k: meta["lora_config"][k] for k in ("r", "lora_alpha", "target_modules")}
    shown["merge_checks"] = meta["merge_checks"]
    print(json.dumps(shown, indent=2, default=str))
    print("loads with from_pretrained:", type(LlamaForCausalLM.from_pretrained(version)).__name__)

    get_peft_model(tiny_llama(), lora).save_pretrained(work / "untrained")  # lora_B is zero: a no-op adapter
    try:
        trainguard.safe_merge(work / "untrained", work / "base", work / "versions", disk_margin_bytes=1 << 20)
    except trainguard.CheckpointIntegrityError as err:
        print(f"\nuntrained adapter refused: {err.what[:80]}...")
    print("versions:", [p.name for p in sorted((work / "versions").iterdir())])


if __name__ == "__main__":
    main()
