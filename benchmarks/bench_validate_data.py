"""Benchmark ``validate_data`` on a generated 1M-row prompt/completion JSONL (deleted afterwards).

1. Without a tokenizer, against a plain ``json.loads`` loop over the same lines (goal: within 2x).
2. With the test tokenizer (the rig's BPE tokenizer, trained here), against that tokenizer's own batched
   throughput on the already-parsed texts, ``tokenizer(batch)`` in batches of 1000 (goal: at least 0.8x).

    python benchmarks/bench_validate_data.py [--rows N]

Prints rows/s for each and the ratios; record the figures in docs/benchmarks.md with the machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from trainguard.checks.data import validate_data

WORDS = [
    "the",
    "run",
    "resumed",
    "from",
    "newest",
    "verified",
    "checkpoint",
    "a",
    "flipped",
    "byte",
    "in",
    "optimizer",
    "state",
    "is",
    "caught",
    "before",
    "loading",
    "loss",
    "became",
    "nan",
    "at",
    "step",
    "seven",
    "and",
    "guard",
    "stopped",
    "two",
    "runs",
    "on",
    "one",
    "output",
    "directory",
    "would",
    "overwrite",
    "each",
    "other",
    "watchdog",
    "dumped",
    "every",
    "thread",
    "when",
    "hung",
    "lora",
    "alpha",
    "changed",
    "between",
    "config",
    "dataset",
    "size",
    "so",
    "resume",
    "train",
    "nothing",
]


def generate(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(6, 24))) + f" #{i}"
            completion = " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))
            fh.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def plain_json_loop(path: Path) -> float:
    started = time.perf_counter()
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            json.loads(line)
    return time.perf_counter() - started


def tokenizer_alone(path: Path, tokenizer: object, batch: int = 1000) -> tuple[float, int]:
    with open(path, encoding="utf-8") as fh:
        texts = [(r := json.loads(line))["prompt"] + r["completion"] for line in fh]
    started = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), batch):
        ids = tokenizer(texts[i : i + batch])["input_ids"]  # type: ignore[operator]
        tokens += sum(len(x) for x in ids)
    return time.perf_counter() - started, tokens


def timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    gc.collect()
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs; the best of each is reported")
    parser.add_argument("--repeat-tokenizer", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    folder = Path(tempfile.mkdtemp(prefix="trainguard-bench-"))
    try:
        path = folder / "train.jsonl"
        generate(path, args.rows)
        size_mb = path.stat().st_size / 1e6
        print(
            f"{args.rows} rows, {size_mb:.0f} MB, python {sys.version.split()[0]}, {os.cpu_count()} CPU(s); "
            f"best of {args.repeat} / {args.repeat_tokenizer} interleaved runs"
        )

        # Interleaved, so that load from other processes on a shared machine hits both sides alike.
        base_times, ours_times = [], []
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(args.repeat):
            base_times.append(plain_json_loop(path))
            report, elapsed = timed(validate_data, path, progress=False)
            ours_times.append(elapsed)
            assert report.stats["valid_rows"] == args.rows, report
        rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        baseline, ours = min(base_times), min(ours_times)
        print(f"json.loads loop:             {baseline:6.2f} s  {args.rows / baseline:>10,.0f} rows/s")
        print(
            f"validate_data, no tokenizer: {ours:6.2f} s  {args.rows / ours:>10,.0f} rows/s  "
            f"ratio {ours / baseline:.2f}x (goal <= 2x); peak RSS growth {rss:.0f} MB"
        )

        if args.repeat_tokenizer < 1:
            return
        from _rig import make_tokenizer

        tok = make_tokenizer()
        alone_times, with_times = [], []
        tokens = 0
        for _ in range(args.repeat_tokenizer):
            elapsed, tokens = tokenizer_alone(path, tok)
            alone_times.append(elapsed)
            report, elapsed = timed(validate_data, path, tokenizer=tok, max_length=64, progress=False)
            with_times.append(elapsed)
            assert report.stats["tokens"]["tokenized_rows"] == args.rows
        alone, with_tok = min(alone_times), min(with_times)
        print(
            f"tokenizer(batch) alone:      {alone:6.2f} s  {args.rows / alone:>10,.0f} rows/s  "
            f"({tokens / alone:,.0f} tokens/s)"
        )
        print(
            f"validate_data + tokenizer:   {with_tok:6.2f} s  {args.rows / with_tok:>10,.0f} rows/s  "
            f"throughput {alone / with_tok:.2f}x of the tokenizer alone (goal >= 0.8x)"
        )
        st = report.stats["tokens"]
        print(
            f"token lengths p50/p99/max: {st['p50']}/{st['p99']}/{st['max']}; "
            f"over max_length=64: {st['over_max_length']}, answer cut off: {st['answer_cut_off']}"
        )
        print(
            "all runs (s): json",
            [round(t, 2) for t in base_times],
            "ours",
            [round(t, 2) for t in ours_times],
            "tokenizer",
            [round(t, 2) for t in alone_times],
            "ours+tok",
            [round(t, 2) for t in with_times],
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
