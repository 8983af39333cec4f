"""GracefulStop: a termination signal finishes the step, saves a checkpoint and stops; a second one exits at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import trainguard
from trainguard.callbacks import GuardCallback
from trainguard.checks import crash_loop

from _probes import requires_jit
from _rig import REPO_ROOT, TESTS_DIR, run_python, run_trainer, subprocess_env

# Touches Trainer internals: recognising the JIT checkpoint's SIGTERM handler.
# Also run on the oldest supported releases (.ci/run).
pytestmark = pytest.mark.compat

SCRIPT = TESTS_DIR / "scripts" / "guarded_train.py"


def _has_verifier() -> bool:
    try:
        from trainguard.checks import checkpoint  # noqa: F401
    except ImportError:
        return False
    return True


def _start(output_dir: Path, progress: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(output_dir), "--max-steps", "100000", "--progress", str(progress), *extra],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(proc: subprocess.Popen[str], progress: Path, step: int) -> None:
    deadline = time.monotonic() + 240
    while True:
        text = progress.read_text() if progress.exists() else ""
        if text.split() and int(text.split()[-1]) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the child exited early: {proc.stderr.read()[-3000:] if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the child made no progress")
        time.sleep(0.05)


def _result(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout[-3000:]
    return dict(json.loads(lines[-1][len("RESULT ") :]))


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_of_that_step_and_exit_0(tmp_path: Path):
    output_dir, progress = tmp_path / "run", tmp_path / "progress"
    guards = "run_lock,crash_loop_guard,graceful_stop" + (",checkpoint_verifier" if _has_verifier() else "")
    proc = _start(output_dir, progress, "--guards", guards)
    _wait_for_step(proc, progress, 3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    result = _result(stdout)
    step = result["stopped_at_step"]
    assert result["stop_signal"] == "SIGTERM" and result["global_step"] == step >= 3
    # one checkpoint, of exactly the step it stopped after, complete, and the last one of the run
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == [f"checkpoint-{step}"]
    checkpoint = output_dir / f"checkpoint-{step}"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == step
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert int(progress.read_text().split()[-1]) == step  # no step ran after the stop
    if _has_verifier():
        from trainguard.checks.checkpoint import verify_checkpoint

        report = verify_checkpoint(checkpoint)  # raises CheckpointIntegrityError if anything is off
        assert report.mode == "manifest"  # CheckpointVerifier hashed it at on_save: the stop went the normal way
    # a graceful stop is a clean end: it never counts toward a crash loop
    assert [r.outcome for r in crash_loop.load_runs(output_dir)] == ["clean"]
    assert "SIGTERM received" in stderr


def test_a_second_signal_exits_at_once_with_128_plus_the_signal_and_is_not_counted_as_a_crash(tmp_path: Path):
    output_dir, progress = tmp_path / "run", tmp_path / "progress"
    # SIGUSR1 only, and slow steps, so that the second signal lands while the stop is still pending
    proc = _start(output_dir, progress, "--signals", "USR1", "--step-sleep", "3")
    _wait_for_step(proc, progress, 1)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, stderr[-3000:]
    assert "second signal SIGUSR1: exiting at once" in stderr
    assert "RESULT" not in stdout
    assert not list(output_dir.glob("checkpoint-*"))
    runs = crash_loop.load_runs(output_dir)
    assert [r.outcome for r in runs] == ["interrupted"]


class _SelfSignal(GuardCallback):
    guard_name = "self_signal"

    def __init__(self, at: int, signum: int = signal.SIGTERM) -> None:
        super().__init__(alert_sinks=[])
        self.at, self.signum = at, signum

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == self.at:
            os.kill(os.getpid(), self.signum)
        return control


def test_previous_handlers_are_restored_when_training_ends_and_when_it_raises(output_dir: Path):
    def mine(signum: int, frame: Any) -> None:
        pass

    previous = signal.signal(signal.SIGUSR1, mine)
    term = signal.getsignal(signal.SIGTERM)
    try:
        stop = trainguard.GracefulStop()
        run_trainer(output_dir, callbacks=[stop], max_steps=2)
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert signal.getsignal(signal.SIGTERM) == term

        class Boom(GuardCallback):
            guard_name = "boom"

            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
                raise RuntimeError("boom")

        stop = trainguard.GracefulStop()
        with pytest.raises(RuntimeError, match="boom"):
            run_trainer(output_dir, callbacks=[stop, Boom()], max_steps=2)
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert signal.getsignal(signal.SIGTERM) == term
    finally:
        signal.signal(signal.SIGUSR1, previous)


@requires_jit
def test_with_jit_checkpoint_enabled_the_stop_saves_once_through_on_save(output_dir: Path):
    saves: list[int] = []

    class SeeSaves(GuardCallback):
        guard_name = "see_saves"

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            saves.append(state.global_step)
            return control

    term = signal.getsignal(signal.SIGTERM)
    stop = trainguard.GracefulStop()
    _trainer, output = run_trainer(
        output_dir, callbacks=[stop, _SelfSignal(at=2), SeeSaves()], max_steps=50, enable_jit_checkpoint=True
    )
    # transformers' JIT handler would wait 3 s on a timer, save without on_save (so unverified) and go on a step
    assert output.global_step == 3 == stop.stopped_at_step
    assert saves == [3]
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-3"]
    assert signal.getsignal(signal.SIGTERM) == term  # the JIT callback restored its original


def test_a_stop_skips_the_scheduled_evaluation_and_still_saves_with_save_strategy_best(output_dir: Path):
    from _rig import make_lm_dataset

    stop = trainguard.GracefulStop()
    trainer, output = run_trainer(
        output_dir,
        callbacks=[stop, _SelfSignal(at=1)],
        max_steps=50,
        eval_dataset=make_lm_dataset(8, seed=1),
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="best",
        metric_for_best_model="loss",
    )
    assert output.global_step == 2
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not [e for e in trainer.state.log_history if "eval_loss" in e]


def test_signal_names_are_accepted_and_bad_ones_refused():
    assert trainguard.GracefulStop(signals=["TERM", "SIGUSR2", signal.SIGINT]).signals == (
        signal.SIGTERM,
        signal.SIGUSR2,
        signal.SIGINT,
    )
    with pytest.raises(ValueError, match="unknown signal"):
        trainguard.GracefulStop(signals=["SIGNOPE"])
    with pytest.raises(ValueError, match="sync_every"):
        trainguard.GracefulStop(sync_every=0)


def test_graceful_stop_example_runs_and_stops_with_a_checkpoint(tmp_path: Path):
    result = run_python(str(REPO_ROOT / "examples" / "graceful_stop.py"), str(tmp_path / "run"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped by SIGTERM after step" in result.stdout
    assert "resumed from checkpoint" in result.stdout
