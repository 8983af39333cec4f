"""Set-aside folders are bounded and cleanable: ``trainguard clean OUTPUT_DIR`` lists what trainguard set aside
(``trainguard-archive/``, ``trainguard-quarantine/``) and removes it only with ``--yes``, never a checkpoint, never
while a run holds the lock; PreflightGuard warns once they outweigh ``save_total_limit`` checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from trainguard import PreflightGuard
from trainguard.alerts import Alert
from trainguard.checks._layout import ARCHIVE_DIR, QUARANTINE_DIR
from trainguard.checks.set_aside import set_aside_excess
from trainguard.cli import main

from _rig import holding_run_lock, run_trainer

MIB = 2**20


class ListSink:
    """Collects alerts in memory."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def send(self, alert: Alert) -> None:
        self.alerts.append(alert)


def _file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: sized like a checkpoint file, costs no disk
    return path


@pytest.fixture
def run_dir(output_dir: Path) -> Path:
    """A live checkpoint, the user's own file, an archived pair of checkpoints and a quarantined one."""
    _file(output_dir / "checkpoint-2" / "model.safetensors", 1 * MIB)
    _file(output_dir / "notes.txt", 10)
    archive = output_dir / ARCHIVE_DIR / "20260101T000000Z-replaced"
    _file(archive / "checkpoint-4" / "model.safetensors", 2 * MIB)
    _file(archive / "checkpoint-6" / "model.safetensors", 2 * MIB)
    _file(output_dir / QUARANTINE_DIR / "checkpoint-8" / "optimizer.pt", 1 * MIB)
    return output_dir


def _clean(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["clean", *args])
    return code, capsys.readouterr().out


def test_clean_lists_what_was_set_aside_with_sizes_and_removes_nothing_without_yes(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _clean(capsys, str(run_dir), "--json")
    report = json.loads(out)
    assert code == 0 and report["dry_run"] is True and report["removed"] == []
    assert [(i["folder"], Path(i["path"]).name) for i in report["items"]] == [
        (ARCHIVE_DIR, "20260101T000000Z-replaced"),
        (QUARANTINE_DIR, "checkpoint-8"),
    ]
    assert [i["size_bytes"] for i in report["items"]] == [4 * MIB, 1 * MIB]
    assert report["total_bytes"] == 5 * MIB
    code, out = _clean(capsys, str(run_dir))
    assert code == 0 and "5.0 MiB set aside" in out and "--yes" in out
    assert (run_dir / ARCHIVE_DIR / "20260101T000000Z-replaced" / "checkpoint-4" / "model.safetensors").exists()
    assert (run_dir / QUARANTINE_DIR / "checkpoint-8" / "optimizer.pt").exists()


def test_clean_yes_removes_only_what_was_set_aside_never_a_checkpoint_or_a_user_file(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _clean(capsys, str(run_dir), "--yes")
    assert code == 0 and "removed 2 of 2 item(s), 5.0 MiB freed" in out
    assert not (run_dir / ARCHIVE_DIR).exists() and not (run_dir / QUARANTINE_DIR).exists()
    assert (run_dir / "checkpoint-2" / "model.safetensors").stat().st_size == MIB
    assert (run_dir / "notes.txt").exists()
    code, out = _clean(capsys, str(run_dir))
    assert code == 0 and "nothing set aside" in out


def test_clean_yes_is_refused_while_a_run_holds_the_lock(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with holding_run_lock(run_dir):
        code, out = _clean(capsys, str(run_dir), "--yes", "--json")
    report = json.loads(out)
    assert code == 1 and report["error"] == "RunLockedError" and "nothing was removed" in report["what"]
    assert (run_dir / ARCHIVE_DIR / "20260101T000000Z-replaced" / "checkpoint-6").is_dir()
    assert (run_dir / QUARANTINE_DIR / "checkpoint-8").is_dir()


def test_clean_refuses_a_link_at_the_archive_name_and_removes_nothing_behind_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = _file(tmp_path / "precious" / "checkpoint-9" / "model.safetensors", MIB)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    os.symlink(tmp_path / "precious", out_dir / ARCHIVE_DIR)
    code, out = _clean(capsys, str(out_dir), "--yes", "--json")
    assert code == 2 and json.loads(out)["error"] == "UnsafeFileError"
    assert elsewhere.stat().st_size == MIB


def test_preflight_warns_once_when_set_aside_outweighs_save_total_limit_checkpoints(run_dir: Path) -> None:
    sink = ListSink()
    guard = PreflightGuard(check_disk=False, min_available_memory=None, alert_sinks=[sink])
    run_trainer(run_dir, callbacks=[guard], max_steps=2, save_total_limit=2)
    warnings = [a for a in sink.alerts if a.level == "warning"]
    # 5 MiB set aside > 2 x checkpoint-2's 1 MiB
    assert len(warnings) == 1, [a.message for a in sink.alerts]
    assert "5.0 MiB in 2 set-aside item(s)" in warnings[0].message
    assert f"trainguard clean {run_dir} --yes" in warnings[0].message
    assert warnings[0].evidence["budget_bytes"] == 2 * MIB


def test_set_aside_within_save_total_limit_checkpoints_is_not_warned_about(run_dir: Path) -> None:
    assert set_aside_excess(run_dir, 5) is None  # 5 MiB set aside, 5 x 1 MiB allowed
    assert set_aside_excess(run_dir, None) is None  # no limit: every checkpoint stays anyway
    assert set_aside_excess(run_dir, 4)["set_aside_bytes"] == 5 * MIB  # type: ignore[index]
