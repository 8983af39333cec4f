"""The progress bar of :func:`~trainguard.checks.data.validate_data`: on stderr, on a terminal, for large inputs.

A ``rich`` bar is drawn only when stderr is a terminal and the input is large enough to take more than a second or
two (``_PROGRESS_MIN_BYTES`` of files, ``_PROGRESS_MIN_ROWS`` in-memory rows), or when forced; it advances by
bytes for files and by rows for in-memory data, and vanishes when done.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ...display import terminal_of
from ...safe_fs import iter_files
from .parts import SUPPORTED_SUFFIXES
from .report import isatty

__all__ = ["ProgressBar"]

_PROGRESS_MIN_BYTES = 32 << 20  # a bar only for inputs that take more than a second or two to read
_PROGRESS_MIN_ROWS = 200_000


def _total_size(source: Any) -> tuple[int | None, str]:
    """The input's size for a progress bar: (bytes, "bytes") for paths, (rows, "rows") for collections."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            if path.is_file():
                return path.stat().st_size, "bytes"
            if path.is_dir():
                return sum(
                    p.stat().st_size
                    for p in iter_files(path)
                    if p.is_file() and p.name.lower().endswith(SUPPORTED_SUFFIXES)
                ), "bytes"
        except OSError:
            return None, "bytes"
        return None, "bytes"
    try:
        return len(source), "rows"
    except TypeError:
        return None, "rows"


class ProgressBar:
    """A ``rich`` progress bar on stderr, only on a terminal and only for large inputs (or when forced)."""

    def __init__(self, source: Any, enabled: bool | None, description: str) -> None:
        self.bar: Any = None
        total, unit = _total_size(source)
        if enabled is None:
            big = total is not None and total >= (_PROGRESS_MIN_BYTES if unit == "bytes" else _PROGRESS_MIN_ROWS)
            enabled = big and isatty(sys.stderr)
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
        columns.append(DownloadColumn() if unit == "bytes" else TextColumn("{task.completed}/{task.total} rows"))
        columns.append(TimeRemainingColumn())
        # The bar moves the cursor with escape sequences of its own: it writes to the terminal under the CLI's
        # escaping stderr (its description is trainguard's own text).
        self.bar = Progress(*columns, console=Console(file=terminal_of(sys.stderr)), transient=True)
        self.task = self.bar.add_task(description, total=total)
        self.bar.start()

    def advance(self, amount: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, amount)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
