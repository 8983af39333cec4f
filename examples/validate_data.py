"""Validate a fine-tuning dataset before training, then let DataGuard check what the Trainer will really use.

1. Writes a small prompt/completion JSONL with the usual problems (a broken line, an empty answer, a duplicate, a
   contradiction, prompts so long that truncation cuts the whole answer off).
2. ``trainguard.validate_data`` reports each with its line number (a tokenizer trained here measures lengths).
3. The same data, tokenized with the answer-only labels a fine-tuning script builds and truncated to 32 tokens,
   goes to a Trainer with ``DataGuard``: it refuses before step 1, naming the rows that teach nothing.

CPU only, no download, a few seconds.

    python examples/validate_data.py [WORK_DIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import trainguard

MAX_LENGTH = 32
LONG = " ".join(["the run resumed from the newest verified checkpoint after the crash"] * 4)


def write_data(path: Path) -> None:
    rows: list[Any] = [
        {"prompt": "what does a run lock prevent", "completion": " two runs writing one output dir"},
        {"prompt": "why verify checkpoints", "completion": " a flipped byte would go unnoticed"},
        '{"prompt": "what is lora", "completion": "low rank adaptation"',  # line 3: cut off mid-record
        {"prompt": "what is a nan guard", "completion": ""},  # line 4: nothing to learn
        {"prompt": "why verify checkpoints", "completion": " a flipped byte would go unnoticed"},  # duplicate of 2
        {"prompt": "what does a run lock prevent", "completion": " nothing at all"},  # contradicts line 1
        {"prompt": LONG + " so what happened", "completion": " it resumed"},  # line 7: answer past 32 tokens
        {"prompt": "summarise the incident", "completion": " " + LONG},  # truncated, still teaches something
    ]
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def make_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [LONG, "what does a run lock prevent two runs writing one output dir why verify checkpoints"] * 8
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=128, special_tokens=["<pad>", "<unk>"], show_progress=False)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def tokenized_rows(path: Path, tok: Any) -> list[dict[str, list[int]]]:
    """What a typical SFT script builds: labels only on the answer, everything truncated to MAX_LENGTH."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        prompt = tok(rec["prompt"])["input_ids"]
        answer = tok(rec["completion"])["input_ids"]
        if not answer:
            continue
        ids = (prompt + answer)[:MAX_LENGTH]
        labels = ([-100] * len(prompt) + answer)[:MAX_LENGTH]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


def train_with_data_guard(rows: list[dict[str, list[int]]], output_dir: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

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
        max_steps=4,
        per_device_train_batch_size=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), callbacks=[trainguard.DataGuard()])
    try:
        trainer.train()
        print("DataGuard: trained", trainer.state.global_step, "steps")
    except trainguard.DataValidationError as err:
        print(f"DataGuard refused before step {trainer.state.global_step + 1}: {err.what}")


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="trainguard-data-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "train.jsonl"
    write_data(path)

    print("== validate_data without a tokenizer: structure and content ==")
    trainguard.validate_data(path).print()

    print("\n== validate_data with the training tokenizer and max_length=32 ==")
    tok = make_tokenizer()
    report = trainguard.validate_data(path, tokenizer=tok, max_length=MAX_LENGTH)
    report.print()
    print(f"\nreport.ok = {report.ok}; {len(report.error_kinds)} error kind(s); JSON: report.to_json()")

    print("\n== DataGuard on the tokenized, truncated train set ==")
    train_with_data_guard(tokenized_rows(path, tok), work / "run")


if __name__ == "__main__":
    main()
