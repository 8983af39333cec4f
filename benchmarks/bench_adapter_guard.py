"""What AdapterGuard costs a step: the gradient check until ``check_step``, nothing after, and the one-off zero checks.

    python benchmarks/bench_adapter_guard.py [--layers 32] [--hidden 4096] [--rank 16] [--device cpu]

The model is the adapter part of a Llama-7B-shaped LoRA run (every layer's q/k/v/o/gate/up/down projections,
``lora_A`` and ``lora_B`` of rank ``--rank``: 448 parameters at the defaults) with gradients present, driven through
the guard's own ``on_train_begin`` / ``on_pre_optimizer_step`` / ``on_step_end``. The gradient check reads
``.grad is None`` only (no device sync); the zero check runs once at the start and once at ``check_step``.
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace
from typing import Any

from _common import best_of, cpu_model

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(layers: int, hidden: int, rank: int, device: str) -> Any:
    import torch
    from torch import nn

    class Lora(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lora_A = nn.ModuleDict({"default": nn.Linear(hidden, rank, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, hidden, bias=False)})
            nn.init.zeros_(self.lora_B["default"].weight)

    model = nn.Module()
    model.layers = nn.ModuleList(nn.ModuleDict({m: Lora() for m in MODULES}) for _ in range(layers))
    model.peft_config = {"default": object()}  # what makes it a PEFT model for the guard
    model.to(device)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    opts = parser.parse_args()

    from trainguard.callbacks.adapter_guard import AdapterGuard
    from trainguard.checks.adapter import zero_parameters

    model = build(opts.layers, opts.hidden, opts.rank, opts.device)
    named = list(model.named_parameters())
    args = SimpleNamespace(gradient_checkpointing=False, deepspeed=None, fsdp=None)
    control = SimpleNamespace()
    print(f"machine: {os.cpu_count()} CPU(s), {cpu_model()}; device {opts.device}")
    print(f"adapter parameters: {len(named)} ({sum(p.numel() for _, p in named) / 1e6:.1f} M values)")

    guard = AdapterGuard(check_step=10**9, alert_sinks=[])
    state = SimpleNamespace(global_step=0, max_steps=10**9)
    start = time.perf_counter()
    guard.on_train_begin(args, state, control, model=model)
    print(f"  on_train_begin (finds adapters, one zero check)  {(time.perf_counter() - start) * 1e3:8.2f} ms once")
    guard.on_pre_optimizer_step(args, state, control, model=model)  # the first step: decides, then per step
    guard.on_step_end(args, state, control, model=model)
    n = 200
    t = best_of(lambda: [guard.on_pre_optimizer_step(args, state, control, model=model) for _ in range(n)], 5) / n
    print(f"  on_pre_optimizer_step until check_step          {t * 1e6:8.1f} us a step (no device sync)")
    guard._active = False  # after check_step: what every later step costs
    t = best_of(lambda: [guard.on_pre_optimizer_step(args, state, control, model=model) for _ in range(n)], 5) / n
    print(f"  on_pre_optimizer_step after check_step          {t * 1e6:8.1f} us a step")
    names = [name for name, _ in named if ".lora_B." in name]
    t = best_of(lambda: zero_parameters(named, names), 5)
    print(f"  zero check of every lora_B (at check_step)       {t * 1e3:8.2f} ms once")


if __name__ == "__main__":
    main()
