"""Manifests and verification on real checkpoints written by a real Trainer (tiny Llama, CPU)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

import trainguard
from trainguard.atomic import TEMP_MARKER
from trainguard.checks import checkpoint as ckpt
from trainguard.errors import CheckpointIntegrityError

from _rig import run_trainer

# Every kind of file a plain (non-PEFT) Trainer checkpoint holds.
CHECKPOINT_FILES = [
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
    "rng_state.pth",
    "training_args.bin",
    "config.json",
    "generation_config.json",
]
SEED = int(os.environ.get("TRAINGUARD_TEST_SEED", "20240607"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run with CheckpointVerifier: checkpoint-2 and checkpoint-4, each with its manifest."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    run_trainer(out, callbacks=[trainguard.CheckpointVerifier()], save_strategy="steps", save_steps=2, max_steps=4)
    return out


@pytest.fixture
def run(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run that a test may damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def _flip(path: Path, rng: random.Random) -> int:
    data = bytearray(path.read_bytes())
    offset = rng.randrange(len(data))
    data[offset] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return offset


def _truncate(path: Path, rng: random.Random) -> int:
    size = path.stat().st_size
    keep = rng.randrange(size)
    with open(path, "r+b") as fh:
        fh.truncate(keep)
    return keep


def _sha256sum_check(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sha256sum", "-c", "--strict", ckpt.MANIFEST_NAME], cwd=folder, capture_output=True, text=True, check=False
    )


# ------------------------------------------------------------------------------------------ the manifest
def test_manifest_covers_every_file_and_gnu_sha256sum_accepts_it(run: Path):
    folder = run / "checkpoint-4"
    listed = ckpt.parse_sha256_file(folder / ckpt.MANIFEST_NAME)
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {ckpt.MANIFEST_NAME}
    assert set(CHECKPOINT_FILES) <= set(listed)
    assert ckpt.METADATA_NAME in listed  # the metadata is itself covered by the marker

    result = _sha256sum_check(folder)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": OK") == len(listed)


def test_manifest_metadata_records_sizes_step_time_and_versions(run: Path):
    folder = run / "checkpoint-4"
    meta = json.loads((folder / ckpt.METADATA_NAME).read_text())
    assert meta["format"] == ckpt.MANIFEST_FORMAT
    assert meta["step"] == 4
    assert meta["created_utc"].endswith("Z")
    assert {"trainguard", "python", "torch", "transformers", "safetensors"} <= set(meta["versions"])
    for name in CHECKPOINT_FILES:
        assert meta["files"][name]["size"] == (folder / name).stat().st_size


def test_rewriting_a_manifest_keeps_the_folder_mtime_that_rotation_sorts_by(run: Path):
    folder = run / "checkpoint-2"
    os.utime(folder, (1_000_000_000, 1_000_000_000))
    ckpt.write_manifest(folder)
    assert folder.stat().st_mtime == 1_000_000_000
    assert ckpt.verify_checkpoint(folder).ok


def test_parallel_hashing_matches_hashlib_and_names_with_newlines_round_trip_through_sha256sum(tmp_path: Path):
    folder = tmp_path / "odd"
    (folder / "sub").mkdir(parents=True)
    names = ["plain.bin", "sub/nested.txt", "back\\slash", "new\nline", "space name.json"]
    rng = random.Random(SEED)
    for name in names:
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5000)))
        (folder / name).write_bytes(payload if not name.endswith(".json") else b"{}")
    ckpt.write_manifest(folder, workers=4)
    listed = ckpt.parse_sha256_file(folder / ckpt.MANIFEST_NAME)
    assert set(listed) == {*names, ckpt.METADATA_NAME}
    import hashlib

    for name in names:
        assert listed[name] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    result = _sha256sum_check(folder)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ckpt.verify_checkpoint(folder).ok


# ------------------------------------------------------------------------------------ damage is caught
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_random_single_byte_flips_are_caught_naming_the_file(run: Path, name: str):
    folder = run / "checkpoint-4"
    rng = random.Random(f"{SEED}-flip-{name}")
    original = (folder / name).read_bytes()
    for _ in range(4):
        offset = _flip(folder / name, rng)
        with pytest.raises(CheckpointIntegrityError) as info:
            trainguard.verify_checkpoint(folder)
        err = info.value
        assert err.where["file"] == str(folder / name), (offset, err)
        assert {p["file"] for p in err.evidence["problems"]} == {name}, (offset, err.evidence)
        assert str(run / "checkpoint-2") in err.next_step
        assert trainguard.latest_verified_checkpoint(run) == run / "checkpoint-2"
        (folder / name).write_bytes(original)
    assert trainguard.verify_checkpoint(folder).ok
    _flip(folder / name, rng)
    assert _sha256sum_check(folder).returncode != 0  # and GNU sha256sum agrees


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_random_truncations_are_caught_by_the_size_check_before_any_hashing(run: Path, name: str):
    folder = run / "checkpoint-4"
    rng = random.Random(f"{SEED}-truncate-{name}")
    original = (folder / name).read_bytes()
    for _ in range(3):
        keep = _truncate(folder / name, rng)
        report = ckpt.check_checkpoint(folder, stop_early=True)
        assert not report.ok
        assert [(p.file, p.kind) for p in report.problems] == [(name, "truncated")], (keep, report.problems)
        assert f"{keep} bytes" in report.problems[0].detail
        assert report.hashed_bytes <= (folder / ckpt.METADATA_NAME).stat().st_size  # nothing else was hashed
        assert trainguard.latest_verified_checkpoint(run) == run / "checkpoint-2"
        (folder / name).write_bytes(original)


def test_every_problem_is_named_in_one_error(run: Path):
    folder = run / "checkpoint-4"
    _flip(folder / "model.safetensors", random.Random(1))
    (folder / "scheduler.pt").unlink()
    _truncate(folder / "optimizer.pt", random.Random(2))
    shutil.copy(folder / "rng_state.pth", folder / "rng_state_3.pth")  # a stale file a resume would load
    with pytest.raises(CheckpointIntegrityError) as info:
        trainguard.verify_checkpoint(folder)
    kinds = {p["file"]: p["kind"] for p in info.value.evidence["problems"]}
    assert kinds == {
        "model.safetensors": "changed",
        "scheduler.pt": "missing",
        "optimizer.pt": "truncated",
        "rng_state_3.pth": "extra",
    }
    for name in kinds:
        assert name in info.value.what
    assert "files" in info.value.where


def test_damaged_safetensors_header_is_a_structural_failure_even_with_the_same_size(run: Path):
    folder = run / "checkpoint-4"
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[9] = ord("!")  # inside the JSON header, right after its opening brace
    path.write_bytes(bytes(data))
    report = ckpt.check_checkpoint(folder, stop_early=True)
    assert [(p.file, p.kind) for p in report.problems] == [("model.safetensors", "malformed")]
    assert "header" in report.problems[0].detail


# ------------------------------------------------------------------------------------ interrupted saves
def test_a_folder_without_manifest_in_a_run_with_manifests_is_an_interrupted_save(run: Path):
    (run / "checkpoint-4" / ckpt.MANIFEST_NAME).unlink()
    report = ckpt.check_checkpoint(run / "checkpoint-4")
    assert not report.ok
    assert report.problems[0].kind == "interrupted"
    assert "killed while the manifest was being written" in report.problems[0].detail  # the JSON is there
    assert trainguard.latest_verified_checkpoint(run) == run / "checkpoint-2"
    # The run marker keeps that judgement when no manifested sibling is left (rotation, set-aside)
    shutil.rmtree(run / "checkpoint-2")
    assert not ckpt.check_checkpoint(run / "checkpoint-4").ok
    assert trainguard.latest_verified_checkpoint(run) is None


def test_leftovers_of_an_interrupted_write_fail_verification(run: Path):
    folder = run / "checkpoint-4"
    (folder / ".tmpAbC123").write_bytes(b"half a tensor")
    report = ckpt.check_checkpoint(folder)
    assert {(p.file, p.kind) for p in report.problems} == {(".tmpAbC123", "interrupted")}
    # trainguard's own temporary files (a manifest write killed before its rename) are not evidence of anything
    (folder / ".tmpAbC123").unlink()
    (folder / f".{ckpt.MANIFEST_NAME}{TEMP_MARKER}dead").write_text("x")
    assert ckpt.check_checkpoint(folder).ok


def test_the_jit_sentinel_marks_a_folder_without_manifest_interrupted_but_is_stale_beside_a_commit_marker(run: Path):
    folder = run / "checkpoint-4"
    (folder / ckpt.JIT_SENTINEL).write_text("Checkpoint started at step 4 and in progress...")
    report = ckpt.check_checkpoint(folder)
    assert report.ok  # the marker is written only after the Trainer's save returned: the sentinel is a leftover
    assert [(w.file, w.kind) for w in report.warnings] == [(ckpt.JIT_SENTINEL, "stale")]
    (folder / ckpt.MANIFEST_NAME).unlink()
    (folder / ckpt.METADATA_NAME).unlink()
    report = ckpt.check_checkpoint(folder)
    assert [(p.file, p.kind) for p in report.problems] == [(ckpt.JIT_SENTINEL, "interrupted")]


def test_set_aside_renames_into_quarantine_outside_the_trainers_checkpoint_glob(run: Path):
    target = ckpt.set_aside_checkpoint(run / "checkpoint-4", "test reason")
    assert not (run / "checkpoint-4").exists()
    assert target.parent == run / ckpt.QUARANTINE_DIR
    assert (target / "model.safetensors").is_file()  # moved whole, nothing deleted
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-2"]  # rotation's glob cannot reach it
    reason = json.loads((target.parent / f"{target.name}.reason.json").read_text())
    assert reason["reason"] == "test reason"


# ------------------------------------------------------------------------------------------- adopt mode
def _as_a_run_without_trainguard(run: Path) -> None:
    (run / ckpt.RUN_MARKER).unlink()
    for folder in run.glob("checkpoint-*"):
        (folder / ckpt.MANIFEST_NAME).unlink()
        (folder / ckpt.METADATA_NAME).unlink()


def test_a_run_without_any_manifest_is_checked_structurally_and_says_so(run: Path, caplog: pytest.LogCaptureFixture):
    _as_a_run_without_trainguard(run)
    report = trainguard.verify_checkpoint(run / "checkpoint-4")
    assert report.mode == "structural"
    assert any("structural checks only" in note for note in report.notes)

    _truncate(run / "checkpoint-4" / "model.safetensors", random.Random(3))
    _flip_inside_zip_member(run / "checkpoint-2" / "optimizer.pt")
    with caplog.at_level("INFO", logger="trainguard"):
        assert trainguard.latest_verified_checkpoint(run) is None
    assert "structural checks only" in caplog.text
    problems = {p.file: p.detail for p in ckpt.check_checkpoint(run / "checkpoint-2").problems}
    assert "CRC-32" in problems["optimizer.pt"]  # zip CRCs catch a flip in torch files even without a manifest


def _flip_inside_zip_member(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.compress_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_checkpoint_without_trainer_state_fails_the_structural_checks(run: Path):
    _as_a_run_without_trainguard(run)
    (run / "checkpoint-4" / "trainer_state.json").unlink()
    problems = ckpt.check_checkpoint(run / "checkpoint-4").problems
    assert ("trainer_state.json", "missing") in {(p.file, p.kind) for p in problems}


# ---- issue #28 item 3: work linear in the number of files ----
def _many_small_files(root: Path, count: int) -> Path:
    for i in range(count):
        sub = root / f"shard-{i % 20:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"state-{i:05d}.bin").write_bytes(i.to_bytes(4, "little") * 8)
    return root


def test_many_small_files_are_hashed_in_a_few_batches_with_a_bounded_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from concurrent.futures import ThreadPoolExecutor

    from trainguard.checks.checkpoint import manifest

    folder = _many_small_files(tmp_path / "ckpt", 3000)
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*.bin")]
    submitted, in_flight, most = [0], [0], [0]
    real_submit = ThreadPoolExecutor.submit

    def counting_submit(self: ThreadPoolExecutor, fn: object, /, *args: object, **kwargs: object) -> object:
        submitted[0] += 1
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        future = real_submit(self, fn, *args, **kwargs)  # type: ignore[arg-type]
        future.add_done_callback(lambda _: in_flight.__setitem__(0, in_flight[0] - 1))
        return future

    monkeypatch.setattr(ThreadPoolExecutor, "submit", counting_submit)
    digests = manifest.hash_many(folder, names, {n: 32 for n in names}, workers=2)

    assert len(digests) == 3000 and all(isinstance(d, str) and len(d) == 64 for d in digests.values())
    assert digests[names[0]] == ckpt.sha256_file(folder / names[0])
    # one future per 300-byte file, all waited on at once, made the work quadratic (131 s for 20k files)
    assert submitted[0] <= 3000 // 256 + 1, submitted[0]
    assert most[0] <= 4 * 2


def test_a_manifest_of_thousands_of_files_syncs_the_filesystem_once_instead_of_a_fsync_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from trainguard import atomic
    from trainguard.checks.checkpoint import manifest

    if not atomic.can_sync_filesystem():
        pytest.skip("no syncfs here (not Linux): the per-file fsync path is the only one")
    folder = _many_small_files(tmp_path / "checkpoint-7", 1500)
    fsyncs, syncs = [0], [0]
    real_fsync, real_sync = os.fsync, atomic.sync_filesystem
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.__setitem__(0, fsyncs[0] + 1), real_fsync(fd))[1])
    monkeypatch.setattr(manifest, "sync_filesystem", lambda p: (syncs.__setitem__(0, syncs[0] + 1), real_sync(p))[1])

    ckpt.write_manifest(folder)

    assert syncs[0] == 1
    assert fsyncs[0] < 50, fsyncs[0]  # the 20 subfolders and the manifest's own files, not one per file
    report = ckpt.verify_checkpoint(folder)
    assert report.ok and report.mode == "manifest"
    # past a thousand files the JSON is compact (json's indenting encoder is pure Python); it reads the same
    assert "\n" not in (folder / ckpt.METADATA_NAME).read_text().strip()
    assert len(json.loads((folder / ckpt.METADATA_NAME).read_text())["files"]) == 1500


def test_without_a_filesystem_sync_every_file_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from trainguard.checks.checkpoint import manifest

    folder = _many_small_files(tmp_path / "checkpoint-7", 600)
    monkeypatch.setattr(manifest, "can_sync_filesystem", lambda: False)
    fsyncs = [0]
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.__setitem__(0, fsyncs[0] + 1), real_fsync(fd))[1])
    ckpt.write_manifest(folder)
    assert fsyncs[0] >= 600
    assert ckpt.verify_checkpoint(folder).ok
