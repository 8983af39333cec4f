"""The checkpoint-integrity example runs as a user runs it: a fresh process, CPU only, no network."""

from __future__ import annotations

from pathlib import Path

from _rig import REPO_ROOT, run_python


def test_the_example_sets_aside_the_damaged_checkpoint_and_resumes_from_the_previous_one(tmp_path: Path):
    out = tmp_path / "run"
    result = run_python(str(REPO_ROOT / "examples" / "checkpoint_integrity.py"), str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.safetensors: content changed" in result.stdout
    assert "training starts at step 2" in result.stdout
    assert "set aside: ['checkpoint-4." in result.stdout
    assert result.stdout.rstrip().endswith("checkpoint-6   verified")
