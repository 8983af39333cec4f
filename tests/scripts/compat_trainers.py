"""``all_guards()`` on the three trainer classes users attach it to: ``Trainer``, ``Seq2SeqTrainer``, TRL's
``SFTTrainer`` with a LoRA model. Tiny models from configs, data and tokenizer made here: no download.

Importable (the 1-rank tests build trainers with :func:`build_trainer`) and runnable, also under torchrun::

    python compat_trainers.py {trainer,seq2seq,sft_lora} OUTPUT_DIR [--phases train,resume]

``train`` trains 4 steps saving every 2; ``resume`` builds a fresh trainer and resumes from the newest checkpoint
(``resume_from_checkpoint=True``) to step 6. Prints one ``RESULT {json}`` line per phase on rank 0.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import trainguard
from trainguard import distributed

from _rig import CORPUS, exit_worker, make_lm_dataset, make_tiny_llama, make_tokenizer, training_args

KINDS = ("trainer", "seq2seq", "sft_lora")


def _common_args(max_steps: int, save_steps: int) -> dict[str, Any]:
    return {
        "per_device_train_batch_size": 2,
        "max_steps": max_steps,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "report_to": "none",
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": 0,
    }


def _seq2seq_dataset(n_rows: int = 32, vocab_size: int = 128) -> Any:
    from datasets import Dataset

    rng = random.Random(0)
    rows = []
    for _ in range(n_rows):
        src = [rng.randrange(4, vocab_size) for _ in range(12)]
        rows.append({"input_ids": src, "attention_mask": [1] * len(src), "labels": list(reversed(src[:8]))})
    return Dataset.from_list(rows)


def build_trainer(
    kind: str, output_dir: str | Path, *, max_steps: int = 4, save_steps: int = 2, lora_r: int = 4, **guards: Any
) -> Any:
    """A trainer of ``kind`` with ``all_guards(**guards)`` attached, on a tiny model and a small dataset."""
    callbacks = trainguard.all_guards(**guards)
    common = _common_args(max_steps, save_steps)
    if kind == "trainer":
        return _trainer(output_dir, common, callbacks)
    if kind == "seq2seq":
        return _seq2seq(output_dir, common, callbacks)
    if kind == "sft_lora":
        return _sft_lora(output_dir, common, callbacks, lora_r)
    raise ValueError(f"unknown trainer kind {kind!r}; one of {KINDS}")


def _trainer(output_dir: str | Path, common: dict[str, Any], callbacks: list[Any]) -> Any:
    from transformers import Trainer

    return Trainer(
        model=make_tiny_llama(),
        args=training_args(output_dir, **common),
        train_dataset=make_lm_dataset(),
        callbacks=callbacks,
    )


def _seq2seq(output_dir: str | Path, common: dict[str, Any], callbacks: list[Any]) -> Any:
    import torch
    from transformers import (
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=128,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=3,
        decoder_start_token_id=0,
    )
    return Seq2SeqTrainer(
        model=T5ForConditionalGeneration(config),
        args=Seq2SeqTrainingArguments(output_dir=str(output_dir), **common),
        train_dataset=_seq2seq_dataset(),
        callbacks=callbacks,
    )


def _sft_lora(output_dir: str | Path, common: dict[str, Any], callbacks: list[Any], lora_r: int) -> Any:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    texts = [{"text": line} for line in CORPUS * 4]
    return SFTTrainer(
        model=make_tiny_llama(),
        args=SFTConfig(output_dir=str(output_dir), max_length=32, dataset_num_proc=None, **common),
        train_dataset=Dataset.from_list(texts),
        processing_class=make_tokenizer(),
        peft_config=LoraConfig(
            r=lora_r, lora_alpha=2 * lora_r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        ),
        callbacks=callbacks,
    )


def guard_summaries(trainer: Any) -> dict[str, str]:
    """``{guard_name: summary()}`` for every trainguard guard attached to ``trainer``."""
    from trainguard.callbacks import GuardCallback

    return {g.guard_name: g.summary() for g in trainer.callback_handler.callbacks if isinstance(g, GuardCallback)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("output_dir")
    parser.add_argument("--phases", default="train,resume")
    opts = parser.parse_args()
    for phase in opts.phases.split(","):
        resume = phase == "resume"
        trainer = build_trainer(opts.kind, opts.output_dir, max_steps=6 if resume else 4)
        output = trainer.train(resume_from_checkpoint=True if resume else None)
        summaries = guard_summaries(trainer)
        if distributed.is_main_process():
            result = {
                "phase": phase,
                "kind": opts.kind,
                "trainer_class": type(trainer).__name__,
                "world_size": distributed.world_size(),
                "global_step": trainer.state.global_step,
                "training_loss": output.training_loss,
                "summaries": summaries,
            }
            print("RESULT " + json.dumps(result), flush=True)
    exit_worker(0)


if __name__ == "__main__":
    main()
