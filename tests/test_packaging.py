"""The distribution as pip sees it: metadata, and the wheel and sdist that ``python -m build`` makes.

The clean-venv install and smoke test of those files is in ``.ci/run`` (it installs torch, too slow for here).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import metadata
from pathlib import Path

import pytest

import trainguard

from _rig import REPO_ROOT, subprocess_env


def test_metadata_names_license_urls_classifiers_and_typing() -> None:
    meta = metadata("trainguard")
    assert meta["License-Expression"] == "Apache-2.0"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Documentation", "Changelog", "Issues"} <= set(urls)
    assert all(u.startswith("https://") for u in urls.values())
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert any(c.startswith("Development Status ::") for c in classifiers)
    assert meta["Requires-Python"] == ">=3.10"
    # License classifiers are deprecated next to a License-Expression (PEP 639); setuptools refuses both.
    assert not any(c.startswith("License ::") for c in classifiers)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="needs the `build` package (dev extra)")
def test_build_makes_a_wheel_and_sdist_with_the_package_typing_marker_and_license(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "build", "-q", "--outdir", str(tmp_path), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [wheel] = tmp_path.glob("trainguard-*.whl")
    [sdist] = tmp_path.glob("trainguard-*.tar.gz")
    assert trainguard.__version__ in wheel.name

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "trainguard = trainguard.cli:main" in zf.read(entry_points).decode()
    assert "trainguard/py.typed" in names
    assert "trainguard/callbacks/nan_guard.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "_rig")) for n in names), "the test rig is not shipped"

    with tarfile.open(sdist) as tf:
        members = {m.split("/", 1)[1] for m in tf.getnames() if "/" in m}
    assert {"LICENSE", "README.md", "pyproject.toml", "src/trainguard/py.typed"} <= members
