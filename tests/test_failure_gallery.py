"""The failure gallery runs as users run it (a fresh process, CPU, no network) and every row behaves as documented:
the plain Trainer fails the way docs/index.md says, and trainguard catches it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from _rig import REPO_ROOT, run_python

GALLERY = str(REPO_ROOT / "examples" / "failure_gallery.py")
ROWS = (
    "dataset", "tokenizer", "lora", "flipped_byte", "truncated", "nan", "hang", "run_lock", "reused_dir",
    "hollow_save", "masked", "disk", "oom_eval", "dead_adapter", "loss_spike",
)  # fmt: skip


@pytest.fixture(scope="module")
def gallery() -> dict[str, Any]:
    result = run_python(GALLERY, "--json", timeout=900)
    rows = json.loads(result.stdout)
    return {"returncode": result.returncode, "stderr": result.stderr, "rows": {row["key"]: row for row in rows}}


def _row(gallery: dict[str, Any], key: str) -> dict[str, Any]:
    row = gallery["rows"][key]
    if row["skipped"]:
        pytest.skip(f"{key}: {row['skipped']}")
    assert row["ok"], row
    assert row["plain_as_documented"] and row["caught"]
    return row


def test_gallery_runs_every_failure_and_exits_0_when_all_behave_as_documented(gallery: dict[str, Any]) -> None:
    assert tuple(gallery["rows"]) == ROWS
    assert gallery["returncode"] == 0, (gallery["rows"], gallery["stderr"][-3000:])
    for row in gallery["rows"].values():
        assert row["skipped"] or row["detect_s"] is not None, row


def test_resume_on_other_data_trains_nothing_plain_and_is_refused_with_trainguard(gallery: dict[str, Any]) -> None:
    row = _row(gallery, "dataset")
    assert "trained 0 steps" in row["plain"]
    assert row["guard"] == "DatasetGuard" and "DatasetMismatchError before step 1" in row["trainguard"]


def test_resume_with_another_eos_is_silent_plain_and_refused_naming_the_field(gallery: dict[str, Any]) -> None:
    row = _row(gallery, "tokenizer")
    assert "no warning" in row["plain"]
    assert row["guard"] == "DatasetGuard" and "eos_token" in row["trainguard"]


def test_lora_alpha_change_is_silent_plain_and_refused_naming_both_values(gallery: dict[str, Any]) -> None:
    row = _row(gallery, "lora")
    assert "no warning" in row["plain"]
    assert "lora_alpha: checkpoint 16, this run 32" in row["trainguard"]


def test_flipped_byte_is_loaded_plain_and_set_aside_with_trainguard(gallery: dict[str, Any]) -> None:
    row = _row(gallery, "flipped_byte")
    assert "resumed at step 4" in row["plain"]
    assert "resumed from checkpoint-2" in row["trainguard"]


def test_truncated_checkpoint_crashes_plain_and_is_skipped_with_trainguard(gallery: dict[str, Any]) -> None:
    row = _row(gallery, "truncated")
    assert "SafetensorError" in row["plain"]
    assert "checkpoint-2" in row["trainguard"]


def test_nan_parameters_are_trained_and_saved_plain_and_stop_the_run_with_trainguard(gallery: dict[str, Any]) -> None:
    row = _row(gallery, "nan")
    assert "loss [0.0]" in row["plain"] and "saved poisoned" in row["plain"]
    assert "NonFiniteError at step 5" in row["trainguard"] and "all finite: True" in row["trainguard"]


def test_hang_is_silent_plain_and_dumped_naming_the_function_with_trainguard(gallery: dict[str, Any]) -> None:
    row = _row(gallery, "hang")
    assert "still hanging" in row["plain"] and "nothing printed" in row["plain"]
    assert "stalled_data_loader" in row["trainguard"]


def test_second_run_on_a_locked_output_dir_is_refused_naming_the_holder(gallery: dict[str, Any]) -> None:
    row = _row(gallery, "run_lock")
    assert "no warning" in row["plain"]
    assert "RunLockedError" in row["trainguard"] and "PID" in row["trainguard"]


def test_a_fresh_run_in_a_reused_output_dir_destroys_the_other_run_plain_and_is_refused_with_trainguard(
    gallery: dict[str, Any],
) -> None:
    row = _row(gallery, "reused_dir")
    assert "saved into run A's checkpoint-4 folder" in row["plain"] and "deleted" in row["plain"]
    assert "LineageError before step 1" in row["trainguard"]


def test_a_hollow_save_trains_on_plain_and_stops_the_run_at_that_save_with_trainguard(gallery: dict[str, Any]) -> None:
    row = _row(gallery, "hollow_save")
    assert "model.embed_tokens.weight [0]" in row["plain"] and "trained on to step 8" in row["plain"]
    assert "SaveAuditError at that save" in row["trainguard"]


def test_all_masked_labels_train_plain_and_are_refused_by_data_guard(gallery: dict[str, Any]) -> None:
    row = _row(gallery, "masked")
    assert "trained 4 steps" in row["plain"]
    assert "DataValidationError before step 1" in row["trainguard"]


def test_disk_too_small_crashes_mid_save_plain_and_is_refused_before_step_1(gallery: dict[str, Any]) -> None:
    row = _row(gallery, "disk")
    assert "half-written" in row["plain"]
    assert "PreflightError before step 1" in row["trainguard"]


def test_oom_in_evaluation_loses_every_step_plain_and_leaves_a_verified_checkpoint_with_trainguard(
    gallery: dict[str, Any],
) -> None:
    row = _row(gallery, "oom_eval")
    assert "steps lost" in row["plain"]
    assert row["guard"] == "GracefulStop" and "(verified: True)" in row["trainguard"]


def test_lora_without_gradient_trains_on_plain_and_is_stopped_at_step_1_with_trainguard(
    gallery: dict[str, Any],
) -> None:
    row = _row(gallery, "dead_adapter")
    assert "still exactly zero, no warning" in row["plain"]
    assert row["guard"] == "AdapterGuard" and "AdapterError at step 1" in row["trainguard"]


def test_a_poisoned_batch_is_applied_silently_plain_and_skipped_naming_its_row_with_trainguard(
    gallery: dict[str, Any],
) -> None:
    row = _row(gallery, "loss_spike")
    assert "its update is applied, no warning" in row["plain"]
    assert row["guard"] == "SpikeGuard" and "update of step 31 skipped" in row["trainguard"]
    assert "row 60" in row["trainguard"]


def test_unknown_row_is_a_usage_error() -> None:
    result = run_python(GALLERY, "--only", "nope", timeout=120)
    assert result.returncode == 2
    assert "unknown row" in result.stderr
