"""The rig itself works: tiny model, tokenizer and a real Trainer run, all offline."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from _rig import run_trainer


def test_tokenizer_is_trained_here_and_round_trips(tokenizer):
    ids = tokenizer("the run resumed")["input_ids"]
    assert ids
    assert tokenizer.decode(ids).replace(" ", "") == "therunresumed"


def test_real_trainer_runs_tiny_llama_for_the_requested_steps(output_dir: Path):
    _, output = run_trainer(output_dir, max_steps=3, save_strategy="steps", save_steps=3)
    assert output.global_step == 3
    assert (output_dir / "checkpoint-3" / "model.safetensors").is_file()


def test_tmpfs_helper_gives_a_disk_that_really_fills(tmpfs: Path):
    big = tmpfs / "fill"

    def fill() -> None:
        with open(big, "wb") as fh:
            for _ in range(16):
                fh.write(b"\0" * (1 << 20))
                fh.flush()
                os.fsync(fh.fileno())

    with pytest.raises(OSError, match="No space left") as info:
        fill()
    assert info.value.errno == errno.ENOSPC
