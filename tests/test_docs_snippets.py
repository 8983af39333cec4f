"""Docs that run: every ```python block of README.md and docs/*.md and every docstring's ``Example::`` is executed
(or, marked ``# not run here: <reason>``, compiled), each in a fresh copy of one shared workspace (tests/_snippets.py).
A snippet that raises fails; one marked ``# raises: <ErrorName>`` must raise exactly that."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import trainguard

from _snippets import Names, Snippet, build_workspace, copy_workspace, docstring_snippets, markdown_snippets

SNIPPETS = markdown_snippets() + docstring_snippets()


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("snippets") / "workspace")


def test_every_page_with_code_is_covered():
    pages = {s.file for s in SNIPPETS}
    assert "README.md" in pages and sum(p.startswith("docs/") for p in pages) >= 15
    assert sum(p.startswith("src/") for p in pages) >= 40
    assert len(SNIPPETS) >= 120


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: s.id)
def test_the_snippet_runs_as_written(
    snippet: Snippet, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    shell = snippet.code.lstrip().startswith("trainguard ")
    code = None if shell else compile(snippet.code, snippet.id, "exec")  # every Python snippet at least compiles
    if snippet.not_run:
        pytest.skip(f"compiled, not run: {snippet.not_run}")
    monkeypatch.chdir(copy_workspace(workspace, tmp_path / "ws"))
    module_globals = vars(importlib.import_module(snippet.module)) if snippet.module else {}
    names = Names(module_globals)
    expected = snippet.raises
    if expected is None:
        exec(code, names)
        return
    with pytest.raises(getattr(trainguard, expected)):
        exec(code, names)


def test_no_snippet_passes_a_checkpoint_that_may_be_none_through_str():
    # str(None) is "None", and the Trainer then fails with "Can't find a valid checkpoint at None".
    for snippet in SNIPPETS:
        for call in ("latest_verified_checkpoint(", "resolve_verified_resume("):
            assert f"str({call}" not in snippet.code.replace(" ", ""), snippet.id
