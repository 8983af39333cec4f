"""The examples run as users run them: a fresh process, CPU only, no network."""

from __future__ import annotations

from pathlib import Path

import pytest

import trainguard

from _rig import REPO_ROOT, run_python


def test_quickstart_trains_with_all_guards_and_reports_them(tmp_path: Path):
    result = run_python(str(REPO_ROOT / "examples" / "quickstart.py"), str(tmp_path / "run"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained 12 steps" in result.stdout
    assert "guard(s) attached" in result.stdout
    # every row tells something and is true when read (#29 item 5): no filler, no claim about trackers with
    # report_to="none", no lock "held" by a PID that has exited by the time anyone reads the line
    report = result.stdout.split("guard(s) attached", 1)[1]
    for filler in ("nothing to check", "stall dump", "published to", "(PID "):
        assert filler not in report, (filler, report)
    assert "locked against other runs until this process exits" in report
    assert all(len(line.split(maxsplit=1)) == 2 for line in report.splitlines() if line.startswith("  "))


def test_sft_trainer_example_validates_the_data_and_fine_tunes_a_lora_adapter_with_every_guard(tmp_path: Path):
    for extra in ("trl", "peft", "datasets"):
        pytest.importorskip(extra, reason=f'needs {extra} (pip install ".[trl,peft]")')
    out = tmp_path / "sft"
    result = run_python(str(REPO_ROOT / "examples" / "sft_trainer.py"), str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validate_data: 64 valid row(s), format prompt_completion, 0 warning(s)" in result.stdout
    assert "trained 8 steps with SFTTrainer" in result.stdout
    assert "every adapter parameter trains" in result.stdout  # the LoRA adapter really trained
    assert f"newest verified checkpoint: {out / 'run' / 'checkpoint-8'}" in result.stdout
    assert trainguard.verify_checkpoint(out / "run" / "checkpoint-8").ok
