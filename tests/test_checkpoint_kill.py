"""A training process killed with SIGKILL during a save: the interrupted folder is never chosen, and a real resume
starts from the newest complete checkpoint."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

import trainguard
from trainguard.checks import checkpoint as ckpt

from _rig import TESTS_DIR, run_python, run_trainer

SCRIPT = TESTS_DIR / "scripts" / "checkpoint_kill_train.py"
KILL_STEP = 3


class _Began(TrainerCallback):
    def __init__(self) -> None:
        self.at: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.at = state.global_step


def _kill_during_save(out: Path, mode: str, delay: float = 0.0) -> None:
    result = run_python(str(SCRIPT), str(out), "--kill-step", str(KILL_STEP), "--mode", mode, "--delay", str(delay))
    assert result.returncode == -signal.SIGKILL, result.stdout[-2000:] + result.stderr[-4000:]


def _assert_resumes_from_newest_complete(out: Path, context: str) -> Path:
    chosen = trainguard.latest_verified_checkpoint(out)
    assert chosen is not None, context
    step = int(chosen.name.split("-")[1])
    assert step >= KILL_STEP - 1, context  # every save before the killed one completed
    report = trainguard.verify_checkpoint(chosen)
    assert report.mode == "manifest", context
    for folder in out.glob("checkpoint-*"):  # whatever is newer than the choice is not a complete checkpoint
        if int(folder.name.split("-")[1]) > step:
            assert not ckpt.check_checkpoint(folder).ok, context
    began = _Began()
    run_trainer(
        out,
        callbacks=[trainguard.CheckpointVerifier(), began],
        resume_from_checkpoint=True,
        max_steps=step + 1,
        save_strategy="steps",
        save_steps=1,
    )
    assert began.at == step, context
    return chosen


def test_killed_while_writing_optimizer_pt_the_half_written_folder_is_set_aside(tmp_path: Path):
    out = tmp_path / "run"
    _kill_during_save(out, "optimizer")
    killed = out / f"checkpoint-{KILL_STEP}"
    assert (killed / "optimizer.pt").stat().st_size > 0
    assert get_last_checkpoint(str(out)) == str(killed)  # what plain Trainer would load
    chosen = _assert_resumes_from_newest_complete(out, "optimizer")
    assert chosen.name == f"checkpoint-{KILL_STEP - 1}"
    assert list((out / ckpt.QUARANTINE_DIR).glob(f"checkpoint-{KILL_STEP}.*Z"))  # kept, not deleted


def test_killed_between_the_manifest_json_and_its_commit_marker_the_folder_is_not_chosen(tmp_path: Path):
    out = tmp_path / "run"
    _kill_during_save(out, "manifest")
    killed = out / f"checkpoint-{KILL_STEP}"
    assert (killed / ckpt.METADATA_NAME).is_file()
    assert not (killed / ckpt.MANIFEST_NAME).exists()
    assert (killed / "trainer_state.json").is_file()  # the Trainer's save itself had completed
    chosen = _assert_resumes_from_newest_complete(out, "manifest")
    assert chosen.name == f"checkpoint-{KILL_STEP - 1}"


@pytest.mark.parametrize("draw", [0, 1])
def test_killed_at_a_random_moment_during_a_save_the_run_resumes_from_the_newest_complete_checkpoint(
    tmp_path: Path, draw: int
):
    seed = int(os.environ.get("TRAINGUARD_TEST_SEED", random.randrange(1 << 30))) + draw
    delay = random.Random(seed).uniform(0.0, 0.12)  # a tiny checkpoint's save plus its hashing lasts about this long
    out = tmp_path / "run"
    _kill_during_save(out, "timer", delay)
    killed = out / f"checkpoint-{KILL_STEP}"
    context = (
        f"seed={seed} delay={delay:.4f}s; {killed.name}: "
        f"{sorted(p.name for p in killed.iterdir()) if killed.is_dir() else 'absent'}"
    )
    chosen = _assert_resumes_from_newest_complete(out, context)
    if killed.is_dir() and not (killed / ckpt.MANIFEST_NAME).exists():
        assert chosen != killed, context
