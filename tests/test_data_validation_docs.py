"""docs/data-validation.md's code table is the list of what validate_data can report: every code the checks emit
has a row (so a user who meets one can look it up), and every row names a code the checks still emit."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import trainguard

from _rig import REPO_ROOT

CHECKS = REPO_ROOT / "src" / "trainguard" / "checks" / "data"
LEVELS = {"error", "warning"}


def documented_codes() -> set[str]:
    """The codes in the first column of the table under "What `validate_data` reports"."""
    text = (REPO_ROOT / "docs" / "data-validation.md").read_text(encoding="utf-8")
    section = text.split("## What `validate_data` reports", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    codes = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            codes |= set(re.findall(r"`([a-z0-9_]+)`", line.split("|")[1]))
    return codes


def emitted_codes() -> set[str]:
    """The codes passed, as literals, to an issue call of the checks: ``issues("code", "error" | level, ...)``."""
    codes = set()
    for path in CHECKS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and len(node.args) >= 2):
                continue
            code, level = node.args[0], node.args[1]
            if isinstance(level, ast.Constant) and level.value not in LEVELS:
                continue
            if isinstance(level, ast.Constant) or (isinstance(level, ast.Name) and level.id == "level"):
                codes |= {
                    c.value
                    for c in ast.walk(code)  # a literal, or each branch of `"a" if ... else "b"`
                    if isinstance(c, ast.Constant) and isinstance(c.value, str) and re.fullmatch(r"[a-z0-9_]+", c.value)
                }
    return codes


def literals() -> set[str]:
    return {
        node.value
        for path in CHECKS.glob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def test_an_empty_jsonl_reports_empty_dataset_and_the_table_explains_it(tmp_path: Path):
    empty = tmp_path / "train.jsonl"
    empty.write_bytes(b"")
    report = trainguard.validate_data(empty)
    assert [i.code for i in report.errors] == ["empty_dataset"]
    assert "empty_dataset" in documented_codes()


def test_every_code_the_checks_emit_has_a_row_in_the_table():
    emitted = emitted_codes()
    assert {
        "invalid_json",
        "empty_dataset",
        "answer_cut_off",
        "missing_field",
        "wrong_type",
    } <= emitted  # the scan works
    missing = emitted - documented_codes()
    assert not missing, f"codes without a row in docs/data-validation.md's table: {sorted(missing)}"


def test_every_code_in_the_table_is_still_in_the_checks():
    stale = documented_codes() - literals()
    assert not stale, f"rows for codes no check emits any more: {sorted(stale)}"
