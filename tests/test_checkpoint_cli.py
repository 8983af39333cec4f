"""``trainguard verify`` and ``trainguard manifest`` on real checkpoints: tables, JSON, exit codes, no torch."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import trainguard
from trainguard.checks import checkpoint as ckpt
from trainguard.cli import main

from _rig import run_python, run_trainer


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    run_trainer(out, callbacks=[trainguard.CheckpointVerifier()], save_strategy="steps", save_steps=2, max_steps=4)
    return out


@pytest.fixture
def run(trained_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x04
    path.write_bytes(bytes(data))


def _strip_manifests(run: Path) -> None:
    (run / ckpt.RUN_MARKER).unlink()
    for folder in run.glob("checkpoint-*"):
        (folder / ckpt.MANIFEST_NAME).unlink()
        (folder / ckpt.METADATA_NAME).unlink()


def test_verify_an_output_dir_prints_a_table_and_exits_0_when_all_verify(run: Path, capsys: pytest.CaptureFixture):
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint-2" in out
    assert "checkpoint-4" in out
    assert out.count("verified") == 2
    assert "resume from: checkpoint-4" in out


def test_verify_exits_1_and_names_the_damaged_file_in_the_table_and_the_json(run: Path, capsys: pytest.CaptureFixture):
    _flip(run / "checkpoint-4" / "optimizer.pt")
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out
    assert "optimizer.pt: content changed" in out
    assert "resume from: checkpoint-2" in out

    assert main(["verify", str(run), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    assert doc["kind"] == "output_dir"
    assert doc["resume_from"] == str(run / "checkpoint-2")
    by_name = {c["name"]: c for c in doc["checkpoints"]}
    assert by_name["checkpoint-2"]["status"] == "verified"
    assert [p["file"] for p in by_name["checkpoint-4"]["problems"]] == ["optimizer.pt"]

    assert main(["verify", str(run / "checkpoint-2")]) == 0
    capsys.readouterr()
    assert main(["verify", str(run / "checkpoint-4"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "checkpoint"
    assert doc["checkpoints"][0]["problems"][0]["file"] == "optimizer.pt"


def test_verify_exits_2_on_usage_and_io_errors(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["verify", str(tmp_path / "absent")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "file.txt").write_text("x")
    assert main(["verify", str(tmp_path / "file.txt")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["verify", str(tmp_path / "empty"), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["ok"] is False
    with pytest.raises(SystemExit) as info:
        main(["verify"])
    assert info.value.code == 2


@pytest.mark.parametrize("command", ["verify", "manifest"])
@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_under_1_is_a_usage_error_naming_the_option(
    run: Path, capsys: pytest.CaptureFixture, command: str, workers: str
):
    assert main([command, str(run), "--workers", workers]) == 2
    assert f"--workers must be 1 or more, not {workers}" in capsys.readouterr().err
    assert not list(run.glob("*/trainguard-manifest.sha256.*"))  # nothing written


def test_manifest_adopts_an_existing_run_after_its_structural_checks(run: Path, capsys: pytest.CaptureFixture):
    _strip_manifests(run)
    assert main(["verify", str(run), "--json"]) == 0
    assert {c["mode"] for c in json.loads(capsys.readouterr().out)["checkpoints"]} == {"structural"}

    assert main(["manifest", str(run)]) == 0
    assert capsys.readouterr().out.count("written") == 2
    assert main(["verify", str(run), "--json"]) == 0
    assert {c["status"] for c in json.loads(capsys.readouterr().out)["checkpoints"]} == {"verified"}
    check = subprocess.run(
        ["sha256sum", "-c", "--strict", ckpt.MANIFEST_NAME],
        cwd=run / "checkpoint-4",
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert main(["manifest", str(run)]) == 0  # again: both kept
    assert capsys.readouterr().out.count("kept") == 2


def test_manifest_refuses_to_vouch_for_damaged_checkpoints_unless_forced(run: Path, capsys: pytest.CaptureFixture):
    _flip(run / "checkpoint-4" / "model.safetensors")
    assert main(["manifest", str(run / "checkpoint-4")]) == 1  # its manifest fails: a new one would hide that
    assert "refused" in capsys.readouterr().out
    assert not ckpt.check_checkpoint(run / "checkpoint-4").ok
    assert main(["manifest", str(run / "checkpoint-4"), "--force"]) == 0
    assert "rewritten" in capsys.readouterr().out
    assert ckpt.check_checkpoint(run / "checkpoint-4").ok

    _strip_manifests(run)
    with open(run / "checkpoint-2" / "optimizer.pt", "r+b") as fh:
        fh.truncate(1000)
    assert main(["manifest", str(run), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [c["action"] for c in doc["checkpoints"]] == ["refused", "written"]


def test_the_commands_never_import_torch(run: Path):
    code = (
        "import sys\n"
        "from trainguard.cli import main\n"
        f"codes = [main(['verify', {str(run)!r}]), main(['manifest', {str(run)!r}])]\n"
        "print('RESULT', codes, sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "RESULT [0, 0] []" in result.stdout


def test_inspect_shows_each_checkpoints_verification(run: Path):
    from trainguard.commands.inspect import inspect_output_dir

    _flip(run / "checkpoint-4" / "scheduler.pt")
    report = inspect_output_dir(run)
    status = {c["name"]: c["verified"] for c in report["checkpoints"]}
    assert status == {"checkpoint-2": True, "checkpoint-4": False}
