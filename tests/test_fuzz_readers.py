"""Fuzzing every reader of a user's folder: crafted bytes give a TrainGuardError or a clean report, in bounded time,
and nothing is written outside the folder.

Readers covered: manifests (sha256 and metadata), safetensors headers, torch zip archives, the Trainer's JSON state
files, the run lock's holder record, crash records. (JSONL data: ``test_data_fuzz.py``.) Each example copies a real
checkpoint written by ``safetensors``/``torch.save`` and committed by ``write_manifest``, damages one file, and runs
the library functions and the ``trainguard`` command on it. ``deadline`` makes an example that takes too long a
failure, and pytest-timeout bounds each test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from trainguard import TrainGuardError, cli
from trainguard.checks.checkpoint import (
    check_checkpoint,
    latest_verified_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from trainguard.checks.crash_loop import load_runs
from trainguard.checks.run_lock import INFO_NAME, read_holder

from _fuzz import fuzz_settings

FUZZ = fuzz_settings(60)
pytestmark = pytest.mark.timeout(600)

FILES = ("model.safetensors", "optimizer.pt", "trainer_state.json", "config.json")
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
# What a crafted file tends to hold: numbers JSON does not allow, deep nesting, lone surrogates, huge offsets.
NASTY_JSON = st.sampled_from(
    [
        b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, Infinity]}}',
        b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1e999]}}',
        b'{"w": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 8]}}',
        b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [-8, 8]}}',
        b'{"w": {"dtype": "F32", "shape": "x", "data_offsets": "y"}}',
        b'{"w": [1, 2]}',
        b"[" * 5_000 + b"]" * 5_000,
        b'{"a": "\\ud800"}',
        b'{"global_step": "x", "log_history": {}, "stateful_callbacks": [1]}',
        b'{"global_step": 1e999, "best_model_checkpoint": 5}',
        b"\xff\xfe\x00{",
        b"",
    ]
)


@pytest.fixture(scope="module")
def template() -> Iterator[Path]:
    """A real committed checkpoint: safetensors weights, a torch zip optimizer state, the Trainer's JSON files."""
    root = Path(tempfile.mkdtemp(prefix="trainguard-fuzz-template-"))
    ckpt = root / "checkpoint-10"
    ckpt.mkdir()
    save_file({"w": torch.arange(8, dtype=torch.float32), "b": torch.zeros(2)}, str(ckpt / "model.safetensors"))
    torch.save({"state": {0: {"step": torch.tensor(10.0)}}, "param_groups": [{"lr": 0.1}]}, ckpt / "optimizer.pt")
    (ckpt / "trainer_state.json").write_text(
        json.dumps({"global_step": 10, "log_history": [{"loss": 1.0, "step": 10}], "stateful_callbacks": {}})
    )
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    write_manifest(ckpt)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            out[os.path.relpath(path, folder)] = (st_.st_size, st_.st_mtime_ns)
    return out


@contextlib.contextmanager
def sandbox(template: Path) -> Iterator[Path]:
    """A fresh copy of the run (``out/``) beside a folder of someone else's (``outside/``) that must not change."""
    base = Path(tempfile.mkdtemp(prefix="trainguard-fuzz-"))
    try:
        shutil.copytree(template, base / "out", symlinks=True)
        outside = base / "outside"
        outside.mkdir()
        (outside / "precious.txt").write_text("not yours\n")
        before = _snapshot(outside)
        yield base / "out"
        assert _snapshot(outside) == before, "something was written outside the run's folder"
        assert sorted(p.name for p in base.iterdir()) == ["out", "outside"], "something was created beside the run"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def read_every_way(out: Path) -> None:
    """Every reader, library and command: a TrainGuardError or a report, nothing else."""
    ckpt = out / "checkpoint-10"
    report = check_checkpoint(ckpt)
    assert isinstance(report.ok, bool)
    json.dumps(report.to_dict())
    str(report)
    with contextlib.suppress(TrainGuardError):
        verify_checkpoint(ckpt)
    found = latest_verified_checkpoint(out, lineage=None)
    assert found is None or Path(found).name == "checkpoint-10"
    for argv in (["verify", str(out), "--json"], ["verify", str(ckpt)], ["inspect", str(out), "--json"]):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(argv)
        assert code in (0, 1, 2), (argv, code)
        assert "Traceback" not in stderr.getvalue(), stderr.getvalue()
        if "--json" in argv:
            json.loads(stdout.getvalue())


def test_the_template_checkpoint_verifies(template: Path) -> None:
    # Without this, every fuzz test below could pass on a checkpoint that never verified in the first place.
    with sandbox(template) as out:
        assert check_checkpoint(out / "checkpoint-10").ok
        assert latest_verified_checkpoint(out, lineage=None) is not None


@FUZZ
@given(name=st.sampled_from(FILES), offset=st.integers(min_value=0, max_value=4000), data=st.binary(min_size=1))
def test_flipped_bytes_in_any_checkpoint_file_are_reported(template: Path, name: str, offset: int, data: bytes) -> None:
    with sandbox(template) as out:
        path = out / "checkpoint-10" / name
        blob = bytearray(path.read_bytes())
        offset %= len(blob)
        blob[offset : offset + len(data)] = data
        path.write_bytes(bytes(blob))
        read_every_way(out)
        assert (
            not check_checkpoint(out / "checkpoint-10").ok
            or bytes(blob) == (template / "checkpoint-10" / name).read_bytes()
        )


@FUZZ
@given(header=NASTY_JSON | JSON_VALUES.map(lambda v: json.dumps(v).encode()), declared=st.integers(-10, 1 << 40))
def test_crafted_safetensors_headers_are_reported(template: Path, header: bytes, declared: int) -> None:
    with sandbox(template) as out:
        for ckpt_file in ("trainguard-manifest.sha256", "trainguard-manifest.json"):
            (out / "checkpoint-10" / ckpt_file).unlink()  # structural checks only: the header is what is read
        path = out / "checkpoint-10" / "model.safetensors"
        length = declared if declared >= 0 else len(header)
        path.write_bytes(max(0, length).to_bytes(8, "little", signed=False)[:8] + header + b"\0" * 16)
        read_every_way(out)


@FUZZ
@given(
    name=st.sampled_from(
        ["trainer_state.json", "config.json", "trainguard-manifest.json", "trainguard-manifest.sha256"]
    ),
    content=NASTY_JSON | JSON_VALUES.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=300),
    keep_manifest=st.booleans(),
)
def test_crafted_json_state_and_manifests_are_reported(
    template: Path, name: str, content: bytes, keep_manifest: bool
) -> None:
    with sandbox(template) as out:
        ckpt = out / "checkpoint-10"
        (ckpt / name).write_bytes(content)
        if not keep_manifest and name not in ("trainguard-manifest.json", "trainguard-manifest.sha256"):
            (ckpt / "trainguard-manifest.sha256").unlink()
        read_every_way(out)


@FUZZ
@given(data=st.binary(max_size=2000), entries=st.integers(min_value=0, max_value=3))
def test_crafted_torch_zip_archives_are_reported(template: Path, data: bytes, entries: int) -> None:
    import zipfile

    with sandbox(template) as out:
        ckpt = out / "checkpoint-10"
        (ckpt / "trainguard-manifest.sha256").unlink()
        path = ckpt / "optimizer.pt"
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("archive/data.pkl", data)
            for i in range(entries):
                archive.writestr(f"archive/data/{i}", data[: 100 * i])
        blob = bytearray(buf.getvalue())
        if data:  # damage the central directory too, at a place the data picks
            blob[-(1 + data[0] % min(len(blob), 60))] ^= 0xFF
        path.write_bytes(bytes(blob))
        read_every_way(out)


@FUZZ
@given(content=NASTY_JSON | JSON_VALUES.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=300))
def test_crafted_lock_holder_records_are_reported(template: Path, content: bytes) -> None:
    with sandbox(template) as out:
        (out / INFO_NAME).write_bytes(content)
        holder = read_holder(out / INFO_NAME)
        json.dumps(holder, default=str)
        read_every_way(out)


@FUZZ
@given(
    lines=st.lists(NASTY_JSON | JSON_VALUES.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=120), max_size=6)
)
def test_crafted_crash_records_are_reported(template: Path, lines: list[bytes]) -> None:
    from trainguard.checks.crash_loop import crash_log_path

    with sandbox(template) as out:
        crash_log_path(out).write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
        with contextlib.suppress(TrainGuardError):
            runs: Any = load_runs(out, warn=False)
            assert isinstance(runs, list)
        read_every_way(out)
