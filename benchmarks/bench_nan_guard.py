"""What NanGuard costs per step and per save.

    python benchmarks/bench_nan_guard.py

1. The hot-path pieces on their own: the per-micro-batch loss hook, the grad-norm hook and the per-step decision
   (flag vector, read, judge), single process, on CPU tensors. Best of several loops of 2000 calls.
2. End to end: a real Trainer on a small Llama (hidden 128, 4 layers, GA 2), without NanGuard, with the default
   synchronous check (CPU) and with the deferred check (``sync=False``, the CUDA default). Best of 5 interleaved
   runs, as wall time and as this process's CPU time (steadier when other work shares the machine).
3. The per-step all-reduce of the flags (5 int32) between 2 ranks over gloo on this host.
4. The save-time weight check (``nonfinite_parameters``) on a 100M-parameter Llama, beside the time to write the
   same weights with safetensors: the check is one read of the weights, the save is one read plus a write.

On CPU a host-device synchronisation costs nothing, so these numbers are the CPU cost only; docs/nan-guard.md
explains what the same design costs on CUDA.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from _common import best_of, cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def hot_path() -> None:
    import torch

    from trainguard.callbacks._step_probe import StepProbe
    from trainguard.callbacks.nan_guard import NanGuard

    guard = NanGuard(alert_sinks=[])
    guard._hooked = True
    guard._probe = probe = StepProbe()  # the Trainer's step probe, as on_train_begin leaves it on one process
    probe.subscribe(guard, values=True, sync=True)
    probe.begin(torch.device("cpu"))
    loss, norm, items = torch.tensor(2.5), torch.tensor(1.25), torch.tensor(64.0)
    step_args = (None, None, items)  # training_step(model, inputs, num_items_in_batch)
    args = SimpleNamespace(output_dir=None)
    state = SimpleNamespace(global_step=0)
    control = SimpleNamespace(should_save=False, should_evaluate=False, should_training_stop=False)
    n = 2000

    def observe() -> None:
        for _ in range(n):
            guard._after_training_step(loss, step_args, {})
        guard._flags.reset()

    def grad() -> None:
        for _ in range(n):
            guard._after_grad_norm(norm)

    def step() -> None:
        for _ in range(n):
            guard._after_training_step(loss, step_args, {})
            guard._after_grad_norm(norm)
            guard.on_pre_optimizer_step(args, state, control)
            state.global_step += 1  # the probe shares one record per step

    def full_decision() -> None:
        # What a step costs when the fast path does not apply (2+ ranks, or a value went bad): the flag vector,
        # its read and the judgement, here without the all-reduce.
        for _ in range(n):
            guard._after_training_step(loss, step_args, {})
            guard._after_grad_norm(norm)
            flags = guard._flags
            guard._judge(flags.read(flags.take(1)), args, control, before_update=True)

    loss_us = best_of(observe) / n * 1e6
    grad_us = best_of(grad) / n * 1e6
    step_us = best_of(step) / n * 1e6
    full_us = best_of(full_decision) / n * 1e6
    print(f"loss hook, per micro-batch:                  {loss_us:7.1f} us")
    print(f"grad-norm hook, per step:                    {grad_us:7.1f} us")
    print(f"one clean step, hooks + decision:            {step_us:7.1f} us  (one process: no flag vector)")
    print(f"one step via the flag vector + judgement:   {full_us:7.1f} us  (2+ ranks, without the all-reduce)")
    print("  (timeit figures with warm caches; inside a real step the same Python costs several times more)")


def end_to_end() -> None:
    import logging

    import transformers

    from trainguard.callbacks.nan_guard import NanGuard

    from _rig import make_lm_dataset, make_tiny_llama, make_trainer

    transformers.logging.set_verbosity_error()
    logging.getLogger("trainguard").setLevel(logging.ERROR)
    steps = 30

    def run(guard: Any, root: str) -> tuple[float, float]:
        model = make_tiny_llama(
            hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
        )
        callbacks = [guard] if guard is not None else []
        trainer = make_trainer(
            root,
            model=model,
            train_dataset=make_lm_dataset(256),
            callbacks=callbacks,
            max_steps=steps,
            gradient_accumulation_steps=2,
            logging_steps=10,
        )
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        return (time.perf_counter() - wall) / steps * 1e3, (time.process_time() - cpu) / steps * 1e3

    settings: list[tuple[str, Callable[[], Any]]] = [
        ("no NanGuard", lambda: None),
        ("NanGuard (sync, CPU default)", lambda: NanGuard(alert_sinks=[])),
        ("NanGuard (sync=False, CUDA default)", lambda: NanGuard(alert_sinks=[], sync=False)),
    ]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in settings}
    with tempfile.TemporaryDirectory() as root:
        run(None, root + "/warmup")
        for repeat in range(5):  # interleaved, so slow phases of a busy machine hit every setting
            for name, make in settings:
                results[name].append(run(make(), f"{root}/{repeat}-{len(results[name])}"))
    base_wall = min(w for w, _ in results["no NanGuard"])
    base_cpu = min(c for _, c in results["no NanGuard"])
    print("end to end, hidden 128, 4 layers, GA 2, 30 steps; best of 5 (wall time is noisy on a shared machine;")
    print("process CPU time counts only this process's work):")
    for name, times in results.items():
        wall = min(w for w, _ in times)
        cpu = min(c for _, c in times)
        print(
            f"  {name:38s} wall {wall:7.2f} ms/step ({(wall - base_wall) / base_wall * 100:+5.1f} %)   "
            f"CPU {cpu:7.2f} ms/step ({(cpu - base_cpu) / base_cpu * 100:+5.1f} %)"
        )


def _allreduce_worker(rank: int, port: int, n: int, out: Any) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    flags = torch.zeros(5, dtype=torch.int32)
    for _ in range(50):
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(n):
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if rank == 0:
        out.put((time.perf_counter() - start) / n * 1e6)
    dist.destroy_process_group()


def allreduce_cost() -> None:
    import torch.multiprocessing as mp

    from _rig import free_port

    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    n = 2000
    port = free_port()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, port, n, out)) for r in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    print(f"the per-step flag all-reduce, 2 ranks, gloo on one host:  {out.get():7.1f} us")


def save_time_check() -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainguard.checks.nan import nonfinite_parameters

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=12,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    check = best_of(lambda: nonfinite_parameters(model.named_parameters()), repeat=3)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied to the embedding
    with tempfile.TemporaryDirectory() as root:
        save = best_of(lambda: save_file(state, os.path.join(root, "model.safetensors")), repeat=3)
    print(
        f"weight check before a save, {n_params / 1e6:.0f}M params fp32: {check * 1e3:7.1f} ms "
        f"(safetensors write of the same weights: {save * 1e3:.0f} ms)"
    )


def main() -> None:
    import torch
    import transformers

    print(
        f"machine: {os.cpu_count()} CPU(s), {cpu_model()}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; threads {torch.get_num_threads()}"
    )
    hot_path()
    allreduce_cost()
    end_to_end()
    save_time_check()


if __name__ == "__main__":
    main()
