"""GracefulStop's last good save on 2 ranks (gloo, CPU; DDP and FSDP): the failing ranks agree through the c10d
store, never through a collective, and save together only when every rank failed at the same step with a consistent
state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import trainguard

from _engines import ENGINE_ENV
from _rig import TESTS_DIR, run_torchrun

pytestmark = pytest.mark.distributed

SCRIPT = TESTS_DIR / "scripts" / "last_good_save_ranks.py"


def run_job(tmp_path: Path, mode: str, engine: str = "ddp") -> tuple[Path, list[dict[str, Any]]]:
    run_dir, reports = tmp_path / "run", tmp_path / "reports"
    reports.mkdir()
    env = {ENGINE_ENV: engine} if engine != "ddp" else None
    # The timeout bounds the job: a hang in a collective would raise TimeoutExpired and fail the test.
    result = run_torchrun(SCRIPT, mode, str(run_dir), str(reports), nproc=2, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("engine", ["ddp", "fsdp1_sharded", "fsdp2_sharded", "fsdp2_full"])
def test_an_oom_in_evaluation_on_every_rank_leaves_a_committed_verified_checkpoint_of_the_last_step(
    tmp_path: Path, engine: str
) -> None:
    run_dir, ranks = run_job(tmp_path, "eval_oom_all", engine)
    folder = run_dir / "checkpoint-3"
    for report in ranks:
        assert report["error"] == "OutOfMemoryError" and report["same_object"] is True  # it still propagates
        assert report["saved_on_error"] == str(folder), report
        assert report["save"] is True and "all 2 ranks" in report["reason"]
        assert report["verified_when_caught"] is True  # committed before the error reached this rank's caller
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-3"]
    verified = trainguard.verify_checkpoint(folder)  # the manifest was committed before the error propagated
    assert verified.ok, verified
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == 3
    assert (folder / "rng_state_0.pth").is_file() and (folder / "rng_state_1.pth").is_file()  # every rank wrote
    if engine.endswith("sharded"):
        assert (folder / "pytorch_model_fsdp_0").is_dir()  # the model's shards, written by both ranks


def test_an_oom_on_one_rank_only_saves_nothing_and_says_which_rank_did_not_report(tmp_path: Path) -> None:
    run_dir, (rank0, rank1) = run_job(tmp_path, "eval_oom_rank1")
    assert not list(run_dir.glob("checkpoint-*"))
    assert rank1["error"] == "OutOfMemoryError" and rank1["same_object"] is True
    assert rank1["save"] is False and rank1["reason"].startswith("rank(s) 0 did not report a failure within 3 s")
    assert any(a.startswith("warning:") and "rank(s) 0 did not report" in a for a in rank1["alerts"])
    # rank 0 was inside a collective: it gets the peer's exit from gloo, and its own error rules out a save
    assert rank0["error"] is not None and rank0["saved_on_error"] is None
    assert rank0["save"] is False and "a collective failed" in rank0["reason"]


@pytest.mark.parametrize("engine", ["ddp", "fsdp2_sharded"])
def test_an_error_inside_the_optimizer_update_on_every_rank_saves_nothing(tmp_path: Path, engine: str) -> None:
    run_dir, ranks = run_job(tmp_path, "update_all", engine)
    assert not list(run_dir.glob("checkpoint-*"))
    for report in ranks:
        assert report["error"] == "OutOfMemoryError" and report["same_object"] is True
        assert report["save"] is False and "optimizer update" in report["reason"], report
        assert any(a.startswith("warning:") and "no last save of step 3" in a for a in report["alerts"])
