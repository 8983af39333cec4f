"""What PreflightGuard costs: the start estimate on an 8B-parameter Llama, and the per-save free-space check.

    python benchmarks/bench_preflight.py

The 8B model is built on the ``meta`` device (shapes and dtypes, no memory), which is all ``param_stats`` reads.
The per-save check is ``check_disk_space`` plus ``directory_size`` of a real checkpoint folder of the tiny Llama.
Times are the best of several wall-clock runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from _common import best_of, cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainguard.checks.preflight import (
        check_disk_space,
        directory_size,
        estimate_checkpoint_size,
        format_bytes,
        param_stats,
        planned_checkpoints,
    )

    from _rig import run_trainer

    print(f"machine: {os.cpu_count()} CPU(s), {cpu_model()}; torch {torch.__version__}")
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    seconds = best_of(lambda: param_stats(model))
    stats = param_stats(model)
    est = estimate_checkpoint_size(stats, optim="adamw_torch", tokenizer_bytes=9 * 2**20, log_entries=2000)
    n = planned_checkpoints(save_strategy="steps", save_steps=500, max_steps=10_000, save_total_limit=3)
    print(
        f"8B Llama (bf16, full fine-tune, AdamW): param_stats {seconds * 1e3:.2f} ms; one checkpoint "
        f"{format_bytes(est.total_bytes)} (weights {format_bytes(est.weights_bytes)}, optimizer "
        f"{format_bytes(est.optimizer_bytes)}); save_total_limit=3 -> {n} at the peak = "
        f"{format_bytes(n * est.total_bytes)}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        run_trainer(Path(tmp) / "run", max_steps=1, save_strategy="steps", save_steps=1)
        ckpt = Path(tmp) / "run" / "checkpoint-1"
        per_save = best_of(lambda: check_disk_space(ckpt.parent, directory_size(ckpt), margin_bytes=0), repeat=50)
        print(f"per-save check (statvfs + size of an 8-file checkpoint folder): {per_save * 1e6:.0f} us")


if __name__ == "__main__":
    main()
