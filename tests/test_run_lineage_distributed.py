"""Run lineage in a real 2-rank torchrun job (gloo, CPU): the refusal, rotation, stale-folder and JIT cases, where
every rank must take the same decision and every rank's files must be covered."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import trainguard
from trainguard.checks import checkpoint as ckpt
from trainguard.checks import lineage

from _rig import TESTS_DIR, run_torchrun

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lineage_dist")
    reports = root / "reports"
    reports.mkdir()
    result = run_torchrun(TESTS_DIR / "scripts" / "lineage_dist.py", str(root), str(reports), timeout=400)
    assert result.returncode == 0, result.stderr[-6000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"root": root, "ranks": ranks}


def test_a_fresh_start_into_another_runs_checkpoints_is_refused_on_every_rank_before_step_1(job: dict[str, Any]):
    for rank in job["ranks"]:
        assert rank["refuse"]["raised"] == "LineageError", rank
        assert rank["refuse"]["began_at"] is None
        assert "checkpoint-2" in rank["refuse"]["what"]


def test_rotation_on_two_ranks_deletes_only_this_lineages_checkpoints(job: dict[str, Any]):
    out = job["root"] / "rotation"
    b_lineage = job["ranks"][0]["rotation"]["lineage"]
    assert job["ranks"][1]["rotation"]["lineage"] == b_lineage  # one lineage for the whole job
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    for step in (6, 8):
        assert lineage.checkpoint_origin(out / f"checkpoint-{step}").lineage == b_lineage
        assert trainguard.verify_checkpoint(out / f"checkpoint-{step}").ok
    archived = sorted(p.name.split(".")[0] for p in (out / ckpt.ARCHIVE_DIR).glob("checkpoint-*Z"))
    assert archived == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]  # all of A's, moved before B saved there
    for folder in (out / ckpt.ARCHIVE_DIR).glob("checkpoint-*Z"):
        assert trainguard.verify_checkpoint(folder).ok


def test_a_save_into_a_stale_folder_on_two_ranks_lists_only_this_saves_files(job: dict[str, Any]):
    out = job["root"] / "stale"
    listed = set(ckpt.parse_sha256_file(out / "checkpoint-2" / ckpt.MANIFEST_NAME))
    assert not {"optimizer.pt", "rng_state_0.pth", "rng_state_1.pth"} & listed
    meta = json.loads((out / "checkpoint-2" / ckpt.METADATA_NAME).read_text())
    assert meta["lineage"]["world_size"] == 2 and meta["lineage"]["save_only_model"] is True
    moved = next((out / ckpt.ARCHIVE_DIR).glob("checkpoint-2.*Z"))
    assert (moved / "rng_state_0.pth").is_file() and (moved / "rng_state_1.pth").is_file()


def test_jit_checkpoints_on_two_ranks_are_committed_or_skipped_never_rewritten(job: dict[str, Any]):
    committed = job["root"] / "jit-commit" / "checkpoint-3"
    report = trainguard.verify_checkpoint(committed)
    assert report.mode == "manifest"
    listed = set(ckpt.parse_sha256_file(committed / ckpt.MANIFEST_NAME))
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= listed  # both ranks' files, after a barrier
    assert lineage.checkpoint_origin(committed).saved_by == "jit"

    regular = job["root"] / "jit-skip" / "checkpoint-8"
    assert trainguard.verify_checkpoint(regular).ok
    assert lineage.checkpoint_origin(regular).saved_by == "on_save"
    for rank in job["ranks"]:
        assert "1 repeated save(s) skipped" in rank["jit_skip"]["summary"]


def test_only_one_process_writes_the_lineage_registry(job: dict[str, Any]):
    registry = lineage.read_registry(job["root"] / "rotation")
    assert len(registry["runs"]) == 2  # A and B, each recorded once although two ranks ran each
    assert Path(job["root"] / "rotation" / ckpt.RUN_MARKER).is_file()
