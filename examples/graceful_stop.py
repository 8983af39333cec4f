"""Graceful stop: a preempted run saves a checkpoint at a step boundary, stops cleanly, and resumes from it.

Trains a tiny randomly initialised Llama on CPU (no download, a few seconds). Halfway through, the process sends
itself SIGTERM, as Slurm, Kubernetes or a spot-instance reclaim would. ``GracefulStop`` finishes the step, the
Trainer saves ``checkpoint-N`` and ``train()`` returns normally; the script then restarts the way a requeued job
would and resumes from that checkpoint. ``RunLock`` and ``CrashLoopGuard`` ride along, as in ``all_guards()``.

    python examples/graceful_stop.py [OUTPUT_DIR]

In a real job nothing sends the signal from inside: drop ``PreemptAt`` and run ``kill -TERM <pid>`` (or
``scancel --signal=USR1``) while it trains.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import trainguard


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
    )
    return LlamaForCausalLM(config)


class PreemptAt(TrainerCallback):
    """Stands in for the scheduler: sends this process SIGTERM during step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
        return control


def make_trainer(output_dir: Path, *callbacks: Any) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=20,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=5,
        save_strategy="steps",
        save_steps=50,  # the regular schedule would not save before the preemption
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    return Trainer(model=tiny_model(), args=args, train_dataset=tiny_dataset(), callbacks=list(callbacks))


def main() -> None:
    output_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="trainguard-stop-"))

    # First job: preempted during step 8.
    stop = trainguard.GracefulStop()  # SIGTERM and SIGUSR1
    lock = trainguard.RunLock()
    trainer = make_trainer(output_dir, lock, trainguard.CrashLoopGuard(), stop, PreemptAt(8))
    trainer.train()
    if stop.stopped and stop.stop_signal is not None:
        print(
            f"\nstopped by {stop.stop_signal.name} after step {stop.stopped_at_step}; "
            f"saved {sorted(p.name for p in output_dir.glob('checkpoint-*'))}"
        )
    lock.release()  # a requeued job would be a new process; here the same process plays both

    # The requeued job: same script, resume from the newest checkpoint.
    trainer = make_trainer(output_dir, trainguard.RunLock(), trainguard.CrashLoopGuard(), trainguard.GracefulStop())
    result = trainer.train(resume_from_checkpoint=True)
    print(f"resumed from checkpoint-{stop.stopped_at_step} and finished at step {result.global_step}")
    print(f"inspect the run with: trainguard inspect {output_dir}")


if __name__ == "__main__":
    main()
