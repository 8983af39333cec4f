"""What GracefulStop's last good save (``save_on_error=True``) costs: per step, and once at the error.

    python benchmarks/bench_last_good_save.py

Per step: three more events recorded (``on_step_begin``, ``on_pre_optimizer_step``, ``on_optimizer_step``), each
one attribute write; ``on_step_end`` writes one more beside what it already did. Nothing touches a tensor.
At the error, before the save: the decision (plain Python, a ``stat`` of the step's folder) and the finiteness
check of every weight (one float32 sum per parameter and one read, :func:`trainguard.checks.nan.values.
nonfinite_parameters`). The save itself is the Trainer's own save of that step, plus CheckpointVerifier's manifest:
what a scheduled save of the same step costs.
"""

from __future__ import annotations

import os
import tempfile
from types import SimpleNamespace
from typing import Any

from _common import cpu_model, per_call


def main() -> None:
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


if __name__ == "__main__":
    main()
