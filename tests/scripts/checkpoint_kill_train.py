"""A real training run with CheckpointVerifier that is killed with SIGKILL during the save of checkpoint-K.

    python checkpoint_kill_train.py OUTPUT_DIR --kill-step K --mode MODE [--delay SECONDS]

Modes (each ends in a real ``SIGKILL`` of this process; the exit status is -9):

- ``optimizer``: half of ``checkpoint-K/optimizer.pt`` is written (``torch.save`` writes in place), then the kill.
- ``manifest``: the save completes, the manifest's JSON is written, and the kill lands before the commit marker.
- ``timer``: when the save of checkpoint-K is about to start, a thread kills the process after ``--delay`` seconds:
  anywhere inside the Trainer's save, the manifest hashing, or just after.

Saves every step, so checkpoints 1 .. K-1 are complete when the kill comes.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

import trainguard
from trainguard.checks import checkpoint as ckpt

from _rig import make_trainer


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)  # never reached


class _Timer(TrainerCallback):
    def __init__(self, step: int, delay: float) -> None:
        self.step = step
        self.delay = delay

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save and state.global_step == self.step:

            def later() -> None:
                time.sleep(self.delay)
                _kill()

            threading.Thread(target=later, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--kill-step", type=int, required=True)
    parser.add_argument("--mode", choices=("optimizer", "manifest", "timer"), required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    opts = parser.parse_args()
    target = Path(opts.output_dir).resolve() / f"checkpoint-{opts.kill_step}"
    extra: list[Any] = []

    if opts.mode == "optimizer":
        real_save = torch.save

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            path = Path(os.fspath(f)) if isinstance(f, (str, os.PathLike)) else None
            if path is not None and path.resolve() == target / "optimizer.pt":
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                with open(path, "wb") as fh:
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                _kill()
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    elif opts.mode == "manifest":
        from trainguard.checks.checkpoint import manifest as manifest_module

        real_write = manifest_module.atomic_write_bytes

        def write_bytes(path: Any, data: bytes) -> None:
            if Path(path).resolve() == target / ckpt.MANIFEST_NAME:
                _kill()
            real_write(path, data)

        manifest_module.atomic_write_bytes = write_bytes  # type: ignore[assignment]
    else:
        extra.append(_Timer(opts.kill_step, opts.delay))

    trainer = make_trainer(
        opts.output_dir,
        callbacks=[trainguard.CheckpointVerifier(), *extra],
        max_steps=opts.kill_step + 50,
        save_strategy="steps",
        save_steps=1,
        logging_steps=100,
    )
    trainer.train()
    print("finished without being killed", flush=True)


if __name__ == "__main__":
    main()
