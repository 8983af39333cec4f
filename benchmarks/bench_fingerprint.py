"""How fast ``dataset_fingerprint`` reads data: in-memory Dataset, shuffled Dataset, JSONL file, list of rows.

    python benchmarks/bench_fingerprint.py [--rows 200000] [--seq-len 256]

The in-memory case is a tokenised LM set (``input_ids`` int32, ``attention_mask`` int8, ``labels`` int64,
``seq_len`` tokens a row) built from numpy, so the Arrow buffers are what a real tokenised set holds. Throughput is
the Arrow bytes (``table.nbytes``) or file bytes divided by the best of three wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from _common import best_of, cpu_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--seq-len", type=int, default=256)
    opts = parser.parse_args()

    import numpy as np
    import pyarrow as pa
    from datasets import Dataset

    from trainguard import dataset_fingerprint

    rng = np.random.default_rng(0)
    n, seq = opts.rows, opts.seq_len
    ids = rng.integers(4, 32000, size=n * seq, dtype=np.int32)
    offsets = pa.array(np.arange(0, n * seq + 1, seq, dtype=np.int32))
    table = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
            "attention_mask": pa.ListArray.from_arrays(offsets, pa.array(np.ones(n * seq, dtype=np.int8))),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(ids.astype(np.int64))),
        }
    )
    ds = Dataset(table)
    size = table.nbytes
    print(f"machine: {os.cpu_count()} CPU(s), {cpu_model()}")
    print(f"in-memory Dataset: {n} rows x {seq} tokens, {size / 1e9:.2f} GB of Arrow buffers")

    t = best_of(lambda: dataset_fingerprint(ds), repeat=3)
    print(f"  Dataset (in memory)        {t:7.3f} s  {size / t / 1e9:6.2f} GB/s")

    shuffled = ds.shuffle(seed=0)
    t = best_of(lambda: dataset_fingerprint(shuffled), repeat=1)
    print(f"  Dataset, shuffled (take)   {t:7.3f} s  {size / t / 1e9:6.2f} GB/s")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        small = min(n, 20_000)
        with open(path, "w") as fh:
            for row in table.slice(0, small).to_pylist():
                fh.write(json.dumps(row) + "\n")
        fsize = path.stat().st_size
        dataset_fingerprint(path)  # warm the page cache: measure hashing, not the disk
        t = best_of(lambda: dataset_fingerprint(path), repeat=3)
        print(f"  JSONL file (page cache)    {t:7.3f} s  {fsize / t / 1e9:6.2f} GB/s  ({fsize / 1e6:.0f} MB)")

        rows = table.slice(0, min(n, 5_000)).to_pylist()
        rbytes = table.slice(0, len(rows)).nbytes
        t = best_of(lambda: dataset_fingerprint(rows), repeat=1)
        rate = rbytes / t / 1e9
        print(f"  list of {len(rows)} row dicts    {t:7.3f} s  {rate:6.2f} GB/s (canonical JSON, slow path)")


if __name__ == "__main__":
    main()
