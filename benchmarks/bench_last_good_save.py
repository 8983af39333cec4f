"""What GracefulStop's last good save (``save_on_error=True``) costs: per step, and once at the error.

    python benchmarks/bench_last_good_save.py
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/bench_last_good_save.py   # the 2-rank part

Per step: three more events recorded (``on_step_begin``, ``on_pre_optimizer_step``, ``on_optimizer_step``), each
one attribute write; ``on_step_end`` writes one more beside what it already did. Nothing touches a tensor.
At the error, before the save: the decision (plain Python, a ``stat`` of the step's folder) and the finiteness
check of every weight (one float32 sum per parameter and one read, :func:`trainguard.checks.nan.values.
nonfinite_parameters`). The save itself is the Trainer's own save of that step, plus CheckpointVerifier's manifest:
what a scheduled save of the same step costs.

With several ranks (under torchrun; gloo on CPU), also: the agreement through the c10d store (post this rank's
report, read the others', one atomic verdict) when every rank fails at once, and the whole ``on_train_error`` of a
real 2-rank DDP run whose ranks all die of an OOM in evaluation (agreement, finiteness, the Trainer's save and the
manifest) beside a scheduled save of the same step in the same job.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Any

from _common import cpu_model, per_call


def main() -> None:
    if "RANK" in os.environ:
        ranks()
        return
    import torch

    import trainguard
    from trainguard.checks import last_save
    from trainguard.checks.nan.values import nonfinite_parameters

    print(f"machine: {os.cpu_count()} CPU(s), {cpu_model()}; torch {torch.__version__}")
    stop = trainguard.GracefulStop(alert_sinks=[])
    args, state, control = SimpleNamespace(output_dir="unused"), SimpleNamespace(global_step=1), SimpleNamespace()

    def events() -> None:
        stop.on_step_begin(args, state, control)  # type: ignore[arg-type]
        stop.on_pre_optimizer_step(args, state, control)  # type: ignore[arg-type]
        stop.on_optimizer_step(args, state, control)  # type: ignore[arg-type]

    print(f"per step, the three phase events together: {per_call(events, 200_000) * 1e9:.0f} ns")

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "checkpoint-3")

        def decide() -> None:
            last_save.decide(
                MemoryError(),
                "between",
                step=3,
                should_save=False,
                should_evaluate=True,
                existing=last_save.checkpoint_status(folder),
            )

        print(f"at the error, the decision (with the folder's stat): {per_call(decide, 20_000) * 1e6:.1f} us")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for millions in (25, 250):
            width = 4096
            layers = max(1, millions * 1_000_000 // (width * width))
            model: Any = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))
            model = model.to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
            params = sum(p.numel() for p in model.parameters())

            def check(model: Any = model) -> None:
                nonfinite_parameters(model.named_parameters())

            check()
            seconds = per_call(check, 3, repeat=3)
            print(f"at the error, finiteness of {params / 1e6:.0f}M parameters on {device}: {seconds * 1e3:.1f} ms")
            del model


def ranks() -> None:
    """The 2-rank part: every rank runs it under torchrun."""
    import torch
    import torch.distributed as dist

    import trainguard
    from trainguard import distributed
    from trainguard.checks import last_save

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from transformers import TrainerCallback

    from _rig import make_lm_dataset, make_tiny_llama, make_trainer  # tiny models from configs, nothing downloaded

    dist.init_process_group("gloo")
    main_rank = distributed.is_main_process()
    if main_rank:
        print(f"machine: {os.cpu_count()} CPU(s), {cpu_model()}; world size {distributed.world_size()}, gloo")

    stop = trainguard.GracefulStop(alert_sinks=[])
    mine = last_save.LastSaveDecision(save=True, step=3, reason="ok")
    seconds = []
    for i in range(200):
        stop._store_prefix = f"bench/last_save/{i}"
        distributed.barrier()  # every rank fails "at once", as an OOM in a shared evaluation does
        start = time.perf_counter()
        assert stop._agree(mine, "between").save
        seconds.append(time.perf_counter() - start)
    spread = distributed.gather_object(seconds)
    if main_rank:
        for r, values in enumerate(spread):
            print(
                f"rank {r}: agreement through the store, median {statistics.median(values) * 1e3:.2f} ms, "
                f"p90 {statistics.quantiles(values, n=10)[-1] * 1e3:.2f} ms (200 rounds)"
            )

    error = torch.OutOfMemoryError("CUDA out of memory (benchmark)")

    class OomInEval(TrainerCallback):
        def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            raise error

    layers, width = 4, 512
    config = {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers}
    with tempfile.TemporaryDirectory() as tmp:
        run = distributed.broadcast_object(tmp)

        def trainer_for(folder: str, *callbacks: Any, **args: Any) -> Any:
            return make_trainer(
                folder,
                model=make_tiny_llama(**config),
                callbacks=[*callbacks, trainguard.CheckpointVerifier(background=False)],
                eval_dataset=make_lm_dataset(8, seed=1),
                max_steps=2,
                eval_strategy="steps",
                eval_steps=2,
                per_device_eval_batch_size=4,
                **args,
            )

        # A scheduled save of step 2 in the same job, timed from the Trainer's call to the committed manifest.
        scheduled = trainer_for(os.path.join(run, "scheduled"), save_strategy="steps", save_steps=2)
        from trainguard.callbacks import _trainer_compat

        scheduled.train()
        distributed.barrier()
        start = time.perf_counter()
        scheduled.state.global_step = 3  # a fresh folder: checkpoint-3
        _trainer_compat.save_checkpoint_as_at_save_step(scheduled)
        save_s = time.perf_counter() - start

        stop = trainguard.GracefulStop(alert_sinks=[])
        dying = trainer_for(os.path.join(run, "dying"), stop, OomInEval(), save_strategy="no")
        real = stop.on_train_error
        took: list[float] = []

        def timed(trainer: Any, exc: BaseException) -> None:
            start = time.perf_counter()
            real(trainer, exc)
            took.append(time.perf_counter() - start)

        stop.on_train_error = timed  # type: ignore[method-assign]
        with contextlib.suppress(torch.OutOfMemoryError):
            dying.train()
        assert stop.saved_on_error is not None and trainguard.verify_checkpoint(stop.saved_on_error).ok
        params = sum(p.numel() for p in dying.model.parameters())
        both = distributed.gather_object((save_s, took[0]))
        if main_rank:
            for r, (plain, last) in enumerate(both):
                print(
                    f"rank {r}, {params / 1e6:.1f}M parameters: a scheduled save + manifest {plain * 1e3:.0f} ms; "
                    f"the whole last good save at the error (agreement, finiteness, save, manifest) {last * 1e3:.0f} ms"
                )
        distributed.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
