"""Atomic writes: a reader sees the whole old file or the whole new one, whenever the writer dies."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainguard.atomic import (
    TEMP_MARKER,
    append_line,
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
    is_temp_name,
    read_jsonl,
)

from _rig import TESTS_DIR, subprocess_env


def _check_whole(path: Path) -> int:
    doc = json.loads(path.read_text())
    assert hashlib.sha256(doc["payload"].encode()).hexdigest() == doc["sha256"], "file holds a torn mix"
    return int(doc["i"])


def test_sigkill_at_random_moments_never_leaves_a_torn_file(tmp_path: Path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"i": 0, "payload": "", "sha256": hashlib.sha256(b"").hexdigest()})
    rng = random.Random(1234)
    kills, mid_write, versions = 0, 0, set()
    # At least 40 kills; more (up to 200) until at least 3 landed mid-write: how often a random moment falls between
    # create and rename depends on how fast this machine's disk fsyncs, and the test means something only then.
    while kills < 40 or (mid_write < 3 and kills < 200):
        kills += 1
        child = subprocess.Popen(
            [sys.executable, str(TESTS_DIR / "scripts" / "atomic_writer_loop.py"), str(target), str(1 << 20)],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        leftovers = [p for p in tmp_path.iterdir() if is_temp_name(p.name)]
        if leftovers:
            mid_write += 1  # this kill landed between create and rename: the interesting case
            for p in leftovers:
                p.unlink()
        versions.add(_check_whole(target))  # always the whole old or the whole new content
    # The test only means something if some kills really landed mid-write and the file really changed.
    assert mid_write >= 3, f"only {mid_write} of {kills} kills landed mid-write"
    assert len(versions) > 1


def test_failed_write_leaves_old_content_and_no_temp_file(tmp_path: Path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})

    def write_half_then_die() -> None:
        with atomic_writer(target, "w") as fh:
            fh.write('{"v": 2, "half')
            raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        write_half_then_die()
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_unserialisable_value_does_not_touch_the_file(tmp_path: Path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(ValueError, match="not JSON compliant"):
        atomic_write_json(target, {"v": float("nan")})  # NaN is not JSON
    with pytest.raises(TypeError):
        atomic_write_json(target, {"v": object()})
    assert json.loads(target.read_text()) == {"v": 1}


def test_replacement_keeps_mode_and_new_files_follow_umask(tmp_path: Path):
    existing = tmp_path / "shared.txt"
    existing.write_text("old")
    existing.chmod(0o640)
    atomic_write_text(existing, "new")
    assert existing.read_text() == "new"
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640

    old_umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.txt"
        atomic_write_text(fresh, "x")
    finally:
        os.umask(old_umask)
    # not the 0600 that a bare mkstemp (or safetensors >= 0.8) leaves behind
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644


def test_temp_names_are_recognisable_for_manifests_and_listings():
    assert is_temp_name(f".model.safetensors{TEMP_MARKER}ab12cd34")
    assert not is_temp_name("model.safetensors")


def test_appended_lines_from_two_processes_never_interleave(tmp_path: Path):
    target = tmp_path / "events.jsonl"
    code = (
        "import json, sys\n"
        "from trainguard.atomic import append_line\n"
        "for i in range(300):\n"
        "    append_line(sys.argv[1], json.dumps({'who': sys.argv[2], 'i': i, 'pad': 'x' * 2000}), fsync=False)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(target), who], env=subprocess_env()) for who in ("a", "b")
    ]
    for p in procs:
        assert p.wait(timeout=60) == 0
    lines = target.read_text().splitlines()
    assert len(lines) == 600
    records = [json.loads(line) for line in lines]  # every line parses: no interleaving
    assert sorted(r["i"] for r in records if r["who"] == "a") == list(range(300))


def test_reader_skips_a_torn_last_line(tmp_path: Path):
    target = tmp_path / "events.jsonl"
    append_line(target, json.dumps({"n": 1}))
    append_line(target, json.dumps({"n": 2}))
    with open(target, "a") as fh:
        fh.write('{"n": 3, "cut')  # a writer killed mid-line
    assert read_jsonl(target) == [{"n": 1}, {"n": 2}]


def test_append_line_refuses_text_that_would_span_lines(tmp_path: Path):
    with pytest.raises(ValueError, match="exactly one line"):
        append_line(tmp_path / "e.jsonl", "a\nb")


def test_a_write_into_a_missing_folder_names_the_folder_not_a_hidden_temp_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError) as caught:
        atomic_write_json(tmp_path / "out" / "state.json", {"step": 50})
    assert caught.value.filename == str(tmp_path / "out")
    assert "its folder does not exist" in str(caught.value) and TEMP_MARKER not in str(caught.value)
