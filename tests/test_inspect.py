"""`trainguard inspect PATH`: a run's lock, crashes, checkpoints, versions and recorded identity; read only."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import trainguard
from trainguard.checks import crash_loop as cl

from _rig import run_python, run_trainer

# Runs the command in a fresh interpreter and proves it never imported torch.
INSPECT = (
    "import sys\n"
    "from trainguard.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "sys.stderr.write('TORCH_IMPORTED=%s\\n' % ('torch' in sys.modules))\n"
    "raise SystemExit(code)\n"
)


def _inspect(*args: str) -> tuple[int, str, str]:
    result = run_python(INSPECT, "inspect", *args, timeout=120)
    assert "TORCH_IMPORTED=False" in result.stderr, result.stderr[-3000:]
    return result.returncode, result.stdout, result.stderr


@pytest.fixture
def run_dir(output_dir: Path) -> Path:
    """A real run (lock held by this process, two checkpoints), three recorded OOM crashes before it, two merged
    versions and an identity sidecar."""
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    for i in range(3):
        cl.record_start(
            output_dir,
            run_id=f"old{i}",
            step=0,
            batch={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1},
        )
        cl.record_failure(output_dir, run_id=f"old{i}", step=7, exc=oom, rank=1)
    lock = trainguard.RunLock()
    guards = [lock, trainguard.CrashLoopGuard(max_repeats=None)]  # records the clean run, does not refuse it
    run_trainer(output_dir, callbacks=guards, max_steps=2, save_strategy="steps", save_steps=1)
    state_file = output_dir / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["stateful_callbacks"]["DatasetGuard"] = {"args": {}, "attributes": {"record": {"fingerprint": "abc123"}}}
    state_file.write_text(json.dumps(state))
    (output_dir / "merged" / "v001").mkdir(parents=True)
    (output_dir / "merged" / "v001" / "trainguard-version.json").write_text(
        json.dumps({"source_checkpoint": str(output_dir / "checkpoint-2"), "created_utc": "2026-01-01T00:00:00Z"})
    )
    (output_dir / "merged" / "v002").mkdir()
    (output_dir / "trainguard-run.json").write_text(json.dumps({"dataset_fingerprint": "abc123"}))
    return output_dir


def test_inspect_json_shows_lock_crashes_checkpoints_versions_and_identity_without_importing_torch(run_dir: Path):
    code, stdout, _ = _inspect(str(run_dir), "--json")
    assert code == 0
    report = json.loads(stdout)
    lock = report["lock"]
    assert lock["held"] is True and lock["holder"]["pid"] == os.getpid() and os.getpid() in lock["holder_pids"]
    assert lock["holder"]["host"] == os.uname().nodename and lock["holder"]["started_utc"]
    assert [r["outcome"] for r in report["runs"]] == ["failed", "failed", "failed", "clean"]
    assert report["runs"][0]["failures"][0]["exception"] == "torch.OutOfMemoryError"
    assert report["crash_loop"] is None  # the clean run after them broke the streak
    assert [c["name"] for c in report["checkpoints"]] == ["checkpoint-1", "checkpoint-2"]
    assert all(c["files"] >= 5 and c["bytes"] > 0 for c in report["checkpoints"])
    assert all(c["verified"] in (True, False, None) for c in report["checkpoints"])
    assert [v["name"] for v in report["versions"]] == ["v001", "v002"]
    assert report["versions"][0]["metadata"]["source_checkpoint"].endswith("checkpoint-2")
    assert report["versions"][1]["metadata"] is None
    identity = report["identity"]
    assert identity["checkpoint"] == "checkpoint-2"
    assert identity["stateful_callbacks"]["DatasetGuard"]["attributes"]["record"]["fingerprint"] == "abc123"
    assert "sidecars" not in identity  # trainguard-run.json was documented but never written: no longer read


def test_inspect_text_names_the_holder_and_a_crash_loop(tmp_path: Path):
    output_dir = tmp_path / "run"
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory")
    for i in range(3):
        cl.record_start(output_dir, run_id=f"r{i}", step=0)
        cl.record_failure(output_dir, run_id=f"r{i}", step=7, exc=oom)
    with trainguard.acquire_run_lock(output_dir):
        code, stdout, _ = _inspect(str(output_dir))
    assert code == 0
    assert f"lock:        HELD by PID {os.getpid()} on {os.uname().nodename}" in stdout
    assert "runs:        3 failed" in stdout
    assert "crash      step 7: torch.OutOfMemoryError: CUDA out of memory" in stdout
    assert "crash loop:  torch.OutOfMemoryError at step 7 ended the last 3 runs" in stdout
    code, stdout, _ = _inspect(str(output_dir))
    assert f"lock:        free; last held by PID {os.getpid()}" in stdout


def test_inspect_of_a_missing_path_exits_2(tmp_path: Path):
    code, stdout, stderr = _inspect(str(tmp_path / "nope"))
    assert code == 2 and "no such folder" in stderr and not stdout
    code, stdout, _ = _inspect(str(tmp_path / "nope"), "--json")
    assert code == 2 and json.loads(stdout)["ok"] is False
    (tmp_path / "file").write_text("x")
    code, _, stderr = _inspect(str(tmp_path / "file"))
    assert code == 2 and "not a folder" in stderr


def test_inspect_of_a_plain_folder_reports_nothing_recorded(tmp_path: Path):
    code, stdout, _ = _inspect(str(tmp_path), "--no-verify")
    assert code == 0
    assert "lock:        free (never taken by RunLock)" in stdout
    assert "runs:        none recorded" in stdout and "checkpoints: none" in stdout and "versions:    none" in stdout
    assert not list(tmp_path.iterdir())  # inspect created nothing


def test_inspect_survives_malformed_records_and_says_which_are_unreadable(tmp_path: Path):
    (tmp_path / ".trainguard.lock").write_text("")
    (tmp_path / ".trainguard.lock.json").write_text("{not json")
    (tmp_path / cl.CRASH_LOG).write_text('{"event": "start", "run_id": "a", "step": 0}\n[1, 2]\n{"torn": \n')
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{truncated")
    (tmp_path / "v001").mkdir()
    (tmp_path / "v001" / "trainguard-version.json").write_text("[]x")
    code, stdout, _ = _inspect(str(tmp_path), "--json", "--no-verify")
    assert code == 0
    report = json.loads(stdout)
    assert report["lock"]["held"] is False and report["lock"]["holder"] is None
    assert [r["outcome"] for r in report["runs"]] == ["unknown"]
    assert report["checkpoints"][0]["name"] == "checkpoint-3" and report["identity"]["stateful_callbacks"] == {}
    assert "unreadable" in report["versions"][0]["metadata"]
    code, stdout, _ = _inspect(str(tmp_path), "--no-verify")
    assert code == 0 and "lock:        free; last held by an unknown holder (no readable" in stdout
