"""Verification split over ranks: the time to hash one checkpoint's files with 1, 2 and 4 ranks.

    python benchmarks/bench_split_verify.py [--size-mb 1024] [--files 16] [--ranks 1,2,4]

Writes a synthetic checkpoint (``--files`` files of random bytes, ``--size-mb`` in all, the sizes uneven like
shards and optimizer states), then for each world size runs a real torchrun job (gloo) in which every rank hashes
its share (``split.partition`` + ``split.hash_share``, what CheckpointVerifier does at a save and on resume) and the
shares are gathered on rank 0. Each job hashes twice and keeps the second (page cache warm: the cost measured is
hashing, not the disk). Prints seconds per world size and the speed-up over one rank.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(folder: Path, size_mb: int, files: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    weights = [files - i for i in range(files)]  # uneven: the first file is the largest
    total = size_mb << 20
    for i, w in enumerate(weights):
        (folder / f"shard-{i:03d}.bin").write_bytes(os.urandom(total * w // sum(weights)))


def worker(folder: Path, out: Path) -> None:
    import torch.distributed as dist

    from trainguard import distributed

    dist.init_process_group("gloo")
    from trainguard.checks.checkpoint import split
    from trainguard.checks.checkpoint.manifest import list_files

    sizes = list_files(folder)
    mine = split.partition(sizes, distributed.world_size())[distributed.rank()]
    timings = []
    for _ in range(2):
        distributed.barrier()
        start = time.perf_counter()
        own = split.hash_share(folder, mine, workers=1, fsync=False)
        shares = distributed.gather_object(own)
        timings.append(time.perf_counter() - start)
    if distributed.is_main_process():
        assert sum(len(s) for s in shares) == len(sizes)
        out.write_text(json.dumps({"seconds": timings[-1], "files": len(sizes), "bytes": sum(sizes.values())}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "OUT"))
    opts = parser.parse_args()
    if opts.worker:
        worker(Path(opts.worker[0]), Path(opts.worker[1]))
        return
    with tempfile.TemporaryDirectory(prefix="trainguard-bench-split-") as tmp:
        folder = Path(tmp) / "checkpoint-1"
        make_checkpoint(folder, opts.size_mb, opts.files)
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
        results = {}
        for ranks in (int(r) for r in opts.ranks.split(",")):
            out = Path(tmp) / f"result-{ranks}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone",
                   __file__, "--worker", str(folder), str(out)]  # fmt: skip
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            results[ranks] = json.loads(out.read_text())
        base = results[min(results)]["seconds"]
        total = results[min(results)]["bytes"] / 2**20
        print(f"{total:.0f} MiB in {opts.files} files, {os.cpu_count()} CPUs")
        for ranks, r in results.items():
            speed, gain = total / r["seconds"], base / r["seconds"]
            print(f"{ranks} rank(s): {r['seconds']:.2f} s ({speed:.0f} MiB/s), x{gain:.2f}")


if __name__ == "__main__":
    main()
