"""The lineage registry (``trainguard-checkpoints.json``) at scale and when it cannot be read: its size does not grow
with ranks x saves, and a registry that cannot be read is named and set aside, never silently rewritten empty.

Written through the real functions the callbacks call (``record_run``, ``record_after_save``) on a real folder; the
ranks are simulated as the observation list ``gather_object`` hands the main process."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from trainguard.checks import lineage
from trainguard.checks._layout import QUARANTINE_DIR, RUN_MARKER

LIMIT = 1 << 20  # the registry's own read limit
TOO_BIG = b'{"current": {"lineage": "20260101T000000Z-aaaaaa"}, "pad": "' + b"x" * LIMIT + b'"}'


def _observations(world: int, save: int) -> list[dict[str, str]]:
    # what each rank's first step after a save saw: a 32-hex RNG digest and a 32-hex batch digest, all distinct
    return [{"rng": f"{save:012x}{rank:020x}", "batch": f"{rank:012x}{save:020x}"} for rank in range(world)]


def test_1024_ranks_x_1000_saves_keep_the_registry_small_and_the_lineage_intact(tmp_path: Path):
    out = tmp_path / "out"
    first = lineage.new_id()
    lineage.record_run(out, lineage=first, run="run-0", adopts_unrecorded=False, world_size=1024)
    runs = ["run-0"]
    for save in range(1, 1001):
        if save % 100 == 0:  # a restart every 100 saves: a new run of the same lineage
            runs.append(f"run-{save}")
            lineage.record_run(out, lineage=first, run=runs[-1], adopts_unrecorded=False, world_size=1024)
        lineage.record_after_save(out, f"checkpoint-{save}", run=runs[-1], observations=_observations(1024, save))
        size = (out / RUN_MARKER).stat().st_size
        assert size < LIMIT // 8, f"after save {save}: {size} bytes"

    scope = lineage.current_scope(out)
    assert (scope.lineage, scope.source) == (first, "registry")
    registry = lineage.read_registry(out)
    assert [r["run"] for r in registry["runs"]] == runs
    assert len(registry["after_save"]) == 100  # the last 100 saves
    summary = lineage.after_save(out, "checkpoint-1000", runs[-1])
    assert summary == lineage.summarize_ranks(_observations(1024, 1000))
    assert summary["world_size"] == 1024
    # one rank's batch differs: the summaries differ in the batch only
    other = _observations(1024, 1000)
    other[517]["batch"] = "f" * 32
    changed = lineage.summarize_ranks(other)
    assert changed["batch"] != summary["batch"] and changed["rng"] == summary["rng"]


def test_many_fresh_lineages_keep_the_registry_bounded_and_the_current_one(tmp_path: Path):
    out = tmp_path / "out"
    for n in range(400):
        current = f"20260101T000000Z-{n:06x}"
        lineage.record_run(out, lineage=current, run=f"r{n}", adopts_unrecorded=False)
    registry = lineage.read_registry(out)
    assert len(registry["lineages"]) == 200 and current in registry["lineages"]
    assert lineage.current_scope(out).lineage == current
    assert (out / RUN_MARKER).stat().st_size < LIMIT // 4


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b'{"current": {"lineage": "20260101T000000Z-aaaaaa"', id="truncated"),
        pytest.param(TOO_BIG, id="too-big"),
        pytest.param(b'["not", "an", "object"]', id="not-an-object"),
    ],
)
@pytest.mark.parametrize("writer", ["record_run", "record_after_save"])
def test_an_unreadable_registry_is_named_and_set_aside_never_rewritten_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, writer: str
):
    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_MARKER).write_bytes(content)

    with caplog.at_level(logging.WARNING, logger="trainguard"):
        assert lineage.read_registry(out) == {}
        lineage.read_registry(out)  # the same file again: named once
    named = [r.getMessage() for r in caplog.records if RUN_MARKER in r.getMessage()]
    assert len(named) == 1 and "cannot be read" in named[0] and "move it aside" in named[0]
    assert (out / RUN_MARKER).read_bytes() == content  # a reader never touches it

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        if writer == "record_run":
            lineage.record_run(out, lineage="20260202T000000Z-bbbbbb", run="r1", adopts_unrecorded=False)
        else:
            lineage.record_after_save(out, "checkpoint-2", run="r1", observations=[{"rng": "a", "batch": "b"}])
    moved = [p for p in (out / QUARANTINE_DIR).iterdir() if p.name.startswith(RUN_MARKER) and "reason" not in p.name]
    assert len(moved) == 1 and moved[0].read_bytes() == content  # kept, byte for byte
    reason = json.loads(moved[0].with_name(moved[0].name + ".reason.json").read_text())
    assert "unreadable lineage registry" in reason["reason"]
    assert any(str(moved[0]) in r.getMessage() for r in caplog.records)  # the warning says where it went
    assert json.loads((out / RUN_MARKER).read_text())["format"] == lineage.LINEAGE_FORMAT  # a new, readable one
