"""The save audit and resume attestation in a real 2-rank torchrun job (gloo, CPU): every rank takes the same
decision, and every rank's files are audited."""

from __future__ import annotations

import json
from typing import Any

import pytest

from trainguard.checks.checkpoint import MANIFEST_NAME

from _rig import TESTS_DIR, run_torchrun

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("audit_dist")
    reports = root / "reports"
    reports.mkdir()
    result = run_torchrun(TESTS_DIR / "scripts" / "save_audit_dist.py", str(root), str(reports), timeout=400)
    assert result.returncode == 0, result.stderr[-6000:]
    return {"root": root, "ranks": [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]}


def test_a_hollow_save_on_the_writing_rank_stops_every_rank_at_that_save(job: dict[str, Any]):
    for rank in job["ranks"]:
        assert rank["hollow"]["raised"] == "SaveAuditError" and rank["hollow"]["steps"] == 2
    assert "model.embed_tokens.weight" in job["ranks"][0]["hollow"]["what"]
    assert "another rank" in job["ranks"][1]["hollow"]["what"]
    assert not (job["root"] / "hollow" / "checkpoint-2" / MANIFEST_NAME).exists()


def test_a_rank_that_wrote_no_rng_state_is_named_and_every_rank_stops(job: dict[str, Any]):
    for rank in job["ranks"]:
        assert rank["rng"]["raised"] == "SaveAuditError" and rank["rng"]["steps"] == 2
    assert "rng_state_1.pth" in job["ranks"][0]["rng"]["what"]


def test_an_identical_resume_on_two_ranks_finds_nothing_and_a_resume_without_the_skip_is_refused_on_both(
    job: dict[str, Any],
):
    for rank in job["ranks"]:
        assert rank["identical"]["raised"] is None and rank["identical"]["findings"] == []
        assert rank["no_skip"]["raised"] == "ResumeAttestationError"
        assert rank["no_skip"]["steps"] == 0  # stopped at the end of its first step, before the probe placed after it
        assert any("ignore_data_skip=True" in text for _, text in rank["no_skip"]["findings"])
