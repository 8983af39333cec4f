"""The examples run as users run them: a fresh process, CPU only, no network."""

from __future__ import annotations

from pathlib import Path

from _rig import REPO_ROOT, run_python


def test_quickstart_trains_with_all_guards_and_reports_them(tmp_path: Path):
    result = run_python(str(REPO_ROOT / "examples" / "quickstart.py"), str(tmp_path / "run"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained 12 steps" in result.stdout
    assert "guard(s) attached" in result.stdout
