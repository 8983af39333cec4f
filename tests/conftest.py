"""Shared fixtures. The helpers themselves live in ``_rig.py`` so that child processes can import them too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _rig import make_lm_dataset, make_tiny_llama, make_tokenizer, mounted_tmpfs


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """A fast tokenizer trained in the test session with the ``tokenizers`` library."""
    return make_tokenizer()


@pytest.fixture
def tiny_model() -> Any:
    """A fresh random-init 2-layer Llama (hidden size 32)."""
    return make_tiny_llama()


@pytest.fixture
def lm_dataset() -> Any:
    """32 rows of 16 random tokens with labels."""
    return make_lm_dataset()


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    """A run's ``output_dir`` (not created yet, as for a new run)."""
    return tmp_path / "run"


@pytest.fixture
def tmpfs() -> Iterator[Path]:
    """A real 3 MiB tmpfs mount; skips where mounting is not permitted."""
    with mounted_tmpfs("3m") as folder:
        yield folder
