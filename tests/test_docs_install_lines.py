"""Every install line of the docs works on a fresh machine today: trainguard has no release on PyPI yet, so each
line installs it from a clone (``pip install ".[peft]"``) or from the wheel built from it, never by name from an
index (``pip install trainguard`` answers "from versions: none"). The lines are found by tests/_install_lines.py;
.ci/run's packaging stage installs the built wheel with every extra they name, in a clean venv."""

from __future__ import annotations

import re
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import trainguard

from _install_lines import REPO_ROOT, _commands, docs_extras, install_lines, parse

if sys.version_info >= (3, 11):
    import tomllib
else:  # the backport trainguard depends on below 3.11
    import tomli as tomllib

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])


def test_the_install_lines_are_found_in_code_blocks_inline_code_and_chained_commands():
    [clone] = [parse(c) for c in _commands('pip install ".[peft]"      # + LoRA checks')]
    assert [(r.path, r.extras) for r in clone] == [(".", ("peft",))]
    assert _commands("a test extra, `DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed`; its tests") == [
        "pip install --no-build-isolation deepspeed"
    ]
    chained = _commands("python -m pip install torch==2.13.0 && python -m pip install -e . && python x.py")
    assert [[r.text for r in parse(c)] for c in chained] == [["torch==2.13.0"], ["."]]
    [wheel] = parse('pip install -q -c c.txt "dist/trainguard-1.0-py3-none-any.whl[peft,trl]"')
    assert (wheel.path, wheel.extras) == ("dist/trainguard-1.0-py3-none-any.whl", ("peft", "trl"))
    # The old lines are read as what they are: trainguard by name, from an index.
    [by_name] = parse('pip install "trainguard[peft]"')
    assert by_name.path is None and Requirement(by_name.text).name == "trainguard"

    lines = install_lines()
    files = {line.file for line in lines}
    assert {"README.md", "docs/index.md", "docs/integrations.md"} <= files
    assert {"peft", "trl", "all", "axolotl", "llamafactory", "dev"} <= docs_extras()


def test_no_docs_line_installs_trainguard_by_name_before_its_first_release():
    by_name = [
        f"{line.where}: {line.command}"
        for line in install_lines()
        for r in line.requirements
        if r.path is None and canonicalize_name(Requirement(r.text).name) == "trainguard"
    ]
    assert not by_name, (
        "trainguard is not on PyPI yet, so these fail with 'from versions: none'; install from a clone "
        '(pip install ".[extra]") or a built wheel (docs/index.md, Install):\n' + "\n".join(by_name)
    )


def test_every_other_package_a_docs_line_installs_is_a_valid_requirement():
    for line in install_lines():
        for r in line.requirements:
            if r.path is None:
                Requirement(r.text)  # raises InvalidRequirement for a misspelt one


def test_every_extra_a_docs_line_names_exists_in_pyproject():
    unknown = [
        f"{line.where}: [{extra}]"
        for line in install_lines()
        for r in line.requirements
        if r.path is not None
        for extra in r.extras
        if extra not in EXTRAS
    ]
    # pip only warns about an unknown extra and installs without it: the user would find out at import time.
    assert not unknown, f"extras not in pyproject.toml {sorted(EXTRAS)}: {unknown}"


def test_a_wheel_named_in_the_docs_is_the_one_the_build_makes_for_this_version():
    expected = f"dist/trainguard-{trainguard.__version__}-py3-none-any.whl"
    wheels = [
        (line.where, r.path) for line in install_lines() for r in line.requirements if (r.path or "").endswith(".whl")
    ]
    assert wheels, "docs/index.md shows the built-wheel install"
    assert all(path == expected for _, path in wheels), (expected, wheels)
    for line in install_lines():  # the comment that says what the build writes names the same file
        text = (REPO_ROOT / line.file).read_text(encoding="utf-8")
        for named in re.findall(r"dist/trainguard-[^\s\[\]\"`]+\.whl", text):
            assert named == expected or "*" in named, (line.file, named)


def test_ci_installs_the_built_wheel_with_the_extras_the_docs_name():
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "tests/_install_lines.py extras" in ci, ".ci/run's packaging stage asks this module for the extras"
    assert "twine check --strict" in ci
