"""Hostile and broken records: a FIFO never hangs a run or ``trainguard inspect``, a planted link is never written
through, a crafted record is skipped or shown unreadable, never a raw traceback."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import trainguard
from trainguard.alerts import EVENTS_FILE, JsonlSink
from trainguard.callbacks import GuardCallback
from trainguard.checks import crash_loop as cl
from trainguard.checks import run_lock as rl

from _rig import holding_run_lock, make_trainer, run_python, run_trainer

INSPECT = "import sys\nfrom trainguard.cli import main\nraise SystemExit(main(sys.argv[1:]))\n"
DEEP = "[" * 200_000 + "]" * 200_000


class _Alerting(GuardCallback):
    """A guard that alerts at every step, on the default sinks (the events file among them)."""

    guard_name = "alerting"

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.alert("warning", f"odd at step {state.global_step}", step=state.global_step)
        return control


@pytest.fixture
def holder(output_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """Another live process holding the run lock on output_dir."""
    with holding_run_lock(output_dir) as proc:
        yield proc


def _inspect(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # run_python's timeout turns a hang into a failure (TimeoutExpired), never a stuck test session
    return run_python(INSPECT, "inspect", str(folder), "--no-verify", *args, timeout=120)


# ------------------------------------------------------------------------------------------- events file
@pytest.mark.timeout(300)
def test_fifo_at_events_file_does_not_block_the_training_thread(output_dir: Path, caplog):
    output_dir.mkdir()
    events = output_dir / EVENTS_FILE
    os.mkfifo(events)
    guard = _Alerting()
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        _trainer, output = run_trainer(output_dir, callbacks=[guard], max_steps=3)
    assert output.global_step == 3 and len(guard.alerter.history) == 3
    [sink] = [s for s in guard.alerter.sinks if isinstance(s, JsonlSink)]
    assert sink.skipped is not None and "FIFO" in sink.skipped  # skipped for the rest of the run
    warnings = [r.getMessage() for r in caplog.records if EVENTS_FILE in r.getMessage()]
    assert len(warnings) == 1 and "FIFO" in warnings[0] and str(events) in warnings[0]
    assert events.is_fifo()  # left as it was


def test_symlink_at_events_file_is_not_written_through(output_dir: Path, tmp_path: Path, caplog):
    output_dir.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours\n")
    (output_dir / EVENTS_FILE).symlink_to(outside)
    guard = _Alerting()
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        _trainer, output = run_trainer(output_dir, callbacks=[guard], max_steps=2)
    assert output.global_step == 2
    assert outside.read_text() == "not yours\n"
    [sink] = [s for s in guard.alerter.sinks if isinstance(s, JsonlSink)]
    assert sink.skipped is not None and "symbolic link" in sink.skipped
    assert len([r for r in caplog.records if EVENTS_FILE in r.getMessage()]) == 1


# -------------------------------------------------------------------------------------------- crash log
@pytest.mark.timeout(300)
def test_fifo_at_crash_log_refuses_the_start_without_hanging_and_inspect_reports_it(output_dir: Path):
    output_dir.mkdir()
    log = output_dir / cl.CRASH_LOG
    os.mkfifo(log)
    trainer = make_trainer(output_dir, callbacks=[trainguard.CrashLoopGuard()], max_steps=2)
    with pytest.raises(trainguard.UnsafeFileError) as info:
        trainer.train()
    assert info.value.where["file"] == str(log) and "FIFO" in info.value.what
    assert trainer.state.global_step == 0 and log.is_fifo()
    result = _inspect(output_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "runs:        unknown: " in result.stdout and "FIFO" in result.stdout
    report = json.loads(_inspect(output_dir, "--json").stdout)
    assert "FIFO" in report["crash_log"]["problem"] and report["runs"] == []


def test_symlink_at_crash_log_is_never_appended_through(output_dir: Path, tmp_path: Path):
    output_dir.mkdir()
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    (output_dir / cl.CRASH_LOG).symlink_to(outside)
    with pytest.raises(trainguard.UnsafeFileError, match="symbolic link"):
        cl.record_start(output_dir, run_id="r", step=0)
    with pytest.raises(trainguard.UnsafeFileError, match="symbolic link"):
        cl.load_runs(output_dir)  # not read through either: the start is refused, not decided on another file
    trainer = make_trainer(output_dir, callbacks=[trainguard.CrashLoopGuard()], max_steps=1)
    with pytest.raises(trainguard.UnsafeFileError):
        trainer.train()
    assert outside.read_text() == ""


def test_a_crash_log_that_turns_unsafe_mid_run_skips_the_record_with_a_warning_not_the_run(
    output_dir: Path, tmp_path: Path, caplog
):
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")

    class _PlantLink(GuardCallback):
        guard_name = "plant"

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            log = output_dir / cl.CRASH_LOG
            if log.is_file() and not log.is_symlink():
                log.unlink()
                log.symlink_to(outside)
            return control

    with caplog.at_level(logging.WARNING, logger="trainguard"):
        _trainer, output = run_trainer(
            output_dir, callbacks=[trainguard.CrashLoopGuard(), _PlantLink(alert_sinks=[])], max_steps=2
        )
    assert output.global_step == 2 and outside.read_text() == ""
    assert any("crash-loop record not written" in r.getMessage() for r in caplog.records)


CRAFTED_LINES = [
    DEEP,  # 200k-deep JSON: RecursionError in a plain json.loads
    '{"event": "failure", "run_id": "x1", "step": 1e999, "exception": "E"}',  # inf: OverflowError in int()
    '{"event": "failure", "run_id": "x2", "step": "3", "exception": "E"}',  # a string where a number belongs
    '{"event": "start", "run_id": "x3", "step": 0, "batch": [4, 1]}',  # a list where an object belongs
    '{"event": "failure", "run_id": "x4", "step": 2, "exception": ["E"]}',
    '{"event": "failure", "run_id": "x5", "step": true, "exception": "E"}',  # a bool is not a step
    '{"event": "start", "run_id": "x6", "step": 0, "pid": {"a": 1}}',
    '{"event": "party", "run_id": "x7"}',
    "[1, 2]",
    '{"event": "end", "run_id": ' + "[" * 50 + "]" * 50 + "}",
]


def test_crafted_crash_log_lines_are_skipped_and_counted_never_a_traceback(tmp_path: Path, caplog):
    good = [
        {"event": "start", "run_id": "ok", "step": 0, "batch": {"per_device_train_batch_size": 4}},
        {"event": "failure", "run_id": "ok", "step": 5, "exception": "ValueError", "message": "m", "oom": False},
    ]
    lines = [json.dumps(good[0]), *CRAFTED_LINES, json.dumps(good[1])]
    (tmp_path / cl.CRASH_LOG).write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        runs = cl.load_runs(tmp_path)
    assert [(r.run_id, r.outcome) for r in runs] == [("ok", "failed")]
    [warning] = [r.getMessage() for r in caplog.records if cl.CRASH_LOG in r.getMessage()]
    assert f"skipped {len(CRAFTED_LINES)} malformed line(s)" in warning
    decision = cl.decide_start(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_repeats=1)
    assert decision.action == "refuse" and decision.loop is not None and decision.loop.step == 5
    result = _inspect(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"skipped {len(CRAFTED_LINES)} malformed line(s) of {cl.CRASH_LOG} (line 2, 3, 4" in result.stdout
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------- the run lock
def test_link_at_lock_file_is_refused_and_nothing_is_written_beside_its_target(output_dir: Path, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    output_dir.mkdir()
    (output_dir / rl.LOCK_NAME).symlink_to(elsewhere / "planted.lock")
    with pytest.raises(trainguard.UnsafeFileError) as info:
        rl.acquire_run_lock(output_dir)
    assert info.value.where["file"].endswith(rl.LOCK_NAME) and "symbolic link" in info.value.what
    assert list(elsewhere.iterdir()) == []  # no lock file, no holder record beside the link's target
    with pytest.raises(trainguard.UnsafeFileError):
        make_trainer(output_dir, callbacks=[trainguard.RunLock()], max_steps=1)
    assert list(elsewhere.iterdir()) == []
    result = _inspect(output_dir)
    assert result.returncode == 0 and "lock:        unknown: " in result.stdout and "symbolic link" in result.stdout


def test_link_at_holder_record_is_refused_and_its_target_is_untouched(output_dir: Path, tmp_path: Path):
    outside = tmp_path / "outside.json"
    outside.write_text('{"keep": true}')
    output_dir.mkdir()
    (output_dir / rl.INFO_NAME).symlink_to(outside)
    with pytest.raises(trainguard.UnsafeFileError) as info:
        rl.acquire_run_lock(output_dir)
    assert info.value.where["file"].endswith(rl.INFO_NAME)
    assert outside.read_text() == '{"keep": true}' and (output_dir / rl.INFO_NAME).is_symlink()
    assert rl.lock_status(output_dir)["held"] is False  # refused: the lock was given back
    assert rl.read_holder(output_dir / rl.INFO_NAME) is None  # not read through either


@pytest.mark.timeout(120)
def test_fifo_at_holder_record_hangs_neither_the_next_start_nor_inspect(output_dir: Path, holder: Any):
    record = output_dir / rl.INFO_NAME
    record.unlink()
    os.mkfifo(record)
    with pytest.raises(trainguard.RunLockedError) as info:  # the kernel still names the holder
        rl.acquire_run_lock(output_dir)
    assert f"PID {holder.pid}" in str(info.value) and "FIFO" in str(info.value.evidence["holder"]["note"])
    result = _inspect(output_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lock:        HELD by an unknown holder (no readable .trainguard.lock.json: unreadable" in result.stdout
    assert "FIFO" in result.stdout and record.is_fifo()


def test_an_empty_holder_record_is_one_being_written_not_an_unreadable_one(tmp_path: Path):
    # The record is written in place by the lock's holder: between its truncate and its write it is empty.
    (tmp_path / rl.LOCK_NAME).write_text("")
    (tmp_path / rl.INFO_NAME).write_text("")
    status = rl.lock_status(tmp_path)
    assert status["holder"] is None and status["holder_error"] is None


@pytest.mark.timeout(120)
def test_fifo_at_a_free_locks_holder_record_refuses_the_start_without_replacing_it(output_dir: Path):
    output_dir.mkdir()
    os.mkfifo(output_dir / rl.INFO_NAME)
    with pytest.raises(trainguard.UnsafeFileError, match="FIFO"):
        rl.acquire_run_lock(output_dir)
    assert (output_dir / rl.INFO_NAME).is_fifo() and rl.lock_status(output_dir)["held"] is False


@pytest.mark.timeout(120)
def test_fifo_at_lock_file_is_reported_by_inspect_without_hanging(tmp_path: Path):
    os.mkfifo(tmp_path / rl.LOCK_NAME)
    result = _inspect(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lock:        unknown: " in result.stdout and "FIFO" in result.stdout
    with pytest.raises(trainguard.UnsafeFileError, match="FIFO"):
        rl.acquire_run_lock(tmp_path)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (DEEP, "deeper"),
        ('{"pid": 1e999, "host": "h"}', "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"pid": "abc", "host": "h"}', "field 'pid'"),
        ('{"pid": 1, "host": ["h"]}', "field 'host'"),
        ('{"pid": 1, "command": {"a": 1}}', "field 'command'"),
    ],
)
def test_a_crafted_holder_record_is_shown_unreadable_never_a_traceback(
    output_dir: Path, holder: Any, content: str, why: str
):
    (output_dir / rl.INFO_NAME).write_text(content)
    with pytest.raises(trainguard.RunLockedError) as info:
        rl.acquire_run_lock(output_dir)
    assert f"PID {holder.pid}" in str(info.value)
    assert "unreadable" in info.value.evidence["holder"]["note"] and why in info.value.evidence["holder"]["note"]
    status = rl.lock_status(output_dir)
    assert status["holder"] is None and why in status["holder_error"]
    result = _inspect(output_dir)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "no readable .trainguard.lock.json: unreadable" in result.stdout
