"""The README's support table is what CI tests: its "newest tested" column is what this environment has installed
(.ci/run installs the newest releases pyproject.toml allows and runs the whole suite on them), and its "oldest" column
is .ci/oldest.txt. A new release that CI picks up fails here until the table says so."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

import pytest
from packaging.version import Version

from _rig import REPO_ROOT

PACKAGES = ("transformers", "accelerate", "peft", "trl", "torch", "deepspeed")


def support_table() -> dict[str, tuple[str, str]]:
    """README's "Supported versions" rows: package -> (oldest cell, newest cell), as written."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Supported versions", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].split()[0] in PACKAGES:
            rows[cells[0].split()[0]] = (cells[1], cells[2])
    return rows


def release(cell: str) -> str:
    """The version a cell names first ("2.13.0 (>= 2.6 allowed)" -> "2.13.0"); "" for an empty cell."""
    match = re.match(r"\d+(\.\d+)+", cell)
    return match.group(0) if match else ""


def test_the_table_has_a_row_for_each_package_ci_installs():
    assert set(support_table()) == set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_the_newest_tested_column_is_the_installed_release(package: str):
    try:
        installed = Version(version(package)).public  # torch's "2.13.0+cpu" is release 2.13.0
    except PackageNotFoundError:
        pytest.skip(f"{package} is not installed here (.ci/run installs it)")
    written = release(support_table()[package][1])
    assert written == installed, (
        f"README.md's support table says {package} {written} is the newest tested, but CI installed {installed}: "
        f"set it to {installed} (and re-check the docs' 'measured on' statements against it)"
    )


def test_the_oldest_column_is_what_ci_pins_for_the_old_end():
    pins = dict(
        line.split("==", 1)
        for line in (REPO_ROOT / ".ci" / "oldest.txt").read_text(encoding="utf-8").splitlines()
        if "==" in line and not line.startswith("#")
    )
    table = support_table()
    for package, pinned in pins.items():
        assert release(table[package][0]) == pinned, (package, table[package][0], pinned)
