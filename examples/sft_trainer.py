"""TRL's SFTTrainer with trainguard: validate the data, then fine-tune a LoRA adapter with every guard attached.

A tiny randomly initialised Llama (built from a config) and a BPE tokenizer trained here on the example's own text:
no download, CPU, a few seconds. Needs the TRL and PEFT extras (`pip install ".[trl,peft]"` from a trainguard clone).

    python examples/sft_trainer.py [OUTPUT_DIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

import trainguard

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
FACTS = [
    ("Where does a resume start?", "From the newest checkpoint whose manifest verifies."),
    ("What stops a NaN run?", "NanGuard, before the poisoned update is applied."),
    ("What does a hang leave behind?", "A dump of every thread's stack, written by HangWatchdog."),
    ("Can two runs share an output_dir?", "No: RunLock refuses the second one and names the first."),
    ("What happens to a damaged checkpoint?", "It is set aside, never deleted, and the run resumes before it."),
    ("What does DataGuard look for?", "Rows with no supervised token, empty rows and rows that are too long."),
    ("When does DatasetGuard act?", "Before a resume loads anything, if the data changed."),
    ("What does LoraConfigGuard compare?", "The checkpoint's adapter config with the one being resumed."),
]

# Eight ways to ask each question: 64 distinct rows (validate_data refuses data that mostly repeats itself).
LEADS = ["Q:", "Question:", "Tell me:", "Quick one:", "Please answer:", "I wonder:", "Explain:", "Briefly:"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-pair tokenizer trained on the example's own text (what a real run downloads with its model)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [f"{lead} {prompt} {answer}" for lead in LEADS for prompt, answer in FACTS]
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(vocab_size=256, special_tokens=SPECIAL))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def main() -> None:
    output_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="trainguard-sft-"))
    output_dir.mkdir(parents=True, exist_ok=True)

    # TRL's prompt/completion format, as a JSONL file: the form most SFT data arrives in.
    rows = [{"prompt": f"{lead} {prompt}", "completion": " " + answer} for lead in LEADS for prompt, answer in FACTS]
    data = output_dir / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    # 1. Check the raw data before anything is spent on it (a report, never a traceback; raises on errors).
    tokenizer = make_tokenizer()
    report = trainguard.validate_data(data, tokenizer=tokenizer, max_length=64)
    report.raise_for_errors()
    stats, warned = report.stats, len(report.warnings)
    print(f"validate_data: {stats['valid_rows']} valid row(s), format {stats['format']}, {warned} warning(s)")

    # 2. Fine-tune a LoRA adapter with every guard attached: the same one line as for a plain Trainer.
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    args = SFTConfig(
        output_dir=str(output_dir / "run"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_length=64,
        logging_steps=4,
        save_strategy="steps",
        save_steps=4,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataset_num_proc=None,
    )
    guards = trainguard.all_guards()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        callbacks=guards,
    )
    result = trainer.train()

    print(f"\ntrained {result.global_step} steps with SFTTrainer, final loss {result.training_loss:.3f}")
    for guard in guards:
        print(f"  {guard.guard_name:<22} {guard.summary()}")
    newest = trainguard.latest_verified_checkpoint(args.output_dir)
    print(f"newest verified checkpoint: {newest}")


if __name__ == "__main__":
    main()
