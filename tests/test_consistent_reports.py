"""What two commands (or two lines) say about one thing agrees: ``verify`` and ``inspect`` count a checkpoint's files
and bytes with one function; a time is shown with one zone; a folder is named ``folder=``; kinds of error are
counted as codes; every run id in ``inspect --json`` has one style; the failure gallery's output starts with its
table and no row is cut mid-sentence (issue #29 item 8)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

import trainguard
from trainguard.cli import main
from trainguard.errors import CheckpointIntegrityError

from _rig import REPO_ROOT, holding_run_lock, make_trainer, run_python, run_trainer

RUN_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with CheckpointVerifier and CrashLoopGuard, two checkpoints, a README dropped into one of them."""
    out = tmp_path_factory.mktemp("consistent") / "run"
    run_trainer(
        out,
        callbacks=[trainguard.CheckpointVerifier(), trainguard.CrashLoopGuard()],
        save_strategy="steps",
        save_steps=2,
    )
    (out / "checkpoint-4" / "README.md").write_text("notes about this checkpoint\n")
    return out


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    main([*argv, "--json"])
    return json.loads(capsys.readouterr().out)


def _on_disk(folder: Path) -> tuple[int, int]:
    sizes = [os.lstat(Path(root) / name).st_size for root, _, names in os.walk(folder) for name in names]
    return len(sizes), sum(sizes)


def test_verify_and_inspect_count_the_same_files_and_bytes_for_every_checkpoint(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verified = {c["name"]: (c["files"], c["bytes"]) for c in _json(capsys, "verify", str(trained))["checkpoints"]}
    inspected = {c["name"]: (c["files"], c["bytes"]) for c in _json(capsys, "inspect", str(trained))["checkpoints"]}
    assert verified == inspected
    assert verified == {name: _on_disk(trained / name) for name in ("checkpoint-2", "checkpoint-4")}


def test_every_run_id_in_inspect_json_has_one_style(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _json(capsys, "inspect", str(trained))
    ids = [r["run_id"] for r in report["runs"]]
    ids += [r["run"] for r in report["lineage"]["runs"]]
    ids += [c["origin"]["run"] for c in report["checkpoints"]]
    assert len(ids) >= 4 and all(RUN_ID.match(i) for i in ids), ids


def test_a_lock_holders_start_time_is_shown_with_one_zone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with holding_run_lock(out):
        main(["inspect", str(out)])
        text = capsys.readouterr().out
    started = re.search(r"started (\S+)", text)
    assert started is not None and started.group(1).endswith("Z,") and "UTC" not in text, text


def test_a_refused_fresh_start_names_the_output_dir_as_a_folder(trained: Path) -> None:
    trainer = make_trainer(trained, callbacks=[trainguard.CheckpointVerifier()])
    with pytest.raises(trainguard.LineageError) as refused:
        trainer.train()
    assert refused.value.where["folder"] == str(trained) and "file" not in refused.value.where
    assert f"where: folder={trained}" in str(refused.value)


def test_kinds_of_error_are_counted_as_codes_not_as_files(tmp_path: Path) -> None:
    for name in ("train.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text('{"prompt": "p", "completion": ""}\n{"prompt": "q", "completion": "a"}\n')
    report = trainguard.validate_data(tmp_path / "train.jsonl", eval_source=tmp_path / "eval.jsonl")
    assert len(report.errors) == 2 and report.error_kinds == ["empty_field"]  # one code, in two files
    shown = io.StringIO()
    report.print(file=shown)
    assert "FAILED (1 error kind(s)" in shown.getvalue()
    with pytest.raises(trainguard.DataValidationError) as failed:
        report.raise_for_errors()
    assert "1 kind(s) of error, 2 occurrence(s)" in failed.value.what


def test_the_failure_gallery_starts_with_its_table_and_keeps_each_row_whole() -> None:
    result = run_python(str(REPO_ROOT / "examples" / "failure_gallery.py"), "--only", "tokenizer", timeout=600)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[0] == "1. resume with another EOS token", lines[:3]
    [verdict] = [line for line in lines if line.startswith("   trainguard:")]
    assert verdict.rstrip().endswith('this one "<s>" (id 2)'), verdict


def test_a_changed_file_says_which_digest_is_now_and_which_was_saved(trained: Path, tmp_path: Path) -> None:
    shutil.copytree(trained / "checkpoint-2", tmp_path / "checkpoint-2")
    weights = tmp_path / "checkpoint-2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of tensor data: same size, same structure
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError) as refused:
        trainguard.verify_checkpoint(weights.parent)
    assert "content changed: sha256 now " in refused.value.what and "… when saved" in refused.value.what
