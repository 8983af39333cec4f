"""Crash loops: abnormal ends are recorded; the same failure at the same step N times in a row refuses the next
start, and for CUDA OOM proposes (or applies) half the batch with twice the accumulation."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import trainguard
from trainguard.callbacks import GuardCallback
from trainguard.checks import crash_loop as cl

from _rig import TESTS_DIR, make_tiny_llama, make_trainer, run_trainer, subprocess_env

# Touches Trainer internals (the batch-size copy the OOM fix changes): also run on the oldest supported releases.
pytestmark = pytest.mark.compat

SCRIPT = TESTS_DIR / "scripts" / "guarded_train.py"


class _FakeOom(GuardCallback):
    """Raises a CUDA OOM at ``step`` while the per-device batch is above ``over`` (as a real one would)."""

    guard_name = "fake_oom"

    def __init__(self, step: int = 2, over: int = 2) -> None:
        super().__init__(alert_sinks=[])
        self.step, self.over = step, over

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == self.step and args.per_device_train_batch_size > self.over:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return control


@pytest.fixture(scope="module")
def three_ooms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output_dir after three real runs (child processes) that each died of a CUDA OOM in step 3 (raised at its
    on_step_begin, when two steps were done)."""
    output_dir = tmp_path_factory.mktemp("ooms") / "run"
    for _ in range(3):
        result = subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                str(output_dir),
                "--max-steps",
                "6",
                "--batch",
                "4",
                "--oom-at",
                "2",
                "--oom-over",
                "2",
            ],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 1, result.stderr[-3000:]
        assert "torch.OutOfMemoryError: CUDA out of memory" in result.stderr
    return output_dir


@pytest.fixture
def looped(three_ooms: Path, tmp_path: Path) -> Path:
    """A private copy of the three-OOM output_dir (tests must not see each other's starts)."""
    target = tmp_path / "run"
    shutil.copytree(three_ooms, target)
    return target


def test_each_abnormal_end_is_recorded_with_step_type_message_time_host_and_rank(looped: Path):
    records = [json.loads(line) for line in (looped / cl.CRASH_LOG).read_text().splitlines()]
    failures = [r for r in records if r["event"] == "failure"]
    assert len(failures) == 3 and len([r for r in records if r["event"] == "start"]) == 3
    for record in failures:
        assert record["step"] == 3  # the step being trained: the OOM came in its on_step_begin
        assert record["exception"] == "torch.OutOfMemoryError"
        assert record["message"].startswith("CUDA out of memory")
        assert record["oom"] is True and record["rank"] == 0
        assert record["utc"].endswith("Z") and record["host"]


def test_the_fourth_start_after_three_identical_ooms_is_refused_with_the_batch_advice(looped: Path):
    guard = trainguard.CrashLoopGuard()
    trainer = make_trainer(looped, callbacks=[guard, _FakeOom()], max_steps=6, per_device_train_batch_size=4)
    with pytest.raises(trainguard.PreflightError) as info:
        trainer.train()
    err = info.value
    assert "the last 3 runs in a row ended with torch.OutOfMemoryError at step 3" in err.what
    assert err.where == {"file": str(looped / cl.CRASH_LOG), "step": 3}
    assert "per_device_train_batch_size=2 and gradient_accumulation_steps=2 (was 4 and 1" in err.next_step
    assert trainer.state.global_step == 0
    # a refused start is not a run: the streak is still three
    assert len(cl.load_runs(looped)) == 3


def test_with_apply_oom_fix_the_fourth_start_trains_with_half_the_batch_and_twice_the_accumulation(looped: Path):
    guard = trainguard.CrashLoopGuard(apply_oom_fix=True)
    trainer, output = run_trainer(looped, callbacks=[guard, _FakeOom()], max_steps=6, per_device_train_batch_size=4)
    assert output.global_step == 6
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (2, 2)
    assert trainer.state.train_batch_size == 2
    args = trainer.args  # the global batch is what the user asked for
    assert args.train_batch_size * args.gradient_accumulation_steps * args.world_size == 4
    assert guard.applied_fix is not None and "4->2" in guard.summary()
    assert any("applied the OOM fix" in a.message for a in guard.alerter.history)
    runs = cl.load_runs(looped)
    assert runs[-1].outcome == "clean"
    assert runs[-1].start["batch"]["per_device_train_batch_size"] == 2
    # the clean end cleared the streak: the next start is not refused
    run_trainer(looped, callbacks=[trainguard.CrashLoopGuard()], max_steps=1, per_device_train_batch_size=4)


def test_repeated_ooms_after_an_applied_fix_keep_halving(tmp_path: Path):
    output_dir = tmp_path / "run"
    for i in range(3):  # three runs that already ran at the fixed (2, 2) and still died at step 5
        cl.record_start(
            output_dir,
            run_id=f"r{i}",
            step=0,
            batch={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
        )
        cl.record_failure(output_dir, run_id=f"r{i}", step=5, exc=torch.cuda.OutOfMemoryError("CUDA out of memory"))
    trainer, _ = run_trainer(
        output_dir,
        callbacks=[trainguard.CrashLoopGuard(apply_oom_fix=True)],
        max_steps=1,
        per_device_train_batch_size=4,
    )
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (1, 4)


def _failures(output_dir: Path, specs: list[tuple[str, int, BaseException | str]]) -> None:
    for i, (_, step, what) in enumerate(specs):
        run_id = f"run{i}"
        cl.record_start(
            output_dir,
            run_id=run_id,
            step=0,
            batch={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1},
        )
        if what == "clean":
            cl.record_end(output_dir, run_id=run_id, step=step)
        elif what == "interrupted":
            cl.record_end(output_dir, run_id=run_id, step=step, status="interrupted")
        elif isinstance(what, BaseException):
            cl.record_failure(output_dir, run_id=run_id, step=step, exc=what)


def test_a_clean_end_breaks_the_streak_and_an_interruption_does_not(tmp_path: Path):
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory")
    a = tmp_path / "a"
    _failures(a, [("", 2, oom), ("", 2, oom), ("", 9, "clean"), ("", 2, oom)])
    assert cl.find_crash_loop(a) is None
    b = tmp_path / "b"
    _failures(b, [("", 2, oom), ("", 2, oom), ("", 3, "interrupted"), ("", 2, oom)])
    loop = cl.find_crash_loop(b)
    assert loop is not None and loop.count == 3 and loop.oom
    with pytest.raises(trainguard.PreflightError, match="at step 2"):
        cl.check_crash_loop(b, per_device_train_batch_size=4, gradient_accumulation_steps=1)


def test_other_steps_or_other_exceptions_are_not_a_loop(tmp_path: Path):
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory")
    a = tmp_path / "a"
    _failures(a, [("", 2, oom), ("", 3, oom), ("", 2, oom)])
    assert cl.find_crash_loop(a) is None
    b = tmp_path / "b"
    _failures(b, [("", 2, oom), ("", 2, ValueError("bad row")), ("", 2, oom)])
    assert cl.find_crash_loop(b) is None
    assert cl.find_crash_loop(b, max_repeats=1) is not None


def test_deaths_without_a_record_count_as_unknown_failures_at_their_start_step(tmp_path: Path):
    output_dir = tmp_path / "run"
    for i in range(3):  # SIGKILLed (OOM killer) each time: a start and nothing else, on a host that is gone
        cl.record_start(output_dir, run_id=f"k{i}", step=50, extra={"host": "node-that-died"})
    runs = cl.load_runs(output_dir)
    assert [r.outcome for r in runs] == ["unknown"] * 3
    with pytest.raises(trainguard.PreflightError) as info:
        cl.check_crash_loop(output_dir)
    assert "died without a record" in info.value.what and "started from step 50" in info.value.what
    assert "out-of-memory" not in info.value.next_step


def test_an_oom_that_cannot_be_halved_says_what_else_to_do(tmp_path: Path):
    output_dir = tmp_path / "run"
    oom = RuntimeError("CUDA error: out of memory")  # older torch and other backends say it this way
    _failures(output_dir, [("", 4, oom)] * 3)
    with pytest.raises(trainguard.PreflightError) as info:
        cl.check_crash_loop(output_dir, per_device_train_batch_size=1, gradient_accumulation_steps=8)
    assert "cannot be halved evenly" in info.value.next_step
    assert "gradient checkpointing" in info.value.next_step
    assert cl.oom_fix(1, 8) is None and cl.oom_fix(3, 1) is None and cl.oom_fix(8, 3) == (4, 6)


def test_malformed_lines_are_skipped_and_named_with_file_and_line(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    output_dir = tmp_path / "run"
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory")
    _failures(output_dir, [("", 2, oom)] * 2)
    log = output_dir / cl.CRASH_LOG
    lines = log.read_text().splitlines()
    lines.insert(1, '{"event": "start", "run_id": 12')  # torn
    lines.insert(3, '["not", "a", "record"]')  # wrong type
    log.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        runs = cl.load_runs(output_dir)
    assert [r.outcome for r in runs] == ["failed", "failed"]
    assert f"{log}: skipped 2 malformed line(s) (line 2, 4)" in caplog.text


def test_ctrl_c_is_recorded_as_an_interruption_not_a_crash(output_dir: Path):
    class CtrlC(GuardCallback):
        guard_name = "ctrl_c"

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step == 1:
                raise KeyboardInterrupt
            return control

    with pytest.raises(KeyboardInterrupt):
        run_trainer(output_dir, callbacks=[trainguard.CrashLoopGuard(), CtrlC()], max_steps=4)
    assert [r.outcome for r in cl.load_runs(output_dir)] == ["interrupted"]


def test_max_repeats_none_records_but_never_refuses(looped: Path):
    run_trainer(
        looped, callbacks=[trainguard.CrashLoopGuard(max_repeats=None)], max_steps=1, per_device_train_batch_size=4
    )
    assert [r.outcome for r in cl.load_runs(looped)] == ["failed"] * 3 + ["clean"]
    with pytest.raises(ValueError, match="max_repeats"):
        trainguard.CrashLoopGuard(max_repeats=-1)


def test_the_train_error_hook_sees_the_exception_and_it_propagates_unchanged(output_dir: Path):
    seen: list[BaseException] = []

    class Watch(GuardCallback):
        guard_name = "watch"

        def on_train_error(self, trainer: Any, exc: BaseException) -> None:
            seen.append(exc)
            raise RuntimeError("a broken hook must not hide the training error")

    boom = ValueError("the real error")

    class Boom(GuardCallback):
        guard_name = "boom"

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            raise boom

    with pytest.raises(ValueError, match="the real error") as info:
        run_trainer(output_dir, callbacks=[Watch(), Boom()], max_steps=2)
    assert info.value is boom
    assert seen == [boom]


def test_oom_errors_are_recognised_without_importing_torch_by_name():
    assert cl.is_oom(torch.cuda.OutOfMemoryError("x"))
    assert cl.is_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert not cl.is_oom(ValueError("out of memory"))
    assert not cl.is_oom(RuntimeError("size mismatch"))


def test_a_failure_is_reported_at_the_step_being_trained_the_same_step_nan_guard_names(output_dir: Path):
    from test_nan_guard import nan_forward

    ga = 4
    model = make_tiny_llama()
    nan_forward(model, {2 * ga + 2})  # micro-batch 2 of 4 of step 3
    guards = [trainguard.NanGuard(alert_sinks=[]), trainguard.CrashLoopGuard()]
    trainer = make_trainer(output_dir, model=model, callbacks=guards, max_steps=6, gradient_accumulation_steps=ga)
    with pytest.raises(trainguard.NonFiniteError) as caught:
        trainer.train()
    assert caught.value.where["step"] == 3
    (run,) = cl.load_runs(output_dir)
    assert run.outcome == "failed" and [f["step"] for f in run.failures] == [3]


@pytest.mark.parametrize(("in_step", "expected"), [(True, 5), (False, 4)])
def test_an_error_without_a_step_of_its_own_is_placed_by_where_the_trainer_was(in_step: bool, expected: int):
    assert cl.failing_step(RuntimeError("boom"), 4, in_step=in_step) == expected
    named = trainguard.NonFiniteError("x", where={"step": 7})
    assert cl.failing_step(named, 4, in_step=in_step) == 7


# ---- issue #28 item 1: a run that commits checkpoints past its start makes progress; it is not a loop ----
_ROUND = ["--guards", "crash_loop_guard", "--max-steps", "9", "--save-steps", "1", "--max-repeats", "2"]


def _round(output_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(output_dir), *_ROUND, "--kill-rank", "0", "--kill-signal", "KILL", *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_sigkilled_runs_that_commit_checkpoints_are_progress_and_a_real_loop_is_still_stopped(tmp_path: Path):
    output_dir = tmp_path / "run"
    # Killed with SIGKILL each time (no record of how it ended), restarted with resume_from_checkpoint=True.
    plan = [
        ("--kill-at", "3"),  # fresh: commits checkpoints 1-2, dies in step 3
        ("--kill-at", "3", "--resume"),  # from checkpoint-2: dies at once, nothing new
        ("--kill-at", "7", "--resume"),  # from checkpoint-2 again: commits 3-6 first, then dies
    ]
    for args in plan:
        assert _round(output_dir, *args).returncode == -9
    assert [r.start["step"] for r in cl.load_runs(output_dir)] == [0, 2, 2]
    assert [r.outcome for r in cl.load_runs(output_dir)] == ["unknown"] * 3

    # Two deaths in a row started from step 2, but the second committed checkpoints 3-6: this start resumes from
    # checkpoint-6, which is progress, not a loop (it was refused: "the last 2 runs … started from step 2").
    resumed = _round(output_dir, "--kill-at", "7", "--resume")
    assert resumed.returncode == -9, resumed.stderr[-3000:]
    assert "crash loop" not in resumed.stderr.lower()
    assert _round(output_dir, "--kill-at", "7", "--resume").returncode == -9  # from checkpoint-6 again, nothing new

    # Now the same death twice from checkpoint-6 with nothing committed in between: a loop, stopped.
    refused = _round(output_dir, "--kill-at", "7", "--resume")
    assert refused.returncode == 1
    assert "PreflightError" in refused.stderr and "started from step 6" in refused.stderr
    assert [r.start["step"] for r in cl.load_runs(output_dir)] == [0, 2, 2, 6, 6]


def test_a_later_start_in_the_history_is_progress_and_breaks_the_streak(tmp_path: Path):
    output_dir = tmp_path / "run"
    for i, step in enumerate([50, 50, 80]):  # the third started later: the second committed past 50
        cl.record_start(output_dir, run_id=f"k{i}", step=step, extra={"host": "node-that-died"})
    assert cl.find_crash_loop(output_dir, max_repeats=2) is None
    cl.record_start(output_dir, run_id="k3", step=80, extra={"host": "node-that-died"})
    loop = cl.find_crash_loop(output_dir, max_repeats=2)
    assert loop is not None and loop.step == 80 and loop.count == 2
    # a start that resumes past the newest run's start is progress too
    assert cl.find_crash_loop(output_dir, max_repeats=2, progress_step=90) is None
    assert cl.find_crash_loop(output_dir, max_repeats=2, progress_step=80) is not None
