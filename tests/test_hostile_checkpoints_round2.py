"""Hostile checkpoints, round 2: a crafted DCP ``.metadata`` runs nothing, a zip flagged "encrypted" is a failed
check, and folders nested deeper than Python's recursion limit are walked, not crashed on.

Every folder here is real files on disk; the resume cases use the real ``Trainer`` with ``all_guards()``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

import trainguard
from trainguard import cli
from trainguard.checks import checkpoint as ckpt
from trainguard.checks.checkpoint import layouts
from trainguard.errors import TrainGuardError

DEEP_LEVELS = 1_500  # deeper than the default recursion limit (1,000), well under PATH_MAX with one-letter names


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path: Path):
    # pytest's own clean-up of old tmp_path folders uses shutil.rmtree, which recurses a level at a time before
    # Python 3.12: a deep tree left behind would end a later pytest session with RecursionError.
    from trainguard.safe_fs import remove_tree

    yield
    remove_tree(tmp_path)


def _payload(module: str, name: str, argument: str) -> bytes:
    """A protocol-4 pickle that calls ``module``'s ``name`` (a dotted name allowed) with one string argument."""
    proto = b"\x80\x04"

    def unicode(text: str) -> bytes:
        raw = text.encode()
        return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE

    return proto + unicode(module) + unicode(name) + b"\x93" + unicode(argument) + b"\x85" + b"R" + b"."


def _system_call(marker: Path) -> bytes:
    # The exploit: os.system reached through a DCP module that imports os.
    return _payload("torch.distributed.checkpoint.filesystem", "os.system", f"touch {marker}")


def _state(step: int) -> str:
    return json.dumps({"global_step": step, "log_history": [], "stateful_callbacks": {}})


def _dcp_checkpoint(out: Path, step: int, metadata: bytes | None = None) -> Path:
    """A checkpoint-N holding a real DCP folder (written by torch.distributed.checkpoint), optionally with its
    ``.metadata`` replaced by ``metadata``."""
    import torch.distributed.checkpoint as dcp

    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    with pytest.warns(UserWarning, match="single process"):  # torch.distributed is not initialised here
        dcp.save({"w": torch.zeros(4)}, checkpoint_id=str(folder / "pytorch_model_fsdp_0"))
    (folder / "trainer_state.json").write_text(_state(step))
    if metadata is not None:
        (folder / "pytorch_model_fsdp_0" / ".metadata").write_bytes(metadata)
    return folder


# ------------------------------------------------------------------------------------ 1. no code from a .metadata
def test_the_metadata_reader_still_reads_what_dcp_writes(tmp_path: Path):
    folder = _dcp_checkpoint(tmp_path / "run", 10)
    index = layouts.read_dcp_metadata(folder / "pytorch_model_fsdp_0")
    assert isinstance(index, layouts.DcpIndex), index
    assert index.tensors == {"w": ((4,), "torch.float32")}
    assert ckpt.check_checkpoint(folder).ok


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("torch.distributed.checkpoint.filesystem", "os.system"),  # the exploit
        ("torch.distributed.checkpoint.metadata", "os.system"),
        ("torch.distributed.checkpoint", "os.system"),
        ("torch.distributed.checkpoint.metadata", "Metadata.__init__.__globals__.get"),
        ("torch.distributed.checkpoint.filesystem", "FileSystemWriter"),  # in the package, but not metadata
        ("torch", "load"),
        ("torch", "dtype.__init__"),
        ("os", "system"),
    ],
)
def test_a_metadata_naming_any_callable_outside_the_allowlist_runs_nothing(tmp_path: Path, module: str, name: str):
    marker = tmp_path / "pwned"
    dcp = tmp_path / "dcp"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(_payload(module, name, f"touch {marker}" if "system" in name else "x"))
    result = layouts.read_dcp_metadata(dcp)
    assert isinstance(result, str) and "not part of checkpoint metadata" in result, result
    assert not marker.exists()


def test_the_exploit_payload_is_live_under_a_plain_unpickler(tmp_path: Path):
    # Proof the payload works: the plain unpickler runs it (so the refusals here are the reader's doing).
    marker = tmp_path / "pwned"
    pickle.loads(_system_call(marker))
    assert marker.exists()


@pytest.mark.parametrize("command", ["verify", "inspect", "manifest"])
def test_a_crafted_dcp_metadata_runs_no_command_from_the_cli(tmp_path: Path, command: str, capsys):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    _dcp_checkpoint(out, 10, metadata=_system_call(marker))
    status = cli.main([command, str(out)])
    assert not marker.exists(), f"`trainguard {command}` ran the command planted in .metadata"
    printed = capsys.readouterr()
    assert status in (0, 1), printed
    if command != "inspect":
        assert status == 1, printed  # the checkpoint fails its check: the metadata is refused
        assert ".metadata" in printed.out + printed.err


def test_latest_verified_checkpoint_passes_over_a_crafted_metadata_without_running_it(tmp_path: Path):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    _dcp_checkpoint(out, 10, metadata=_system_call(marker))
    assert ckpt.latest_verified_checkpoint(out, lineage=None) is None
    assert not marker.exists()


def test_in_manifest_mode_a_changed_metadata_is_never_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "run"
    folder = _dcp_checkpoint(out, 10)
    ckpt.write_manifest(folder)
    # A metadata that the allowlist would build (a plain OrderedDict), so only the order of checks keeps it closed.
    crafted = pickle.dumps({"state_dict_metadata": {}}, protocol=4)
    (folder / "pytorch_model_fsdp_0" / ".metadata").write_bytes(crafted)
    opened: list[bytes] = []
    real_load = layouts._MetadataUnpickler.load

    def spy(self: pickle.Unpickler) -> object:
        opened.append(b"")
        return real_load(self)

    monkeypatch.setattr(layouts._MetadataUnpickler, "load", spy)
    report = ckpt.check_checkpoint(folder)
    assert not report.ok
    assert "pytorch_model_fsdp_0/.metadata" in {p.file for p in report.problems}  # its size and hash differ
    assert opened == [], "the .metadata was unpickled although its hash did not match the manifest"
    # ... while an unchanged, committed one is still read (the layout check keeps working in manifest mode).
    shutil.rmtree(folder)
    folder = _dcp_checkpoint(out, 10)
    ckpt.write_manifest(folder)
    assert ckpt.check_checkpoint(folder).ok
    assert len(opened) == 1


@pytest.mark.slow
def test_a_resume_with_all_guards_runs_nothing_from_a_planted_metadata(tmp_path: Path):
    from _rig import run_trainer

    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    # Written by a plain Trainer (trainguard added later): no manifest, so the folder gets the structural checks.
    run_trainer(out, max_steps=2, save_strategy="steps", save_steps=2)
    planted = out / "checkpoint-2" / "pytorch_model_fsdp_0"
    planted.mkdir()
    (planted / ".metadata").write_bytes(_system_call(marker))
    with pytest.raises(TrainGuardError) as caught:
        run_trainer(out, callbacks=trainguard.all_guards(), max_steps=4, resume_from_checkpoint=True)
    assert not marker.exists()
    # Refused as a failed check naming the file, never by running it.
    assert "checkpoint-2" in str(caught.value)


# ------------------------------------------------------------------------------------ 4. a zip flagged encrypted
def _encrypted_zip() -> bytes:
    buffer = io.BytesIO()
    torch.save({"step": torch.zeros(2)}, buffer)
    data = bytearray(buffer.getvalue())
    # Set general-purpose flag bit 0 ("encrypted") in every local header and central directory entry.
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (found := data.find(signature, start)) != -1:
            (flags,) = struct.unpack_from("<H", data, found + offset)
            struct.pack_into("<H", data, found + offset, flags | 1)
            start = found + 4
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        assert all(info.flag_bits & 1 for info in archive.infolist())
    return bytes(data)


def _legacy_checkpoint_with_encrypted_optimizer(out: Path) -> Path:
    folder = out / "checkpoint-4"
    folder.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    (folder / "trainer_state.json").write_text(_state(4))
    (folder / "optimizer.pt").write_bytes(_encrypted_zip())
    return folder


def test_a_zip_flagged_encrypted_is_a_failed_check_naming_the_file(tmp_path: Path):
    folder = _legacy_checkpoint_with_encrypted_optimizer(tmp_path / "run")
    report = ckpt.check_checkpoint(folder)
    assert not report.ok
    problem = next(p for p in report.problems if p.file == "optimizer.pt")
    assert "encrypted" in problem.detail


@pytest.mark.parametrize("command", ["verify", "manifest"])
def test_the_cli_exits_1_not_2_on_a_zip_flagged_encrypted(tmp_path: Path, command: str, capsys):
    folder = _legacy_checkpoint_with_encrypted_optimizer(tmp_path / "run")
    assert cli.main([command, str(folder.parent)]) == 1
    printed = capsys.readouterr()
    assert "optimizer.pt" in printed.out + printed.err
    assert "internal error" not in printed.out + printed.err


def test_verify_checkpoint_raises_the_integrity_error_for_a_zip_flagged_encrypted(tmp_path: Path):
    folder = _legacy_checkpoint_with_encrypted_optimizer(tmp_path / "run")
    with pytest.raises(trainguard.CheckpointIntegrityError, match=r"optimizer\.pt"):
        trainguard.verify_checkpoint(folder)


# ------------------------------------------------------------------------------------ 5. deep folders
def _deep(folder: Path, levels: int = DEEP_LEVELS) -> Path:
    """``levels`` nested one-letter folders under ``folder`` (made one level at a time: no path too long)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        with open(os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as fh:
            fh.write("deep")
    finally:
        os.close(fd)
    return folder


def _legacy_checkpoint(out: Path, step: int) -> Path:
    from safetensors.torch import save_file

    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    (folder / "trainer_state.json").write_text(_state(step))
    return folder


def test_the_tree_walk_reaches_the_bottom_of_a_folder_deeper_than_the_recursion_limit(tmp_path: Path):
    from trainguard.safe_fs import iter_files, walk_tree

    _deep(tmp_path)
    depth = sum(1 for _ in walk_tree(tmp_path))
    assert depth == DEEP_LEVELS + 1
    assert [p.name for p in iter_files(tmp_path)] == ["leaf.txt"]


def test_verify_checkpoint_reports_a_deep_folder_without_crashing(tmp_path: Path):
    folder = _legacy_checkpoint(tmp_path / "run", 4)
    _deep(folder)
    report = ckpt.check_checkpoint(folder)
    assert report.mode == "structural"
    assert report.ok, [p.format() for p in report.problems]  # a stray text file is no damage
    trainguard.verify_checkpoint(folder)


@pytest.mark.parametrize("command", ["verify", "manifest", "inspect"])
def test_the_cli_walks_a_deep_checkpoint_without_an_internal_error(tmp_path: Path, command: str, capsys):
    folder = _legacy_checkpoint(tmp_path / "run", 4)
    _deep(folder)
    status = cli.main([command, str(folder.parent)])
    printed = capsys.readouterr()
    assert status in (0, 1), printed
    assert "internal error" not in printed.out + printed.err


def test_a_committed_checkpoint_with_a_deep_folder_verifies_after_manifest(tmp_path: Path):
    folder = _legacy_checkpoint(tmp_path / "run", 4)
    _deep(folder)
    ckpt.write_manifest(folder)
    report = ckpt.check_checkpoint(folder)
    assert report.ok, [p.format() for p in report.problems]
    assert report.files >= 3


def test_preflight_disk_figures_walk_a_deep_folder(tmp_path: Path):
    from trainguard.checks.preflight.system import directory_size

    _deep(tmp_path)
    assert directory_size(tmp_path) >= len("deep")


@pytest.mark.slow
def test_a_resume_with_all_guards_survives_a_deep_folder_in_the_checkpoint(tmp_path: Path):
    from _rig import run_trainer

    out = tmp_path / "run"
    run_trainer(out, callbacks=trainguard.all_guards(), max_steps=2, save_strategy="steps", save_steps=2)
    _deep(out / "checkpoint-2")
    trainer, _ = run_trainer(out, callbacks=trainguard.all_guards(), max_steps=4, resume_from_checkpoint=True)
    assert trainer.state.global_step == 4


def test_removing_a_tree_deeper_than_the_recursion_limit_leaves_nothing(tmp_path: Path):
    from trainguard.safe_fs import remove_tree

    target = tmp_path / "checkpoint-1"
    target.mkdir()
    _deep(target)
    outside = tmp_path / "kept.txt"
    outside.write_text("not in the tree")
    (target / "link-out").symlink_to(outside)
    remove_tree(target)
    assert not target.exists()
    assert outside.read_text() == "not in the tree"  # a link is removed, never followed


@pytest.mark.slow
def test_rotation_removes_an_own_checkpoint_holding_a_deep_folder_and_training_goes_on(tmp_path: Path):
    from transformers import TrainerCallback

    from _rig import run_trainer

    out = tmp_path / "run"

    class PlantDeep(TrainerCallback):
        planted = False

        def on_step_begin(self, args, state, control, **kwargs):
            # checkpoint-1 is saved; save_total_limit=1 rotates it away at the next save
            if state.global_step == 1 and not self.planted:
                _deep(out / "checkpoint-1")
                self.planted = True

    guards = trainguard.all_guards()
    trainer, _ = run_trainer(
        out, callbacks=[*guards, PlantDeep()], max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=1
    )
    assert trainer.state.global_step == 3
    assert not (out / "checkpoint-1").exists()
