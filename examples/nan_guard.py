"""NanGuard: a NaN at step 5 ends the run before it can be saved, and the run resumes from the checkpoint it names.

Trains a tiny randomly initialised Llama on CPU (no download, a few seconds). At step 5 one micro-batch's forward
pass produces NaN logits, as an fp16 overflow or a bad batch would. Without a guard the Trainer would log
``loss 0.0`` (its ``logging_nan_inf_filter`` hides the NaN), apply the NaN update and keep saving poisoned
checkpoints. With ``NanGuard``:

1. the raw loss of every micro-batch is checked (a flag on the device, no per-step sync);
2. before step 5's optimizer update, ``train()`` raises ``NonFiniteError`` naming the step, the value, the
   micro-batch and the newest good checkpoint; nothing of step 5 is applied or saved;
3. the script resumes from that checkpoint (the bad batch was transient here) and finishes.

    python examples/nan_guard.py [OUTPUT_DIR]
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import trainguard

BAD_STEP, GRAD_ACCUM = 5, 2


def tiny_dataset(n_rows: int = 64, seq_len: int = 16, vocab: int = 128) -> list[dict[str, list[int]]]:
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
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config)


def break_one_micro_batch(model: LlamaForCausalLM, micro_batch: int) -> None:
    """Make the training forward number ``micro_batch`` (1-based) return NaN logits, once."""
    calls = [0]

    def hook(module: Any, inputs: Any, output: Any) -> Any:
        if module.training:
            calls[0] += 1
            if calls[0] == micro_batch:
                return output * float("nan")
        return output

    model.lm_head.register_forward_hook(hook)


def make_trainer(output_dir: Path, model: LlamaForCausalLM) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=10,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=GRAD_ACCUM,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return Trainer(model=model, args=args, train_dataset=tiny_dataset(), callbacks=[trainguard.NanGuard()])


def all_finite(checkpoint: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(checkpoint / "model.safetensors")).values())


def main() -> None:
    output_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "run"

    model = tiny_model()
    break_one_micro_batch(model, micro_batch=(BAD_STEP - 1) * GRAD_ACCUM + 2)  # micro-batch 2 of step 5
    trainer = make_trainer(output_dir, model)
    try:
        trainer.train()
        raise SystemExit("expected NanGuard to stop the run")
    except trainguard.NonFiniteError as err:
        print(f"NanGuard stopped the run:\n{err}\n")
        resume_from = err.evidence["resume_from"]

    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    print(f"trained {trainer.state.global_step} steps; checkpoints: {[p.name for p in checkpoints]}")
    print(f"every checkpoint finite: {all(all_finite(p) for p in checkpoints)}")

    # The bad batch was transient: resume from the checkpoint the error named.
    trainer = make_trainer(output_dir, tiny_model())
    output = trainer.train(resume_from_checkpoint=resume_from)
    print(
        f"resumed from {Path(resume_from).name} and finished at step {output.global_step}, "
        f"train loss {output.training_loss:.3f}"
    )


if __name__ == "__main__":
    main()
