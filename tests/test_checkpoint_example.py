"""The checkpoint-integrity example runs as a user runs it: a fresh process, CPU only, no network."""

from __future__ import annotations

from pathlib import Path

from _rig import REPO_ROOT, run_python


def test_the_example_sets_aside_the_damaged_checkpoint_resumes_and_refuses_a_second_run_in_the_folder(tmp_path: Path):
    out = tmp_path / "run"
    result = run_python(str(REPO_ROOT / "examples" / "checkpoint_integrity.py"), str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.safetensors: content changed" in result.stdout
    assert "training starts at step 2" in result.stdout
    assert "set aside: ['checkpoint-4." in result.stdout
    assert "LineageError before step 1" in result.stdout
    last = result.stdout.rstrip().splitlines()[-3:]  # checkpoint-2 of the new lineage beside the first run's 4 and 6
    assert [line.split()[0] for line in last] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all(line.endswith("verified") for line in last)
    assert len({line.split()[2] for line in last}) == 2  # two lineages
