"""How manifest writing and verification scale with the number of files in a checkpoint (issue #28, item 3).

    python benchmarks/bench_manifest_scale.py [--counts 2000,8000,20000] [--bytes 256]

A folder of ``count`` small files (``--bytes`` each, spread over 100 subfolders, as a sharded optimizer state is)
in a temporary folder, hot in the page cache. For each count: ``write_manifest`` (listing + hashing + the manifest
write), ``verify_checkpoint`` in manifest mode, and the reference ``find … -type f | xargs -P <cores> sha256sum``
on the same tree and cores. Prints seconds and microseconds per file: linear work shows as a flat per-file cost.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import cpu_model

from trainguard.checks import checkpoint as ckpt


def make_tree(root: Path, count: int, size: int) -> None:
    payload = os.urandom(size)
    for i in range(count):
        sub = root / f"shard-{i % 100:03d}"
        sub.mkdir(exist_ok=True)
        (sub / f"state-{i:07d}.bin").write_bytes(payload + i.to_bytes(8, "little"))
    (root / "trainer_state.json").write_text('{"global_step": 1}')


def timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def reference(root: Path) -> float:
    cores = str(os.cpu_count() or 1)
    cmd = f"find {root} -type f -print0 | xargs -0 -n 256 -P {cores} sha256sum > /dev/null"
    return timed(lambda: subprocess.run(cmd, shell=True, check=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", default="2000,8000,20000")
    parser.add_argument("--bytes", type=int, default=256)
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores")
    header = ("files", "manifest s", "us/file", "verify s", "us/file", "sha256sum s", "ratio")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (8, 11, 8, 9, 8, 12, 6), strict=True)))
    for count in (int(c) for c in args.counts.split(",")):
        root = Path(tempfile.mkdtemp(prefix="tg-scale-"))
        try:
            make_tree(root, count, args.bytes)
            write = timed(lambda folder=root: ckpt.write_manifest(folder))
            verify = timed(lambda folder=root: ckpt.verify_checkpoint(folder))
            ref = reference(root)
            print(
                f"{count:>8} {write:>11.2f} {write / count * 1e6:>8.0f} {verify:>9.2f} {verify / count * 1e6:>8.0f} "
                f"{ref:>12.2f} {write / ref:>6.1f}"
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
