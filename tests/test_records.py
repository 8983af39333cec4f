"""What trainguard writes has a schema (``checks/records.py``): a reader names the field that is wrong, refuses a
newer format by name, and reads what an older release wrote; writers go through the same types."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from trainguard.checks import lineage
from trainguard.checks._layout import LINEAGE_FORMAT, RUN_MARKER
from trainguard.checks.records import Registry
from trainguard.errors import MalformedFileError

RUN = {"run": "r1", "lineage": "L1", "started_utc": "2026-12-08T00:00:00Z", "host": "h", "pid": 7, "world_size": 2}


def _registry(**fields: Any) -> dict[str, Any]:
    return {"format": LINEAGE_FORMAT, "current": {"lineage": "L1", "adopts_unrecorded": False}, **fields}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"runs": [RUN, {**RUN, "pid": "seven"}]}, "runs[1].pid"),
        ({"runs": [RUN, {**RUN, "world_size": 0}]}, "runs[1].world_size"),
        ({"current": {"lineage": ["L1"]}}, "current.lineage"),
        ({"lineages": {"L1": {"host": "x" * 5000}}}, "lineages.L1.host"),
        ({"after_save": {"checkpoint-2": {"run": "r1", "rng": "a"}}}, "after_save.checkpoint-2.world_size"),
        ({"format": "trainguard-lineage/2"}, "format"),
    ],
)
def test_a_registry_field_that_is_wrong_is_named_in_the_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fields: dict[str, Any], field: str
):
    (tmp_path / RUN_MARKER).write_text(json.dumps(_registry(**fields)))
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        assert lineage.read_registry(tmp_path) == {}
    assert any(f"field={field}" in r.getMessage() for r in caplog.records), caplog.text


def test_a_newer_format_is_refused_by_name():
    with pytest.raises(MalformedFileError, match="trainguard-lineage/2, which this trainguard release does not know"):
        Registry.from_json({"format": "trainguard-lineage/2"}, source="out/x.json")


def test_what_older_releases_wrote_still_reads(tmp_path: Path):
    observations = [{"rng": "a", "batch": "b"}, {"rng": "c", "batch": None}]
    older = {
        "format": "trainguard-run/1",  # the marker of a release before lineages
        "since_utc": "2026-01-01T00:00:00Z",
        "after_save": {"checkpoint-2": {"run": "r1", "utc": "t", "ranks": observations}},  # one entry per rank
    }
    (tmp_path / RUN_MARKER).write_text(json.dumps(older))
    assert lineage.current_scope(tmp_path).source == "none"
    assert lineage.after_save(tmp_path, "checkpoint-2", "r1") == lineage.summarize_ranks(observations)


def test_the_registry_round_trips_through_its_type(tmp_path: Path):
    lineage.record_run(tmp_path, lineage="L1", run="r1", adopts_unrecorded=True, world_size=2)
    lineage.record_after_save(tmp_path, "checkpoint-2", run="r1", observations=[{"rng": "a", "batch": "b"}] * 2)
    written = json.loads((tmp_path / RUN_MARKER).read_text())
    assert Registry.from_json(written, source="x").to_json() == written
    assert written["format"] == LINEAGE_FORMAT and written["current"]["adopts_unrecorded"] is True
