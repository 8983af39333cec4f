"""CheckpointVerifier in a real 2-rank torchrun job (gloo, CPU)."""

from __future__ import annotations

import json
from typing import Any

import pytest

import trainguard
from trainguard.checks import checkpoint as ckpt

from _rig import TESTS_DIR, run_torchrun

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ckpt_dist")
    run_dir, reports = root / "run", root / "reports"
    reports.mkdir()
    script = TESTS_DIR / "scripts" / "checkpoint_verifier_dist.py"
    result = run_torchrun(script, str(run_dir), str(reports), timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"ranks": ranks, "run_dir": run_dir}


def test_the_manifest_covers_every_ranks_files_and_is_written_once_per_checkpoint(job: dict[str, Any]):
    rank0, rank1 = job["ranks"]
    assert rank0["world_size"] == 2
    # Written by rank 0 alone, once per save (2 and 4, then 4 and 6 in the resumed run), never by rank 1.
    assert rank0["manifest_writes"] == ["checkpoint-2", "checkpoint-4", "checkpoint-4", "checkpoint-6"]
    assert rank1["manifest_writes"] == []
    folder = job["run_dir"] / "checkpoint-2"
    listed = ckpt.parse_sha256_file(folder / ckpt.MANIFEST_NAME)
    assert {"rng_state_0.pth", "rng_state_1.pth", "shards/rank0.bin", "shards/rank1.bin"} <= set(listed)
    assert trainguard.verify_checkpoint(folder).ok


def test_every_rank_resumes_from_the_same_verified_checkpoint_and_only_one_renames(job: dict[str, Any]):
    assert [r["resumed_at"] for r in job["ranks"]] == [2, 2]
    run_dir = job["run_dir"]
    assert len(list((run_dir / ckpt.QUARANTINE_DIR).glob("checkpoint-4.*Z"))) == 1
    for step in (2, 4, 6):
        assert trainguard.verify_checkpoint(run_dir / f"checkpoint-{step}").ok
