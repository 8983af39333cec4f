"""What SpikeGuard costs a step, and what a spike costs when it happens.

    python benchmarks/bench_spike_guard.py [--rows 100000]

Per step, driven through the guard's own hooks and events on one process (CPU: every value is already on the host):
the loss hook (every micro-batch), the grad-norm hook, and ``on_pre_optimizer_step`` (the z-scores over a full
128-step window and the decision). Per spike (rare): the batch's sample ids and the search of ``train_dataset`` for
them (``--rows`` rows of 512 tokens), which runs only when a step is a spike.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from types import SimpleNamespace

from _common import cpu_model, per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    opts = parser.parse_args()

    import torch

    from trainguard.callbacks.spike_guard import SpikeGuard
    from trainguard.checks.spike import SpikeDetector, dataset_indices, row_digest, rows_of

    print(f"machine: {os.cpu_count()} CPU(s), {cpu_model()}; torch {torch.__version__}")
    guard = SpikeGuard(alert_sinks=[])
    guard._hooked = True
    args, control = SimpleNamespace(), SimpleNamespace()
    state = SimpleNamespace(global_step=0)
    rng = random.Random(0)
    loss = torch.tensor(2.0)
    batch = {"input_ids": torch.randint(0, 32000, (8, 512)), "attention_mask": torch.ones(8, 512, dtype=torch.long)}

    def step() -> None:
        guard._before_step((None, batch), {})
        guard._on_loss(loss, (), {})
        guard._on_grad_norm(1.0 + 0.01 * rng.random())
        state.global_step += 1
        guard.on_pre_optimizer_step(args, state, control, optimizer=None)

    for _ in range(200):  # a full window, past warmup: every step is judged
        step()
    t = per_call(step, 2000)
    print(f"  a whole step: loss hook + grad-norm hook + judgement (window 128)   {t * 1e6:8.1f} us")
    t = per_call(lambda: guard._on_loss(loss, (), {}), 20000)
    guard._losses = []
    print(f"  loss hook alone (a CPU tensor: one float read)                      {t * 1e6:8.1f} us a micro-batch")
    detector = SpikeDetector()
    for i in range(128):
        detector.add(i, loss=2.0 + 0.01 * (i % 7), grad_norm=1.0 + 0.01 * (i % 5))
    t = per_call(lambda: detector.score("loss", 2.0), 20000)
    print(f"  z-score of one metric over 128 values                               {t * 1e6:8.1f} us")

    from datasets import Dataset

    print(f"building a dataset of {opts.rows} rows of 512 tokens ...")
    ids = [[rng.randrange(32000) for _ in range(512)] for _ in range(1000)]
    data = Dataset.from_dict({"input_ids": [ids[i % 1000] for i in range(opts.rows)]})
    start = time.perf_counter()
    rows = rows_of(batch["input_ids"], batch["attention_mask"])
    digests = [row_digest(r) for r in rows]
    took = time.perf_counter() - start
    print(f"  sample ids of an 8 x 512 batch (at a spike only)                    {took * 1e3:8.2f} ms")
    start = time.perf_counter()
    dataset_indices(digests, data, limit=opts.rows, rows=rows)
    took = time.perf_counter() - start
    print(f"  searching {opts.rows} rows for them (at a spike only)               {took:8.2f} s")
    start = time.perf_counter()
    dataset_indices(digests, data, limit=opts.rows)
    took = time.perf_counter() - start
    print(f"  the same, hashing every row (no length/first-token filter)          {took:8.2f} s")


if __name__ == "__main__":
    main()
