"""Hang watchdog: a step that stalls is dumped (every thread's stack) instead of waiting silently.

Trains a tiny randomly initialised Llama on CPU (no download, a few seconds). The data loader stalls for 7 s while
fetching the batch of step 4 (prefetched during step 3), as a dead network filesystem or a deadlocked worker would.
``HangWatchdog`` with a 3 s budget writes ``trainguard-hang-rank0-<UTC>.txt`` into the output folder (and the same
stacks to the log), alerts, keeps watching (the default action), and reports when progress resumes. The script then
prints where the main thread was stuck.

    python examples/hang_watchdog.py [OUTPUT_DIR]

In a real run keep the defaults (``HangWatchdog()`` learns the step budget: 10 x the slowest step, at least
300 s) and choose ``action="abort"`` under torchrun or a supervisor that restarts the job.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import trainguard
from trainguard.checks.watchdog import find_dumps


def stalled_data_loader(seconds: float) -> None:
    time.sleep(seconds)  # stands in for a read from a filesystem that stopped answering


class SlowOnceDataset(Dataset[dict[str, torch.Tensor]]):
    """64 rows of random tokens; the ``stall_at``-th fetch stalls (once)."""

    def __init__(self, stall_at: int, stall_seconds: float, n_rows: int = 64, seq_len: int = 16) -> None:
        rng = random.Random(0)
        self.rows = [[rng.randrange(4, 128) for _ in range(seq_len)] for _ in range(n_rows)]
        self.stall_at, self.stall_seconds, self.fetches = stall_at, stall_seconds, 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.fetches += 1
        if self.fetches == self.stall_at:
            stalled_data_loader(self.stall_seconds)
        ids = torch.tensor(self.rows[index])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def main(output_dir: Path) -> None:
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
        max_steps=6,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    # Two rows a step: the 7th fetch is step 4's batch, which accelerate's loader prefetches during step 3.
    dataset = SlowOnceDataset(stall_at=7, stall_seconds=7.0)
    # 3 s for a step; the first step gets 60 s (warm-up). Real runs: HangWatchdog() learns its budget.
    watchdog = trainguard.HangWatchdog(timeout=3, first_step_timeout=60)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[watchdog])
    trainer.train()

    dumps = find_dumps(output_dir)
    print(f"\ntrained {trainer.state.global_step} steps; {len(dumps)} dump file(s) in {output_dir}:")
    for path in dumps:
        print(f"  {path.name}")
    if dumps:
        text = dumps[0].read_text()
        main_section = text.split("(main thread: runs the training loop):", 1)[-1].split("\n\n", 1)[0]
        frames = [line.strip() for line in main_section.splitlines() if line.strip().startswith("File")]
        print("the main thread was stuck here (innermost frames last):")
        for frame in frames[-3:]:
            print(f"  {frame}")
    print(watchdog.summary())


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="trainguard-hang-"))
    main(folder)
