"""RunLock, CrashLoopGuard and GracefulStop in a real 2-rank torchrun job (gloo, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trainguard.checks import crash_loop

from _engines import ENGINE_ENV
from _rig import TESTS_DIR, run_torchrun, subprocess_env

pytestmark = pytest.mark.distributed

HOLDER = (
    "import sys, time\n"
    "from trainguard.checks.run_lock import acquire_run_lock\n"
    "acquire_run_lock(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.fixture(scope="module", params=[None, "fsdp2_sharded"], ids=["ddp", "fsdp2"])
def job(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One torchrun job: a refused Trainer on a folder locked from outside, then a run stopped by SIGTERM on
    rank 1 only (see tests/scripts/process_guards_dist.py); on plain DDP, and on FSDP2 (whose save is itself a
    collective, so a stop that saves on one rank only would hang the other)."""
    root = tmp_path_factory.mktemp("dist")
    locked, run_dir, reports = root / "locked", root / "run", root / "reports"
    reports.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(locked)], env=subprocess_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        result = run_torchrun(
            TESTS_DIR / "scripts" / "process_guards_dist.py", str(locked), str(run_dir), str(reports), timeout=300,
            env={ENGINE_ENV: request.param} if request.param else None,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait(timeout=60)
        if holder.stdout is not None:
            holder.stdout.close()
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"ranks": ranks, "run_dir": run_dir, "holder_pid": holder.pid, "stderr": result.stderr,
            "engine": request.param}  # fmt: skip


def test_a_lock_held_outside_the_job_refuses_every_rank_at_trainer_init(job: dict[str, Any]):
    rank0, rank1 = job["ranks"]
    assert rank0["pg_initialised_at_init"] and rank1["pg_initialised_at_init"]
    assert f"PID {job['holder_pid']}" in rank0["refused"]  # the writing rank names the holder
    assert f"PID {job['holder_pid']}" in rank1["refused"]  # and the other rank is refused with it, not left hanging


def test_ranks_of_one_job_do_not_lock_each_other_out(job: dict[str, Any]):
    rank0, rank1 = job["ranks"]
    assert rank0["lock_held"] and not rank1["lock_held"]  # only the writing rank takes the lock
    assert "not a writing rank" in rank1["lock"]


def test_sigterm_on_one_rank_stops_both_ranks_after_the_same_step_with_one_checkpoint(job: dict[str, Any]):
    rank0, rank1 = job["ranks"]
    assert rank1["signal_sent_at"] == 3 and rank0["signal_sent_at"] is None
    assert rank1["stop_signal"] == "SIGTERM" and rank0["stop_signal"] is None  # rank 0 got no signal itself
    step = rank0["stopped_at_step"]
    assert step is not None and step > 3
    assert rank1["stopped_at_step"] == step == rank0["global_step"] == rank1["global_step"]
    run_dir: Path = job["run_dir"]
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == [f"checkpoint-{step}"]
    checkpoint = run_dir / f"checkpoint-{step}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    sharded = ("pytorch_model_fsdp_0", "optimizer_0")
    weights = ("model.safetensors", "optimizer.pt") if job["engine"] is None else sharded
    assert {"rng_state_0.pth", "rng_state_1.pth", *weights} <= {p.name for p in checkpoint.iterdir()}
    try:
        from trainguard.checks.checkpoint import verify_checkpoint
    except ImportError:  # the checkpoint verifier is optional here; the structure was checked above
        pass
    else:
        assert verify_checkpoint(checkpoint).mode == "manifest"  # hashed at on_save after every rank's write
    # one job, one start, one clean end
    assert [r.outcome for r in crash_loop.load_runs(run_dir)] == ["clean"]
