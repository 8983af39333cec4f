"""The failure gallery: each failure trainguard exists for, run against the plain Trainer and then with trainguard.

Every scenario runs for real on CPU (a tiny randomly initialised Llama, data made here, no network, each in its own
temporary folder): first with the plain ``transformers.Trainer``, then with the trainguard guard that covers it.
The script prints one row per failure: what the plain Trainer did, what trainguard did, and how long trainguard
took to detect it (from the start of the guarded call, or from the moment the fault was injected).

    python examples/failure_gallery.py            # a table (rich on a terminal, plain text otherwise)
    python examples/failure_gallery.py --json     # the rows as JSON on stdout
    python examples/failure_gallery.py --only nan,hang

Exit status: 0 when every row behaved as expected (plain Trainer fails as documented, trainguard catches it),
1 otherwise. The disk row needs root (it mounts a 3 MiB tmpfs); elsewhere it is reported as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch.utils.data import Dataset as TorchDataset  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import trainguard  # noqa: E402

HANG_WAIT_S = 6.0  # how long the plain run is watched after its step stalls
STALL_FETCH = 7  # 2 rows a step: the 7th fetch is step 4's batch, prefetched during step 3


@dataclass
class Row:
    key: str
    failure: str
    plain: str
    guard: str
    trainguard: str
    detect_s: float | None
    plain_as_documented: bool
    caught: bool
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is not None or (self.plain_as_documented and self.caught)


# --------------------------------------------------------------------------------------------- tiny model and data
def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config)


def rows(n: int, seed: int = 0, masked: bool = False) -> Dataset:
    rng = random.Random(seed)
    data = []
    for _ in range(n):
        ids = [rng.randrange(4, 128) for _ in range(16)]
        data.append({"input_ids": ids, "attention_mask": [1] * 16, "labels": [-100] * 16 if masked else ids})
    return Dataset.from_list(data)


def args_for(output_dir: Path, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 4,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(
    output_dir: Path,
    data: Any,
    callbacks: list[Any] | None = None,
    model: Any = None,
    **overrides: Any,
) -> Trainer:
    return Trainer(
        model=model if model is not None else tiny_model(),
        args=args_for(output_dir, **overrides),
        train_dataset=data,
        callbacks=callbacks or [],
    )


def checkpoints(output_dir: Path) -> list[str]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return [p.name for p in sorted(found, key=lambda p: int(p.name.split("-")[-1]))]


class StartStep(TrainerCallback):
    """Records the step training starts at (0 for a fresh run, N after loading checkpoint-N)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.step = state.global_step
        return control


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The error's class and first line; a line longer than ``limit`` ends at its last clause that fits, marked with
    an ellipsis, never in the middle of a word or a quoted value."""
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if len(text) <= limit:
        return text
    cut = max(text.rfind("; ", 0, limit), text.rfind(": ", 0, limit), text.rfind(", ", 0, limit))
    return (text[:cut] if cut > 0 else text[: text.rfind(" ", 0, limit)]) + " …"


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    box = [time.monotonic()]
    try:
        yield box
    finally:
        box[0] = time.monotonic() - box[0]


# ---------------------------------------------------------------------------------------------------- scenarios
def scenario_dataset(work: Path) -> Row:
    seed_dir = work / "seed"
    # One epoch on 32 rows, batch 4: 8 steps, checkpoints at 4 and 8 (DatasetGuard records the data's fingerprint).
    make_trainer(seed_dir, rows(32), [trainguard.DatasetGuard()], num_train_epochs=1).train()
    plain_dir, guard_dir = work / "plain", work / "guarded"
    shutil.copytree(seed_dir, plain_dir)
    shutil.copytree(seed_dir, guard_dir)

    start = StartStep()
    trainer = make_trainer(plain_dir, rows(16, seed=1), [start], num_train_epochs=1)
    output = trainer.train(resume_from_checkpoint=True)
    trained = output.global_step - (start.step or 0)
    plain = f"resumed at step {start.step}, trained {trained} steps on the new data, returned normally"
    plain_ok = trained == 0

    trainer = make_trainer(guard_dir, rows(16, seed=1), [trainguard.DatasetGuard()], num_train_epochs=1)
    with timer() as took:
        try:
            trainer.train(resume_from_checkpoint=True)
            result, caught = "resumed without a word", False
        except trainguard.DatasetMismatchError as err:
            caught = "fingerprint" in str(err)
            result = "DatasetMismatchError before step 1, naming both data fingerprints"
    return Row("dataset", "resume with a different dataset", plain, "DatasetGuard", result, took[0], plain_ok, caught)


def lora_trainer(output_dir: Path, lora_alpha: int, epochs: int, callbacks: list[Any]) -> Trainer:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=lora_alpha, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(tiny_model(), config)
    return make_trainer(output_dir, rows(32), callbacks, model=model, num_train_epochs=epochs)


def scenario_lora(work: Path) -> Row:
    seed_dir = work / "seed"
    lora_trainer(seed_dir, 16, 1, [trainguard.LoraConfigGuard()]).train()
    plain_dir, guard_dir = work / "plain", work / "guarded"
    shutil.copytree(seed_dir, plain_dir)
    shutil.copytree(seed_dir, guard_dir)

    start = StartStep()
    output = lora_trainer(plain_dir, 32, 2, [start]).train(resume_from_checkpoint=True)
    plain = (
        f"resumed at step {start.step} with lora_alpha 32 (checkpoint: 16), trained to step {output.global_step}, "
        "no warning"
    )
    plain_ok = bool(start.step) and output.global_step > (start.step or 0)

    trainer = lora_trainer(guard_dir, 32, 2, [trainguard.LoraConfigGuard()])
    with timer() as took:
        try:
            trainer.train(resume_from_checkpoint=True)
            result, caught = "resumed without a word", False
        except trainguard.LoraConfigMismatchError as err:
            caught = "lora_alpha: checkpoint 16, this run 32" in str(err)
            result = "LoraConfigMismatchError before loading: lora_alpha: checkpoint 16, this run 32"
    return Row(
        "lora", "resume a LoRA run with another lora_alpha", plain, "LoraConfigGuard", result, took[0], plain_ok, caught
    )


def _damaged_runs(work: Path, damage: Callable[[Path], None]) -> tuple[Path, Path]:
    seed_dir = work / "seed"
    # 4 steps, checkpoints at 2 and 4, each with a sha256 manifest written by CheckpointVerifier.
    make_trainer(seed_dir, rows(32), [trainguard.CheckpointVerifier()], max_steps=4, save_steps=2,
                 per_device_train_batch_size=2).train()  # fmt: skip
    damage(seed_dir / "checkpoint-4" / "model.safetensors")
    plain_dir, guard_dir = work / "plain", work / "guarded"
    shutil.copytree(seed_dir, plain_dir)
    shutil.copytree(seed_dir, guard_dir)
    return plain_dir, guard_dir


def _guarded_resume(guard_dir: Path) -> tuple[int | None, float]:
    start = StartStep()
    trainer = make_trainer(guard_dir, rows(32), [trainguard.CheckpointVerifier(), start], max_steps=6,
                           save_steps=2, per_device_train_batch_size=2)  # fmt: skip
    began = time.monotonic()
    detected: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            detected.append(time.monotonic() - began)
            return control

    trainer.add_callback(Clock())
    trainer.train(resume_from_checkpoint=True)
    return start.step, detected[0] if detected else time.monotonic() - began


def scenario_flipped_byte(work: Path) -> Row:
    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    plain_dir, guard_dir = _damaged_runs(work, flip)
    start = StartStep()
    make_trainer(plain_dir, rows(32), [start], max_steps=6, save_steps=2, per_device_train_batch_size=2).train(
        resume_from_checkpoint=True
    )
    plain = f"loaded the damaged checkpoint-4 (resumed at step {start.step}) without a word"
    plain_ok = start.step == 4

    step, took = _guarded_resume(guard_dir)
    quarantine = guard_dir / "trainguard-quarantine"
    set_aside = sorted(p.name for p in quarantine.iterdir()) if quarantine.is_dir() else []
    caught = step == 2 and any("checkpoint-4" in name for name in set_aside)
    result = f"set checkpoint-4 aside ({quarantine.name}/), resumed from checkpoint-{step}"
    return Row(
        "flipped_byte", "one flipped byte in the newest checkpoint", plain, "CheckpointVerifier", result, took,
        plain_ok, caught,
    )  # fmt: skip


def scenario_truncated(work: Path) -> Row:
    def truncate(path: Path) -> None:
        with path.open("r+b") as handle:
            handle.truncate(path.stat().st_size // 2)

    plain_dir, guard_dir = _damaged_runs(work, truncate)
    try:
        make_trainer(plain_dir, rows(32), [], max_steps=6, save_steps=2, per_device_train_batch_size=2).train(
            resume_from_checkpoint=True
        )
        plain, plain_ok = "resumed without an error", False
    except Exception as exc:
        plain, plain_ok = f"crashed: {first_line(exc)}", "Safetensor" in type(exc).__name__ or "safetensor" in str(exc)

    step, took = _guarded_resume(guard_dir)
    caught = step == 2
    result = f"set checkpoint-4 aside, resumed from the newest complete one (checkpoint-{step})"
    return Row(
        "truncated", "newest checkpoint truncated (killed mid-save)", plain, "CheckpointVerifier", result, took,
        plain_ok, caught,
    )  # fmt: skip


class PoisonAt(TrainerCallback):
    """At the start of step ``step`` (1-based), fill one weight with NaN: what an overflow does to parameters."""

    def __init__(self, step: int) -> None:
        self.step, self.at = step, 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                model.model.layers[0].self_attn.q_proj.weight.fill_(float("nan"))
            self.at = time.monotonic()
        return control


def _finite(checkpoint: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for t in load_file(str(checkpoint / "model.safetensors")).values())


def scenario_nan(work: Path) -> Row:
    k = 5
    plain_dir = work / "plain"
    trainer = make_trainer(plain_dir, rows(64), [PoisonAt(k)], max_steps=8, save_steps=2)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e and e.get("step", 0) > k]
    poisoned = [name for name in checkpoints(plain_dir) if not _finite(plain_dir / name)]
    plain = (
        f"trained on to step {trainer.state.global_step}, logged loss {sorted(set(losses))} after step {k}, "
        f"saved poisoned {poisoned}"
    )
    plain_ok = bool(poisoned) and trainer.state.global_step == 8

    guard_dir = work / "guarded"
    poison = PoisonAt(k)
    trainer = make_trainer(guard_dir, rows(64), [poison, trainguard.NanGuard()], max_steps=8, save_steps=2)
    try:
        trainer.train()
        result, caught, took = "trained on", False, None
    except trainguard.NonFiniteError as err:
        took = time.monotonic() - poison.at
        saved = checkpoints(guard_dir)
        clean = all(_finite(guard_dir / name) for name in saved)
        caught = trainer.state.global_step <= k + 1 and clean
        result = f"NonFiniteError at step {err.where.get('step', '?')}; saved only {saved}, all finite: {clean}"
    return Row("nan", f"parameters become NaN at step {k}", plain, "NanGuard", result, took, plain_ok, caught)


def stalled_data_loader(seconds: float, marker: Path | None = None) -> None:
    if marker is not None:
        marker.write_text(str(time.time()))
    time.sleep(seconds)  # stands in for a read from a filesystem that stopped answering


class StallOnce(TorchDataset[dict[str, torch.Tensor]]):
    def __init__(self, seconds: float, marker: Path | None = None) -> None:
        rng = random.Random(0)
        self.rows = [[rng.randrange(4, 128) for _ in range(16)] for _ in range(64)]
        self.seconds, self.marker, self.fetches, self.at = seconds, marker, 0, 0.0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.fetches += 1
        if self.fetches == STALL_FETCH:
            self.at = time.monotonic()
            stalled_data_loader(self.seconds, self.marker)
        ids = torch.tensor(self.rows[index])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def child_plain_hang(output_dir: Path, marker: Path) -> None:
    """The plain run of the hang row, in a child process (it never returns on its own)."""
    make_trainer(output_dir, StallOnce(3600, marker), [], max_steps=6, per_device_train_batch_size=2,
                 save_strategy="no", logging_steps=100).train()  # fmt: skip


def scenario_hang(work: Path) -> Row:
    from trainguard.checks.watchdog import find_dumps

    marker = work / "stalled"
    out, err = (work / "child.out").open("w+b"), (work / "child.err").open("w+b")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-plain-hang", str(work / "plain"), str(marker)]
    child = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not marker.exists():
            plain, plain_ok = f"did not reach the stall (exit {child.poll()})", False
        else:
            time.sleep(0.2)
            # The child writes straight into these files: unchanged sizes mean it printed nothing while stalled.
            sizes = (os.fstat(out.fileno()).st_size, os.fstat(err.fileno()).st_size)
            time.sleep(HANG_WAIT_S)
            after = (os.fstat(out.fileno()).st_size, os.fstat(err.fileno()).st_size)
            alive = child.poll() is None
            silent = after == sizes
            plain = f"still hanging after {HANG_WAIT_S:.0f} s, " + ("nothing printed" if silent else "printed output")
            if not alive:
                plain = f"exited with {child.returncode}"
            plain_ok = alive and silent
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, 9)
        child.wait()
        out.close()
        err.close()

    guard_dir = work / "guarded"
    data = StallOnce(8.0)
    # 3 s for a step (first step 60 s); real runs keep HangWatchdog() defaults: it learns the budget.
    watchdog = trainguard.HangWatchdog(timeout=3, first_step_timeout=60, check_interval=0.25)
    make_trainer(guard_dir, data, [watchdog], max_steps=6, per_device_train_batch_size=2, save_strategy="no",
                 logging_steps=100).train()  # fmt: skip
    # On a loaded machine an ordinary step may also overrun 3 s: judge the dump that caught the stall.
    dumps = [path for path in find_dumps(guard_dir) if "stalled_data_loader" in path.read_text()]
    if not dumps:
        return Row("hang", "a step hangs", plain, "HangWatchdog", "no dump names the stalled function", None,
                   plain_ok, False)  # fmt: skip
    took = dumps[0].stat().st_mtime - (time.time() - (time.monotonic() - data.at))
    result = f"dumped every thread's stack to {dumps[0].name}, naming stalled_data_loader(); alerted"
    return Row("hang", "a step hangs", plain, "HangWatchdog", result, max(took, 0.0), plain_ok, True)


def scenario_run_lock(work: Path) -> Row:
    output_dir = work / "run"
    output_dir.mkdir()
    holder_code = (
        "import sys, time\n"
        "from trainguard.checks.run_lock import acquire_run_lock\n"
        "handle = acquire_run_lock(sys.argv[1])\n"
        "print('locked', flush=True)\n"
        "time.sleep(300)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code, str(output_dir)], stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != "locked":
            raise RuntimeError("the lock-holding child did not start")
        trainer = make_trainer(output_dir, rows(32), [], max_steps=2, save_steps=2)
        trainer.train()
        written = checkpoints(output_dir)
        plain = f"wrote {written} into the folder a live run (PID {holder.pid}) holds, no warning"
        plain_ok = bool(written)

        with timer() as took:
            try:
                make_trainer(output_dir, rows(32), [trainguard.RunLock()], max_steps=2, save_steps=2)
                result, caught = "started anyway", False
            except trainguard.RunLockedError as err:
                caught = str(holder.pid) in str(err)
                result = f"RunLockedError at Trainer(...), naming the holder PID {holder.pid}"
    finally:
        holder.kill()
        holder.wait()
    return Row("run_lock", "two runs on one output_dir", plain, "RunLock", result, took[0], plain_ok, caught)


def scenario_reused_dir(work: Path) -> Row:
    def run_a(output_dir: Path, callbacks: list[Any]) -> None:
        # Run A: 8 steps, checkpoints at 4 and 8.
        make_trainer(output_dir, rows(32), callbacks, max_steps=8, save_steps=4, per_device_train_batch_size=2).train()

    run_a(work / "plain", [])
    a_files = {p.name: (p / "trainer_state.json").read_bytes() for p in (work / "plain").glob("checkpoint-*")}
    # Run B: a fresh start (a sweep, same data) into the same folder, keeping one checkpoint.
    make_trainer(work / "plain", rows(32), [], max_steps=4, save_steps=4, per_device_train_batch_size=2,
                 save_total_limit=1).train()  # fmt: skip
    left = checkpoints(work / "plain")
    # Rotation sorts by mtime (numerically when the spread is under 1 s): it deletes either A's checkpoint-8 or the
    # checkpoint B just saved into A's checkpoint-4 folder. Either way a run's checkpoint is gone without a word.
    if "checkpoint-8" not in left:
        plain = "run B saved into run A's checkpoint-4 folder, then its rotation deleted A's checkpoint-8, no warning"
    else:
        plain = (
            "run B saved into run A's checkpoint-4 folder, then its rotation deleted that new checkpoint and kept A's "
            "checkpoint-8 (a resume would continue run A), no warning"
        )
    plain_ok = len(left) == 1 and "checkpoint-4" in a_files

    run_a(work / "guarded", [trainguard.CheckpointVerifier()])
    trainer = make_trainer(work / "guarded", rows(32), trainguard.all_guards(), max_steps=4, save_steps=4,
                           per_device_train_batch_size=2, save_total_limit=1)  # fmt: skip
    with timer() as took:
        try:
            trainer.train()
            result, caught = "trained anyway", False
        except trainguard.LineageError as err:
            kept = checkpoints(work / "guarded") == ["checkpoint-4", "checkpoint-8"]
            caught = trainer.state.global_step == 0 and kept and "checkpoint-8" in err.what
            result = "LineageError before step 1, naming run A's checkpoint-4 and -8 (untouched) and the ways forward"
    return Row(
        "reused_dir", "a fresh run in an output_dir another run saved into", plain, "CheckpointVerifier", result,
        took[0], plain_ok, caught,
    )  # fmt: skip


def hollow_saves(model: Any, at_step: int) -> None:
    """Make the real save path write an empty embedding at ``at_step``, as ZeRO-3 without a 16-bit gather does."""
    original = model.save_pretrained

    def save_pretrained(*args: Any, **kwargs: Any) -> Any:
        if Path(args[0]).name == f"checkpoint-{at_step}":
            state = dict(kwargs.get("state_dict") or model.state_dict())
            state["model.embed_tokens.weight"] = torch.empty(0)
            kwargs["state_dict"] = state
        return original(*args, **kwargs)

    model.save_pretrained = save_pretrained


def scenario_hollow_save(work: Path) -> Row:
    from safetensors import safe_open

    plan = {"max_steps": 8, "save_steps": 4, "per_device_train_batch_size": 2}
    model = tiny_model()
    hollow_saves(model, 4)
    output = make_trainer(work / "plain", rows(32), [], model=model, **plan).train()
    with safe_open(str(work / "plain" / "checkpoint-4" / "model.safetensors"), "pt") as saved:
        shape = list(saved.get_slice("model.embed_tokens.weight").get_shape())
    plain = f"saved checkpoint-4 with model.embed_tokens.weight {shape}, trained on to step {output.global_step}"
    plain_ok = shape == [0] and output.global_step == 8

    model = tiny_model()
    hollow_saves(model, 4)
    trainer = make_trainer(work / "guarded", rows(32), [trainguard.CheckpointVerifier()], model=model, **plan)
    with timer() as took:
        try:
            trainer.train()
            result, caught = "trained on", False
        except trainguard.SaveAuditError as err:
            caught = trainer.state.global_step == 4 and "embed_tokens" in err.what
            result = "SaveAuditError at that save: model.embed_tokens.weight saved empty; not committed, run stopped"
    return Row(
        "hollow_save", "a save that writes an empty tensor (ZeRO-3 without a gather)", plain, "CheckpointVerifier",
        result, took[0], plain_ok, caught,
    )  # fmt: skip


def scenario_masked(work: Path) -> Row:
    trainer = make_trainer(work / "plain", rows(16, masked=True), [], max_steps=4, save_strategy="no")
    output = trainer.train()
    losses = sorted({round(float(e["loss"]), 4) for e in trainer.state.log_history if "loss" in e}, key=str)
    plain = f"trained {output.global_step} steps on rows with no labels, logged loss {losses}, no warning"
    plain_ok = output.global_step == 4

    trainer = make_trainer(work / "guarded", rows(16, masked=True), [trainguard.DataGuard()], max_steps=4,
                           save_strategy="no")  # fmt: skip
    with timer() as took:
        try:
            trainer.train()
            result, caught = "trained anyway", False
        except trainguard.DataValidationError as err:
            caught = trainer.state.global_step == 0 and "16 of 16" in err.what
            result = "DataValidationError before step 1: 16 of 16 rows have no supervised token"
    return Row("masked", "every label of the data masked (-100)", plain, "DataGuard", result, took[0], plain_ok, caught)


def scenario_disk(work: Path) -> Row:
    name = "checkpoints that cannot fit on the disk"
    disk = work / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True,
                             check=False)  # fmt: skip
    if mounted.returncode != 0:
        return Row("disk", name, "-", "PreflightGuard", "-", None, False, False, skipped="skipped: needs root")
    try:
        # 10 checkpoints of ~400 KiB (weights + AdamW state) on a 3 MiB disk.
        plan = {"max_steps": 20, "save_steps": 2, "per_device_train_batch_size": 2}
        try:
            make_trainer(disk / "plain", rows(32), [], **plan).train()
            plain, plain_ok = "finished (the disk was large enough)", False
        except Exception as exc:
            done = checkpoints(disk / "plain")
            # trainer_state.json is written last: without it the checkpoint is half-written
            partial = bool(done) and not (disk / "plain" / done[-1] / "trainer_state.json").exists()
            plain = f"crashed mid-save of {done[-1] if done else '?'}, leaving it half-written: {type(exc).__name__}"
            plain_ok = partial
        shutil.rmtree(disk / "plain", ignore_errors=True)
        trainer = make_trainer(disk / "guarded", rows(32), [trainguard.PreflightGuard(disk_margin_bytes=64 * 1024)],
                               **plan)  # fmt: skip
        with timer() as took:
            try:
                trainer.train()
                result, caught = "started anyway", False
            except trainguard.PreflightError as err:
                caught = trainer.state.global_step == 0
                need, free = err.evidence.get("needed_bytes", 0) / 2**20, err.evidence.get("free_bytes", 0) / 2**20
                result = f"PreflightError before step 1: checkpoints need {need:.1f} MiB, {free:.1f} MiB free"
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)
    return Row("disk", name, plain, "PreflightGuard", result, took[0], plain_ok, caught)


class OomInEval(TrainerCallback):
    """Raises CUDA's out-of-memory error from the first prediction step of the evaluation after ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.at = 0.0

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == self.step:
            self.at = time.monotonic()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (evaluation)")
        return control


def scenario_oom_eval(work: Path) -> Row:
    k = 6
    overrides = {"max_steps": 12, "save_steps": 100, "eval_strategy": "steps", "eval_steps": k}

    def trainer_for(output_dir: Path, callbacks: list[Any]) -> Trainer:
        return Trainer(model=tiny_model(), args=args_for(output_dir, **overrides), train_dataset=rows(64),
                       eval_dataset=rows(8, seed=1), callbacks=callbacks)  # fmt: skip

    plain_dir = work / "plain"
    try:
        trainer_for(plain_dir, [OomInEval(k)]).train()
        plain, plain_ok = "trained on", False
    except torch.OutOfMemoryError:
        saved = checkpoints(plain_dir)
        plain = f"OutOfMemoryError in evaluation after step {k}; checkpoints: {saved or 'none'}: {k} steps lost"
        plain_ok = not saved

    guard_dir = work / "guarded"
    oom, stop = OomInEval(k), trainguard.GracefulStop()
    trainer = trainer_for(guard_dir, [stop, trainguard.CheckpointVerifier(), oom])
    try:
        trainer.train()
        result, caught, took = "trained on", False, None
    except torch.OutOfMemoryError:
        took = time.monotonic() - oom.at
        saved = checkpoints(guard_dir)
        verified = saved == [f"checkpoint-{k}"] and trainguard.verify_checkpoint(guard_dir / saved[0]).ok
        caught = verified and stop.saved_on_error is not None
        result = (
            f"the same error, after saving {saved} (verified: {verified}); resume_from_checkpoint=True continues "
            f"at step {k}"
        )
    return Row("oom_eval", f"CUDA out of memory in evaluation after step {k}", plain, "GracefulStop", result, took,
               plain_ok, caught)  # fmt: skip


def gallery_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # show_progress=False: the Rust progress bar writes empty lines to stdout even when it is not a terminal.
    bpe = trainers.BpeTrainer(vocab_size=128, special_tokens=["<pad>", "<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["the model never stops when its eos token is wrong"] * 8, trainer=bpe)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def scenario_tokenizer(work: Path) -> Row:
    tok = gallery_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    seed_dir = work / "seed"
    # One epoch on 32 rows, batch 4: checkpoints at 4 and 8, each with the tokenizer and DatasetGuard's record of it.
    Trainer(model=tiny_model(), args=args_for(seed_dir, num_train_epochs=1), train_dataset=rows(32),
            processing_class=tok, callbacks=[trainguard.DatasetGuard()]).train()  # fmt: skip
    plain_dir, guard_dir = work / "plain", work / "guarded"
    shutil.copytree(seed_dir, plain_dir)
    shutil.copytree(seed_dir, guard_dir)
    changed = copy.deepcopy(tok)
    changed.eos_token = "<s>"  # the EOS left wrong (LlamaFactory #7454): the model learns to never stop

    start = StartStep()
    trainer = Trainer(model=tiny_model(), args=args_for(plain_dir, num_train_epochs=2), train_dataset=rows(32),
                      processing_class=changed, callbacks=[start])  # fmt: skip
    output = trainer.train(resume_from_checkpoint=True)
    plain_ok = start.step == 8 and output.global_step == 16
    plain = (
        f"resumed at step {start.step} with EOS '<s>' instead of '</s>', trained to step {output.global_step}, "
        "no warning"
    )

    guarded = Trainer(model=tiny_model(), args=args_for(guard_dir, num_train_epochs=2), train_dataset=rows(32),
                      processing_class=changed, callbacks=[trainguard.DatasetGuard()])  # fmt: skip
    caught, result = False, "resumed with the other tokenizer"
    with timer() as took:
        try:
            guarded.train(resume_from_checkpoint=True)
        except trainguard.TokenizerMismatchError as err:
            caught = err.where.get("field") == "eos_token" and guarded.state.global_step == 0
            result = first_line(err)
    return Row("tokenizer", "resume with another EOS token", plain, "DatasetGuard", result, took[0], plain_ok, caught)


def dead_adapter_trainer(output_dir: Path, callbacks: list[Any]) -> Trainer:
    """A LoRA run with gradient checkpointing (use_reentrant=True) and no input grads: what transformers 4.x gives a
    get_peft_model model (5.x enables input grads itself, so the call is made a no-op here to show the 4.x path)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj", "lm_head"], task_type="CAUSAL_LM")
    model = get_peft_model(tiny_model(), config)
    model.base_model.model.enable_input_require_grads = lambda: None
    return make_trainer(output_dir, rows(32), callbacks, model=model, max_steps=8, save_strategy="no",
                        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})  # fmt: skip


def scenario_dead_adapter(work: Path) -> Row:
    trainer = dead_adapter_trainer(work / "plain", [])
    output = trainer.train()
    dead = [n for n, p in trainer.model.named_parameters() if ".layers." in n and ".lora_B." in n and not p.any()]
    plain = f"trained {output.global_step} steps; {len(dead)} of 4 layer lora_B still exactly zero, no warning"
    plain_ok = output.global_step == 8 and len(dead) == 4

    trainer = dead_adapter_trainer(work / "guarded", [trainguard.AdapterGuard()])
    with timer() as took:
        try:
            trainer.train()
            result, caught = "trained anyway", False
        except trainguard.AdapterError as err:
            caught = trainer.state.global_step == 0 and "received no gradient at step 1" in err.what
            result = "AdapterError at step 1: 8 of 10 adapter parameters received no gradient (gradient checkpointing)"
    return Row("dead_adapter", "gradient checkpointing leaves the LoRA adapters without gradient", plain,
               "AdapterGuard", result, took[0], plain_ok, caught)  # fmt: skip


def spike_rows(poison: int) -> Dataset:
    """Rows of a token pattern the model learns fast, and one row of random high tokens: a poisoned batch."""
    rng = random.Random(0)
    data = []
    for i in range(80):
        offset = rng.randrange(8)
        ids = [4 + (offset + j) % 8 for j in range(16)]
        if i == poison:
            ids = [rng.randrange(100, 128) for _ in range(16)]
        data.append({"input_ids": ids, "attention_mask": [1] * 16, "labels": ids})
    return Dataset.from_list(data)


def scenario_loss_spike(work: Path) -> Row:
    poison, k = 60, 31  # 2 rows a step, in order: rows 60-61 are step 31's batch
    opts = {"max_steps": 34, "learning_rate": 3e-3, "per_device_train_batch_size": 2, "save_strategy": "no",
            "train_sampling_strategy": "sequential"}  # fmt: skip
    trainer = make_trainer(work / "plain", spike_rows(poison), [], **opts)
    trainer.train()
    norms = {h["step"]: h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h}
    plain = f"step {k}'s gradient norm jumps {norms[k] / norms[k - 1]:.1f}x, its update is applied, no warning"
    plain_ok = norms[k] > 3 * norms[k - 1]

    guard = trainguard.SpikeGuard(policy="skip", window=16, warmup=8)
    trainer = make_trainer(work / "guarded", spike_rows(poison), [guard], **opts)
    with timer() as took:
        trainer.train()
    alert = next((a for a in guard.alerter.history if a.guard == "spike_guard"), None)
    caught = guard.skipped_steps == [k] and alert is not None and poison in alert.evidence.get("dataset_indices", [])
    z = alert.evidence["z"] if alert is not None else float("nan")
    result = f"update of step {k} skipped (z = {z:.0f}), alert names train_dataset row {poison}"
    return Row("loss_spike", "a poisoned batch spikes the loss and gradient norm", plain, "SpikeGuard", result,
               took[0], plain_ok, caught)  # fmt: skip


SCENARIOS: dict[str, Callable[[Path], Row]] = {
    "dataset": scenario_dataset,
    "tokenizer": scenario_tokenizer,
    "lora": scenario_lora,
    "flipped_byte": scenario_flipped_byte,
    "truncated": scenario_truncated,
    "nan": scenario_nan,
    "hang": scenario_hang,
    "run_lock": scenario_run_lock,
    "reused_dir": scenario_reused_dir,
    "hollow_save": scenario_hollow_save,
    "masked": scenario_masked,
    "disk": scenario_disk,
    "oom_eval": scenario_oom_eval,
    "dead_adapter": scenario_dead_adapter,
    "loss_spike": scenario_loss_spike,
}


# ------------------------------------------------------------------------------------------------------ output
def run_all(keys: list[str], quiet: bool) -> list[Row]:
    results = []
    for key in keys:
        work = Path(tempfile.mkdtemp(prefix=f"trainguard-gallery-{key}-"))
        began = time.monotonic()
        sink = io.StringIO()
        try:
            # The Trainer prints its log dicts to stdout; keep stdout for the table (or the JSON).
            with contextlib.redirect_stdout(sink):
                row = SCENARIOS[key](work)
        except Exception as exc:
            row = Row(key, key, "-", "-", f"the scenario itself failed: {first_line(exc)}", None, False, False)
            if not quiet:
                traceback.print_exc()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if not quiet:
            print(f"  {key:<13} {'ok' if row.ok else 'NOT AS EXPECTED'} ({time.monotonic() - began:.1f} s)",
                  file=sys.stderr)  # fmt: skip
        results.append(row)
    return results


def _detect(row: Row) -> str:
    if row.skipped:
        return "-"
    if row.detect_s is None:
        return "-"
    return f"{row.detect_s * 1000:.0f} ms" if row.detect_s < 1 else f"{row.detect_s:.1f} s"


def print_table(results: list[Row]) -> None:
    headers = ("failure", "plain Trainer", "trainguard", "detected in", "as expected")
    table_rows = [
        (r.failure, r.skipped or r.plain, r.skipped or f"{r.guard}: {r.trainguard}", _detect(r),
         "skipped" if r.skipped else ("yes" if r.ok else "NO"))
        for r in results
    ]  # fmt: skip
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title="trainguard failure gallery", show_lines=True)
        for header in headers:
            table.add_column(header, overflow="fold")
        for values in table_rows:
            table.add_row(*values)
        Console().print(table)
        return
    for number, values in enumerate(table_rows, 1):
        print(f"{number}. {values[0]}")
        print(f"   plain Trainer: {values[1]}")
        print(f"   trainguard:    {values[2]}")
        print(f"   detected in:   {values[3]}    as expected: {values[4]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    parser.add_argument("--only", default="", help=f"comma-separated rows to run, of: {','.join(SCENARIOS)}")
    parser.add_argument("--verbose", action="store_true", help="show the Trainer's and the guards' logs")
    parser.add_argument("--child-plain-hang", nargs=2, metavar=("OUTPUT_DIR", "MARKER"), help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.child_plain_hang:
        child_plain_hang(Path(ns.child_plain_hang[0]), Path(ns.child_plain_hang[1]))
        return 0

    keys = [k.strip() for k in ns.only.split(",") if k.strip()] or list(SCENARIOS)
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; choose from {list(SCENARIOS)}")
    if not ns.verbose:
        warnings.filterwarnings("ignore")
        logging.disable(logging.CRITICAL)
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    if not ns.json:
        print(f"running {len(keys)} failure(s), each without and with trainguard (CPU, tiny Llama) ...",
              file=sys.stderr)  # fmt: skip
    results = run_all(keys, quiet=ns.json and not ns.verbose)
    if ns.json:
        print(json.dumps([{**asdict(r), "ok": r.ok} for r in results], indent=2))
    else:
        print_table(results)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
