"""How fast checkpoint manifests are written and verified, against this machine's limit, against GNU sha256sum,
and what CheckpointVerifier costs a run that saves often.

    python benchmarks/bench_verify.py [--gib 1.0] [--steps 20] [--save-steps 2] [--skip-train] [--skip-hashing]

1. The limit: single-thread ``hashlib.sha256`` over an in-memory buffer × the cores (``os.cpu_count()``). Hashing
   cannot go faster than that however the files are split; one file hashes on one core at most.
2. A synthetic sharded checkpoint in a temporary folder (4 equal ``.safetensors`` shards + an ``optimizer.pt``-sized
   blob + small JSON files, ``--gib`` in total), hot in the page cache: ``write_manifest``, ``verify_checkpoint``
   with 1 thread and with the default pool, and ``sha256sum -c`` (GNU, single-threaded). Best of three.
3. A real Trainer run (a Llama of about 3.4M parameters: ~40 MiB per checkpoint with AdamW), ``--steps`` steps
   saving every ``--save-steps``: without the callback, with it (hashing in the background), and with
   ``background=False`` (hashing inside ``on_save``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import best_of, cpu_model

from trainguard.checks import checkpoint as ckpt


def single_thread_rate() -> float:
    data = os.urandom(256 << 20)
    seconds = best_of(lambda: hashlib.sha256(data).digest(), repeat=5)
    return len(data) / seconds


def parallel_memory_rate(threads: int) -> float:
    """Every core hashing its own in-memory buffer at once: the ceiling threads can reach here, files aside."""
    from concurrent.futures import ThreadPoolExecutor

    buffers = [os.urandom(128 << 20) for _ in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        seconds = best_of(lambda: list(pool.map(lambda b: hashlib.sha256(b).digest(), buffers)), repeat=5)
    return sum(len(b) for b in buffers) / seconds


def write_safetensors(path: Path, n_bytes: int) -> None:
    n = n_bytes // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, n * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        chunk = os.urandom(16 << 20)
        left = n * 4
        while left:
            fh.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))


def make_checkpoint(folder: Path, total: int) -> None:
    folder.mkdir(parents=True)
    shard = total // 6
    for i in range(4):
        write_safetensors(folder / f"model-{i + 1:05d}-of-00004.safetensors", shard)
    # A zip archive with one stored member, as torch.save writes: hashing cost does not depend on content.
    left = total - 4 * shard
    chunk = os.urandom(16 << 20)
    with (
        zipfile.ZipFile(folder / "optimizer.pt", "w", compression=zipfile.ZIP_STORED) as archive,
        archive.open("archive/data/0", "w", force_zip64=True) as member,
    ):
        while left > 0:
            member.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 100}))


def gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB/s"


def bench_hashing(total_gib: float) -> None:
    cores = os.cpu_count() or 1
    rate = single_thread_rate()
    print(f"machine: {cores} cores (os.cpu_count), {cpu_model()}, Python {platform.python_version()}")
    print(f"single-thread hashlib.sha256: {gib(rate)}; limit for {cores} cores: {gib(rate * cores)}")
    print(f"measured: {cores} threads hashing in-memory buffers at once: {gib(parallel_memory_rate(cores))}")
    with tempfile.TemporaryDirectory(prefix="trainguard-bench-") as tmp:
        folder = Path(tmp) / "checkpoint-100"
        make_checkpoint(folder, int(total_gib * (1 << 30)))
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"checkpoint: {size / (1 << 30):.2f} GiB in {len(list(folder.iterdir()))} files (page cache hot)")
        rows = [
            ("write_manifest (default pool)", best_of(lambda: ckpt.write_manifest(folder), repeat=5)),
            ("verify_checkpoint, 1 thread", best_of(lambda: ckpt.verify_checkpoint(folder, workers=1), repeat=5)),
            ("verify_checkpoint (default pool)", best_of(lambda: ckpt.verify_checkpoint(folder), repeat=5)),
        ]
        if shutil.which("sha256sum"):

            def gnu() -> None:
                subprocess.run(["sha256sum", "-c", "--quiet", ckpt.MANIFEST_NAME], cwd=folder, check=True)

            rows.append(("sha256sum -c (GNU, 1 thread)", best_of(gnu, repeat=3)))

        def structural_only() -> None:  # what runs before any hashing: listing, sizes, headers, JSON
            from trainguard.checks.checkpoint.formats import check_format
            from trainguard.checks.checkpoint.manifest import list_files

            files = list_files(folder)
            for name, n_bytes in files.items():
                check_format(folder / name, n_bytes, crc=False)

        structural = best_of(structural_only, repeat=3)
        for name, seconds in rows:
            throughput = size / seconds
            share = 100 * throughput / (rate * cores)
            print(f"  {name:<34} {seconds:7.3f} s  {gib(throughput):>12}  {share:5.1f}% of limit")
        print(f"  structural checks alone (sizes, headers, JSON; before any hashing) {structural * 1000:7.2f} ms")


def bench_training(steps: int, save_steps: int) -> None:
    import sys
    import threading

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import trainguard

    from _rig import make_lm_dataset, make_tiny_llama, make_trainer  # type: ignore[import-not-found]

    class TimedVerifier(trainguard.CheckpointVerifier):
        """Adds up the time the training thread spends inside the verifier (its events and its waits)."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(alert_sinks=[], **kwargs)
            self.blocked = 0.0
            self._depth = 0

        def _timed(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not threading.main_thread():
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.blocked += time.perf_counter() - start

        def on_save(self, *a: Any, **k: Any) -> Any:
            return self._timed(super().on_save, *a, **k)

        def before_save(self, *a: Any, **k: Any) -> Any:  # inside the Trainer's _save_checkpoint (lineage, marker)
            return self._timed(super().before_save, *a, **k)

        def after_save(self, *a: Any, **k: Any) -> Any:
            return self._timed(super().after_save, *a, **k)

        def on_step_end(self, *a: Any, **k: Any) -> Any:
            return self._timed(super().on_step_end, *a, **k)

        def on_train_end(self, *a: Any, **k: Any) -> Any:
            return self._timed(super().on_train_end, *a, **k)

        def wait(self) -> None:
            self._timed(super().wait)

    def run(verifier: TimedVerifier | None) -> tuple[float, int, float]:
        with tempfile.TemporaryDirectory(prefix="trainguard-bench-run-") as tmp:
            model = make_tiny_llama(
                hidden_size=256,
                intermediate_size=688,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=4,
            )
            trainer = make_trainer(
                tmp,
                model=model,
                train_dataset=make_lm_dataset(n_rows=256),
                callbacks=[verifier] if verifier is not None else [],
                max_steps=steps,
                save_strategy="steps",
                save_steps=save_steps,
                logging_steps=1000,
            )
            start = time.perf_counter()
            trainer.train()
            elapsed = time.perf_counter() - start
            folder = Path(tmp) / f"checkpoint-{save_steps}"
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            meta = folder / ckpt.METADATA_NAME
            hashing = json.loads(meta.read_text())["hash_seconds"] if meta.is_file() else 0.0
            return elapsed, size, hashing

    run(None)  # warm-up: imports, first allocation
    # Interleaved, best of three: the machine is shared, and the slowest runs measure the neighbours, not us.
    walls: dict[str, list[float]] = {"none": [], "background": [], "inline": []}
    blocked: dict[str, list[float]] = {"background": [], "inline": []}
    size, hashing = 0, 0.0
    for _ in range(3):
        walls["none"].append(run(None)[0])
        for key, background in (("background", True), ("inline", False)):
            verifier = TimedVerifier(background=background)
            elapsed, size, hashing = run(verifier)
            walls[key].append(elapsed)
            blocked[key].append(verifier.blocked)
    saves = steps // save_steps
    print(
        f"training: {steps} steps, a save every {save_steps} ({saves} saves of {size / (1 << 20):.1f} MiB; "
        f"hashing one took {hashing * 1000:.0f} ms in the last run)"
    )
    print(f"  without CheckpointVerifier       {min(walls['none']):7.2f} s wall (best of 3)")
    for key, label in (("background", "with it (background hashing)"), ("inline", "with it (background=False)")):
        per_save = min(blocked[key]) / saves * 1000
        print(f"  {label:<32} {min(walls[key]):7.2f} s wall; training thread blocked {per_save:6.1f} ms a save")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the synthetic checkpoint")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-hashing", action="store_true")
    opts = parser.parse_args()
    if not opts.skip_hashing:
        bench_hashing(opts.gib)
    if not opts.skip_train:
        bench_training(opts.steps, opts.save_steps)


if __name__ == "__main__":
    main()
