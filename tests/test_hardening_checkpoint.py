"""Hostile and broken checkpoints: nothing verifies that describes no checkpoint, no crafted file crashes a check raw
or stalls it, nothing special is ever opened, and nothing is moved out of output_dir through a planted link.

Every checkpoint here is built from real files on disk (real FIFOs, sockets, links, crafted zip archives and
safetensors headers); none needs a Trainer.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import zipfile
from pathlib import Path

import pytest

import trainguard
from trainguard.checks import checkpoint as ckpt
from trainguard.checks._resume import read_trainer_state
from trainguard.checks.checkpoint.manifest import hash_many, sha256_file
from trainguard.errors import CheckpointIntegrityError, TrainGuardError, UnsafeFileError

DEEP = 200_000


def _safetensors(header: dict | str, data: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw + data


def _weights() -> bytes:
    return _safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)


def _state(step: int, **fields: object) -> str:
    return json.dumps({"global_step": step, "log_history": [], "stateful_callbacks": {}, **fields})


def _checkpoint(out: Path, step: int, *, manifest: bool = True) -> Path:
    """A small, complete checkpoint-N: weights, config, trainer state; committed with a manifest unless told."""
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(_weights())
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "trainer_state.json").write_text(_state(step))
    if manifest:
        ckpt.write_manifest(folder)
    return folder


def _kinds(report: ckpt.CheckpointReport) -> set[tuple[str, str]]:
    return {(p.file, p.kind) for p in report.problems}


# ------------------------------------------------------------------------------------ no false "verified"
def test_an_empty_manifest_in_an_empty_checkpoint_does_not_verify(tmp_path: Path):
    out = tmp_path / "run"
    folder = out / "checkpoint-10"
    folder.mkdir(parents=True)
    ckpt.write_manifest(folder)
    report = ckpt.check_checkpoint(folder)
    assert not report.ok
    assert (ckpt.MANIFEST_NAME, "empty") in _kinds(report)
    assert "does not describe a checkpoint" in report.describe()
    with pytest.raises(CheckpointIntegrityError, match="does not describe a checkpoint"):
        ckpt.verify_checkpoint(folder)
    assert trainguard.latest_verified_checkpoint(out) is None


def test_a_manifest_of_a_readme_alone_does_not_verify_but_a_legacy_empty_folder_neither(tmp_path: Path):
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "README.md").write_text("notes")
    ckpt.write_manifest(folder)
    assert ("trainguard-manifest.sha256", "empty") in _kinds(ckpt.check_checkpoint(folder))
    bare = tmp_path / "bare"
    bare.mkdir()
    assert ("", "empty") in _kinds(ckpt.check_checkpoint(bare))


def _peft(folder: Path) -> None:
    (folder / "adapter_model.safetensors").write_bytes(_weights())
    (folder / "adapter_config.json").write_text('{"r": 8}')


def _deepspeed(folder: Path) -> None:
    import torch

    (folder / "global_step10").mkdir()
    torch.save({"state": {}}, folder / "global_step10" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"module": {}}, folder / "global_step10" / "mp_rank_00_model_states.pt")
    (folder / "latest").write_text("global_step10")


def _dcp(folder: Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.zeros(4)}, checkpoint_id=str(folder / "pytorch_model_fsdp_0"))


def _model_only(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(_weights())
    (folder / "trainer_state.json").write_text(_state(10))


@pytest.mark.parametrize("layout", [_peft, _deepspeed, _dcp, _model_only], ids=lambda f: f.__name__.strip("_"))
def test_every_known_layout_still_verifies_with_its_manifest(tmp_path: Path, layout):
    folder = tmp_path / "run" / "checkpoint-10"
    folder.mkdir(parents=True)
    layout(folder)
    ckpt.write_manifest(folder)
    report = ckpt.check_checkpoint(folder)
    assert report.ok, report.describe()
    assert report.status == "verified"


@pytest.mark.timeout(30)
def test_a_fifo_a_socket_and_a_link_to_a_folder_inside_a_checkpoint_are_reported_never_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    folder = _checkpoint(tmp_path / "run", 10)
    os.mkfifo(folder / "notes.fifo")
    os.symlink(tmp_path, folder / "elsewhere")
    monkeypatch.chdir(folder)  # a socket path must be short: bind it by its relative name
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind("agent.sock")
        report = ckpt.check_checkpoint(folder)
    finally:
        sock.close()
    kinds = _kinds(report)
    assert {("notes.fifo", "special"), ("elsewhere", "special"), ("agent.sock", "special")} <= kinds
    details = {p.file: p.detail for p in report.problems}
    assert "FIFO" in details["notes.fifo"]
    assert "socket" in details["agent.sock"]
    assert "folder" in details["elsewhere"]


@pytest.mark.timeout(30)
def test_a_fifo_in_a_legacy_checkpoint_named_like_a_weights_file_fails_without_blocking(tmp_path: Path):
    folder = _checkpoint(tmp_path / "run", 10, manifest=False)
    os.mkfifo(folder / "model-00002-of-00002.safetensors")
    report = ckpt.check_checkpoint(folder)
    assert ("model-00002-of-00002.safetensors", "special") in _kinds(report)


@pytest.mark.timeout(30)
def test_hashing_refuses_a_fifo_instead_of_blocking_on_it(tmp_path: Path):
    os.mkfifo(tmp_path / "pipe.bin")
    with pytest.raises(UnsafeFileError, match="FIFO"):
        sha256_file(tmp_path / "pipe.bin")
    result = hash_many(tmp_path, ["pipe.bin"], {}, 2)
    assert isinstance(result["pipe.bin"], UnsafeFileError)


def test_leftover_temp_files_and_a_nested_manifest_are_reported_as_warnings(tmp_path: Path):
    folder = _checkpoint(tmp_path / "run", 10)
    (folder / ".model.safetensors.trainguard-tmp-dead").write_bytes(b"half")
    (folder / "copy").mkdir()
    (folder / "copy" / ckpt.MANIFEST_NAME).write_text("")
    report = ckpt.check_checkpoint(folder)
    assert report.ok, report.describe()
    warned = {(w.file, w.kind) for w in report.warnings}
    assert (".model.safetensors.trainguard-tmp-dead", "stale") in warned
    assert (f"copy/{ckpt.MANIFEST_NAME}", "nested") in warned


def test_a_link_out_of_the_checkpoint_fails_verification_unless_allowed(tmp_path: Path):
    out = tmp_path / "run"
    folder = _checkpoint(out, 10)
    outside = tmp_path / "shared-weights.safetensors"
    outside.write_bytes(_weights())
    (folder / "model.safetensors").unlink()
    os.symlink(outside, folder / "model.safetensors")  # same bytes: the sha256 alone would pass it
    report = ckpt.check_checkpoint(folder)
    assert ("model.safetensors", "link") in _kinds(report)
    assert str(outside) in report.describe()
    with pytest.raises(CheckpointIntegrityError, match="allow_links_out"):
        ckpt.verify_checkpoint(folder)
    assert trainguard.latest_verified_checkpoint(out) is None
    assert ckpt.verify_checkpoint(folder, allow_links_out=True).ok
    assert trainguard.latest_verified_checkpoint(out, allow_links_out=True) == folder


def test_a_link_between_files_of_the_same_checkpoint_still_verifies(tmp_path: Path):
    folder = _checkpoint(tmp_path / "run", 10, manifest=False)
    os.symlink("config.json", folder / "generation_config.json")
    ckpt.write_manifest(folder)
    assert ckpt.check_checkpoint(folder).ok


# --------------------------------------------------------------------------- crafted files: findings, not crashes
_CRAFTED_HEADERS = {
    "infinity_offset": '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, Infinity]}}',
    "overflowing_offset": '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1e999]}}',
    "negative_offset": '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}',
    "fractional_offset": '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 7.5]}}',
    "text_shape": '{"w": {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 8]}}',
    "entry_not_an_object": '{"w": [1, 2]}',
    "deep_json": '{"w": ' + "[" * DEEP + "]" * DEEP + "}",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manifest", [False, True], ids=["legacy", "manifest"])
@pytest.mark.parametrize("case", sorted(_CRAFTED_HEADERS))
def test_a_crafted_safetensors_header_is_a_reported_failure_never_a_raw_exception(
    tmp_path: Path, case: str, manifest: bool
):
    out = tmp_path / "run"
    folder = _checkpoint(out, 10, manifest=False)
    (folder / "model.safetensors").write_bytes(_safetensors(_CRAFTED_HEADERS[case], b"\0" * 8))
    if manifest:
        ckpt.write_manifest(folder)
        (folder / "model.safetensors").write_bytes(_safetensors(_CRAFTED_HEADERS[case], b"\1" * 8))
    report = ckpt.check_checkpoint(folder)
    assert not report.ok
    assert any(p.file == "model.safetensors" for p in report.problems), report.describe()
    with pytest.raises(CheckpointIntegrityError):
        ckpt.verify_checkpoint(folder)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["config.json", "trainer_state.json"])
def test_json_nested_200k_deep_is_a_reported_failure_never_a_recursion_error(tmp_path: Path, name: str):
    out = tmp_path / "run"
    good = _checkpoint(out, 10)
    folder = _checkpoint(out, 20, manifest=False)
    (folder / name).write_text("[" * DEEP + "]" * DEEP)
    report = ckpt.check_checkpoint(folder)
    assert (name, "malformed") in _kinds(report), report.describe()
    ckpt.write_manifest(folder)  # committed as it is: the Trainer still could not load it
    if name == "trainer_state.json":
        assert (name, "malformed") in _kinds(ckpt.check_checkpoint(folder))
        assert trainguard.resolve_verified_resume(out, True) == good
        assert not folder.exists()  # set aside, not deleted
        assert any(p.name.startswith("checkpoint-20.") for p in (out / ckpt.QUARANTINE_DIR).iterdir())
    else:
        ckpt.check_checkpoint(folder)  # listed and unchanged: a note, and no RecursionError either


@pytest.mark.parametrize(
    "fields",
    [{"stateful_callbacks": [1]}, {"global_step": "x"}, {"log_history": {}}, {"stateful_callbacks": {"Guard": 1}}],
    ids=["callbacks_list", "step_text", "history_object", "callback_number"],
)
def test_a_trainer_state_of_wrong_types_fails_verification_and_the_resume_falls_back(tmp_path: Path, fields):
    out = tmp_path / "run"
    good = _checkpoint(out, 10)
    folder = _checkpoint(out, 20, manifest=False)
    (folder / "trainer_state.json").write_text(json.dumps({**json.loads(_state(20)), **fields}))
    ckpt.write_manifest(folder)
    field = next(iter(fields))
    report = ckpt.check_checkpoint(folder)
    assert ("trainer_state.json", "malformed") in _kinds(report)
    assert field in report.describe()
    with pytest.raises(CheckpointIntegrityError) as raised:
        read_trainer_state(folder)
    assert raised.value.where["field"].startswith(field)
    assert trainguard.resolve_verified_resume(out, True) == good


def test_a_trainer_state_of_wrong_types_does_not_crash_archiving(tmp_path: Path):
    out = tmp_path / "run"
    folder = _checkpoint(out, 10)
    (folder / "trainer_state.json").write_text(_state(10, stateful_callbacks=[1]))
    archive = trainguard.start_fresh(out)
    assert archive is not None and (archive / "checkpoint-10").is_dir()


def _deflated_zip(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", payload)


def test_a_zip_whose_deflate_stream_is_damaged_is_reported_not_a_raw_zlib_error(tmp_path: Path):
    folder = _checkpoint(tmp_path / "run", 10, manifest=False)
    path = folder / "optimizer.pt"
    _deflated_zip(path, bytes(range(256)) * 64)
    data = bytearray(path.read_bytes())
    start = 30 + len("archive/data.pkl")
    data[start : start + 40] = b"\xff" * 40  # an invalid deflate block: zlib.error, not a CRC mismatch
    path.write_bytes(bytes(data))
    report = ckpt.check_checkpoint(folder)
    assert ("optimizer.pt", "malformed") in _kinds(report), report.describe()


def _zip_bomb(path: Path, copies: int) -> None:
    """One 100 MB deflated member, listed ``copies`` times in the central directory (a 100 KB file)."""
    _deflated_zip(path, b"\0" * (100 << 20))
    data = path.read_bytes()
    eocd = data.rindex(b"PK\x05\x06")
    _sig, _disk, _cd_disk, _n_disk, _n, cd_size, cd_offset, _comment = struct.unpack(
        "<IHHHHIIH", data[eocd : eocd + 22]
    )
    entry = data[cd_offset : cd_offset + cd_size]
    directory = entry * copies
    tail = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, copies, copies, len(directory), cd_offset, 0)
    path.write_bytes(data[:cd_offset] + directory + tail)


@pytest.mark.timeout(60)
def test_a_zip_bomb_of_one_member_listed_thousands_of_times_is_refused_in_seconds(tmp_path: Path):
    folder = _checkpoint(tmp_path / "run", 10, manifest=False)
    _zip_bomb(folder / "optimizer.pt", 3000)
    assert (folder / "optimizer.pt").stat().st_size < 1 << 20
    report = ckpt.check_checkpoint(folder)
    problem = next(p for p in report.problems if p.file == "optimizer.pt")
    assert "overlap" in problem.detail


def test_a_real_torch_file_with_a_changed_byte_still_fails_its_crc_without_a_manifest(tmp_path: Path):
    import torch

    folder = _checkpoint(tmp_path / "run", 10, manifest=False)
    torch.save({"step": torch.arange(64, dtype=torch.float32)}, folder / "optimizer.pt")
    assert ckpt.check_checkpoint(folder).ok
    data = bytearray((folder / "optimizer.pt").read_bytes())
    offset = data.index(struct.pack("<f", 33.0))
    data[offset] ^= 1
    (folder / "optimizer.pt").write_bytes(bytes(data))
    assert "CRC-32" in ckpt.check_checkpoint(folder).describe()


def test_a_member_placed_beyond_the_end_of_the_file_is_reported(tmp_path: Path):
    folder = _checkpoint(tmp_path / "run", 10, manifest=False)
    path = folder / "optimizer.pt"
    _deflated_zip(path, b"x" * 1000)
    data = bytearray(path.read_bytes())
    cd = data.index(b"PK\x01\x02")
    data[cd + 42 : cd + 46] = struct.pack("<I", 1 << 30)  # the member's local header offset
    path.write_bytes(bytes(data))
    report = ckpt.check_checkpoint(folder)
    assert any(p.file == "optimizer.pt" for p in report.problems), report.describe()


# ---------------------------------------------------------------------------------- non-UTF-8 names
def test_a_file_name_that_is_not_utf8_is_hashed_verified_and_reported_printably(tmp_path: Path):
    folder = _checkpoint(tmp_path / "run", 10, manifest=False)
    odd = os.fsdecode(b"notes-\xff.txt")
    (folder / odd).write_text("x")
    ckpt.write_manifest(folder)
    assert ckpt.check_checkpoint(folder).ok
    (folder / odd).write_text("changed")
    report = ckpt.check_checkpoint(folder)
    assert [p.kind for p in report.problems] == ["changed"]
    text = json.dumps(report.to_dict(), ensure_ascii=False)
    text.encode("utf-8")
    report.describe().encode("utf-8")
    assert "notes-\\xff.txt" in report.describe()
    with pytest.raises(CheckpointIntegrityError) as raised:
        ckpt.verify_checkpoint(folder)
    str(raised.value).encode("utf-8")


# ---------------------------------------------------------------------------- writes through planted links
def test_a_planted_link_at_the_quarantine_folder_moves_nothing_out_of_output_dir(tmp_path: Path):
    out = tmp_path / "run"
    _checkpoint(out, 10)
    bad = _checkpoint(out, 20)
    (bad / "model.safetensors").write_bytes(_safetensors({}, b""))
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir()
    os.symlink(elsewhere, out / ckpt.QUARANTINE_DIR)
    with pytest.raises(UnsafeFileError) as raised:
        trainguard.latest_verified_checkpoint(out, set_aside=True)
    assert ckpt.QUARANTINE_DIR in raised.value.where["file"]
    assert bad.is_dir()
    assert list(elsewhere.iterdir()) == []


def test_a_planted_link_at_the_archive_folder_moves_nothing_out_of_output_dir(tmp_path: Path):
    out = tmp_path / "run"
    folder = _checkpoint(out, 10)
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir()
    os.symlink(elsewhere, out / ckpt.ARCHIVE_DIR)
    with pytest.raises(UnsafeFileError) as raised:
        trainguard.start_fresh(out)
    assert ckpt.ARCHIVE_DIR in raised.value.where["file"]
    assert isinstance(raised.value, TrainGuardError)
    assert folder.is_dir()
    assert list(elsewhere.iterdir()) == []


def test_a_recorded_fact_beyond_float_range_is_compared_not_crashed_on():
    from trainguard.checks.checkpoint.attest import compare_facts

    findings = compare_facts({"next_lr": 10**400}, {"next_lr": 0.1}, model_only=False)
    assert [f.level for f in findings] == ["error"]


@pytest.mark.timeout(30)
def test_a_fifo_at_a_dcp_metadata_is_reported_without_blocking(tmp_path: Path):
    folder = _checkpoint(tmp_path / "run", 10, manifest=False)
    (folder / "pytorch_model_fsdp_0").mkdir()
    (folder / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"\0" * 16)
    os.mkfifo(folder / "pytorch_model_fsdp_0" / ".metadata")
    kinds = _kinds(ckpt.check_checkpoint(folder))
    assert ("pytorch_model_fsdp_0/.metadata", "special") in kinds


@pytest.mark.timeout(30)
def test_a_fifo_at_a_deepspeed_model_state_is_reported_without_blocking(tmp_path: Path):
    folder = _checkpoint(tmp_path / "run", 10, manifest=False)
    _deepspeed(folder)
    (folder / "global_step10" / "mp_rank_00_model_states.pt").unlink()
    os.mkfifo(folder / "global_step10" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    kinds = _kinds(ckpt.check_checkpoint(folder))
    assert ("global_step10/zero_pp_rank_0_mp_rank_00_model_states.pt", "special") in kinds
