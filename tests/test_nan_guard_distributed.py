"""NanGuard under torchrun: a non-finite value on rank 1 only stops both ranks at the same step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _rig import TESTS_DIR, run_torchrun


@pytest.mark.distributed
def test_a_nan_seen_only_by_rank_1_stops_both_ranks_at_the_same_step(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    result = run_torchrun(
        TESTS_DIR / "scripts" / "nan_two_ranks.py", str(tmp_path / "run"), str(reports), nproc=2, timeout=240
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1))
    runs = {entry["run"]: (entry, other) for entry, other in zip(rank0, rank1, strict=True)}

    # (run, step the rank stopped after, bad step named)
    for name, stopped_after, bad_step in [
        ("loss_only_sync", 2, 3),  # caught before step 3's update, on both ranks
        ("loss_only_async", 4, 3),  # read one step late, still the same step on both ranks
        ("nan_forward_sync", 2, 3),
    ]:
        on0, on1 = runs[name]
        for entry in (on0, on1):
            assert entry["error"] is not None, (name, entry)
            assert entry["global_step"] == stopped_after, (name, entry)
            where = entry["error"]["where"]
            assert (where["step"], where["rank"], where["field"]) == (bad_step, 1, "loss"), (name, where)
        assert on1["error"]["evidence"]["value"] == "NaN"  # the rank that saw it names the value
        assert "value" not in on0["error"]["evidence"]
    assert runs["nan_forward_sync"][0]["weights_finite"] and runs["nan_forward_sync"][1]["weights_finite"]
