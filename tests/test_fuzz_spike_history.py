"""Fuzzing the spike history: random and crafted ``trainguard-spikes.jsonl`` lines and committed rollback records
give a plan or a report, never a raw exception, and never a skip that a committed, in-bounds record does not name.

The reader (:func:`read_history`), the manifest reader (:func:`committed_rollbacks`, on a real folder with a commit
marker) and the decision (:func:`plan_resume_skips`) are all covered; the settings are those of
``test_fuzz_readers.py`` (no example database, a per-example deadline).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainguard.checks.spike_history import (
    HistoryLine,
    committed_rollbacks,
    parse_rollback,
    plan_resume_skips,
    read_history,
)

from _fuzz import fuzz_settings

FUZZ = fuzz_settings(60)
pytestmark = pytest.mark.timeout(600)

LINEAGE = "20260101T000000Z-aaaaaa"
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
STEPS = st.integers(min_value=-5, max_value=60) | st.sampled_from([True, False, 1.5, "31", None, 10**30])
# Records shaped like rollbacks, most of them wrong somewhere: the lineage, the bounds, the types, the length.
ROLLBACKS = st.fixed_dictionaries(
    {
        "lineage": st.sampled_from([LINEAGE, "20260101T000000Z-bbbbbb", "", None, 7]),
        "spike_step": STEPS,
        "checkpoint_step": STEPS,
        "skip_steps": st.lists(STEPS, max_size=6) | st.sampled_from([None, "3..99999", list(range(3, 5000))]),
    },
    optional={"event": st.sampled_from(["rollback", "skip", None]), "step": STEPS},
)
RECORDS = ROLLBACKS | JSON_VALUES
# Lines of the history file: JSON (rollback-shaped or anything), and bytes that are not JSON trainguard reads.
LINES = st.lists(
    st.one_of(
        ROLLBACKS.map(lambda r: json.dumps({"event": "rollback", **r}).encode()),
        JSON_VALUES.map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"[" * 5_000, b'{"event": "rollback", "skip_steps": [1e999]}', b"\xff\xfe{", b"NaN"]),
        st.binary(max_size=80).filter(lambda b: b"\n" not in b),
    ),
    max_size=12,
)


def assert_only_confirmed(plan: Any, lineage: str | None, after: int, skip_batches: int) -> None:
    for step, source in plan.skips.items():
        assert isinstance(step, int) and step > after and isinstance(source, str)
        assert any(
            r.lineage == lineage and step in r.skip_steps and r.checkpoint_step < step <= r.spike_step
            for r in plan.confirmed
        )
    for record in plan.confirmed:
        assert record.lineage == lineage and 0 < len(record.skip_steps) <= skip_batches


@FUZZ
@given(lines=LINES)
def test_history_reader_reads_any_bytes_without_a_raw_exception(lines: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trainguard-spikes.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        history = read_history(path)
        assert all(isinstance(line, HistoryLine) and line.number >= 1 for line in history)
        plan = plan_resume_skips(committed=[], history=history, lineage=LINEAGE, after=0, skip_batches=5, apply=True)
        assert plan.skips == {} and plan.confirmed == []  # the jsonl alone never skips a step


@FUZZ
@given(
    committed=st.lists(st.tuples(st.sampled_from(["checkpoint-30", "checkpoint-40"]), RECORDS), max_size=6),
    history=st.lists(st.tuples(st.integers(min_value=1, max_value=99), ROLLBACKS | JSON_VALUES), max_size=6),
    lineage=st.sampled_from([LINEAGE, None]),
    after=st.integers(min_value=0, max_value=40),
    skip_batches=st.integers(min_value=1, max_value=4),
    apply=st.booleans(),
)
def test_every_skip_comes_from_a_committed_record_inside_its_bounds(
    committed: list[tuple[str, Any]],
    history: list[tuple[int, Any]],
    lineage: str | None,
    after: int,
    skip_batches: int,
    apply: bool,
) -> None:
    lines = [HistoryLine(number, value) for number, value in history]
    plan = plan_resume_skips(
        committed=committed, history=lines, lineage=lineage, after=after, skip_batches=skip_batches, apply=apply
    )
    assert plan.applied is apply
    assert_only_confirmed(plan, lineage, after, skip_batches)
    if lineage is None:
        assert plan.skips == {}  # a checkpoint with no lineage matches no record (no None == None)
    # What the jsonl says changes nothing but the report.
    alone = plan_resume_skips(
        committed=committed, history=[], lineage=lineage, after=after, skip_batches=skip_batches, apply=apply
    )
    assert alone.skips == plan.skips and alone.confirmed == plan.confirmed
    for _source, value in committed:
        parsed = parse_rollback(value, skip_batches=skip_batches)
        assert isinstance(parsed, str) or len(parsed.skip_steps) <= skip_batches


def write_checkpoint(folder: Path, lineage: Any, rollbacks: Any, *, rehash: bool = True) -> None:
    folder.mkdir(parents=True)
    meta = {"format": "x", "lineage": {"lineage": lineage, "guards": {"spike_guard": {"rollbacks": rollbacks}}}}
    data = json.dumps(meta).encode()
    (folder / "trainguard-manifest.json").write_bytes(data)
    digest = hashlib.sha256(data if rehash else b"another manifest").hexdigest()
    (folder / "trainguard-manifest.sha256").write_text(f"{digest}  trainguard-manifest.json\n")


@FUZZ
@given(
    own=st.lists(RECORDS, max_size=4) | JSON_VALUES,
    later=st.lists(RECORDS, max_size=4) | JSON_VALUES,
    later_lineage=st.sampled_from([LINEAGE, "20260101T000000Z-bbbbbb", None]),
    rehash=st.booleans(),
)
def test_committed_records_are_read_only_from_manifests_the_marker_vouches_for(
    own: Any, later: Any, later_lineage: Any, rehash: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp) / "checkpoint-20", LINEAGE, own)
        write_checkpoint(Path(tmp) / "checkpoint-40", later_lineage, later, rehash=rehash)
        (Path(tmp) / "checkpoint-50").mkdir()  # written without trainguard: no record at all
        lineage, committed, problems = committed_rollbacks(Path(tmp) / "checkpoint-20")
        assert lineage == LINEAGE
        sources = {source for source, _ in committed} | {source for source, _ in problems}
        if not rehash or later_lineage != LINEAGE:
            assert "checkpoint-40" not in sources  # a manifest edited after its commit, or another lineage's
        assert "checkpoint-50" not in sources
        plan = plan_resume_skips(committed=committed, history=[], lineage=lineage, after=20, skip_batches=3, apply=True)
        assert_only_confirmed(plan, LINEAGE, 20, 3)


def test_a_manifest_edited_after_its_commit_confirms_nothing(tmp_path: Path) -> None:
    record = {"lineage": LINEAGE, "spike_step": 31, "checkpoint_step": 30, "skip_steps": [31]}
    write_checkpoint(tmp_path / "checkpoint-20", LINEAGE, [])
    write_checkpoint(tmp_path / "checkpoint-34", LINEAGE, [record], rehash=False)
    assert committed_rollbacks(tmp_path / "checkpoint-20") == (LINEAGE, [], [])
    write_checkpoint(tmp_path / "checkpoint-40", LINEAGE, [record])
    assert committed_rollbacks(tmp_path / "checkpoint-20") == (LINEAGE, [("checkpoint-40", record)], [])
