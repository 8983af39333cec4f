"""What a checkpoint check found: :class:`Problem` (one thing wrong with one file) and :class:`CheckpointReport`
(everything found in one folder, with its status).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...display import printable
from ...safe_fs import display_name

__all__ = ["CheckpointReport", "Problem"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file of a checkpoint.

    ``kind`` is one of ``missing``, ``truncated``, ``size``, ``changed``, ``malformed``, ``extra``,
    ``interrupted``, ``unreadable``, ``unverified`` (no manifest where one was required), ``empty`` (nothing a
    checkpoint holds), ``special`` (a FIFO, socket, device, a link to a folder or a broken link) or ``link`` (a link
    leading outside the folder); in :attr:`CheckpointReport.warnings`, ``extra`` (a file the Trainer never loads),
    ``stale`` (a leftover marker or temporary file) or ``nested`` (a commit marker in a subfolder). ``file`` is the
    name as the filesystem gives it; :meth:`to_dict` shows a name that is not UTF-8 escaped (and is otherwise
    exact), :meth:`format` is one printable line (:func:`~trainguard.display.printable`: a control character or a
    newline in the name or the detail is shown escaped, never obeyed by a terminal).
    """

    file: str
    kind: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"file": display_name(self.file), "kind": self.kind, "detail": self.detail}

    def format(self) -> str:
        return printable(f"{self.file or '.'}: {self.detail}")


@dataclass
class CheckpointReport:
    """What :func:`check_checkpoint` found in one folder.

    ``mode`` is ``"manifest"`` (sizes, structure and sha256 of every file against the manifest), ``"structural"``
    (a legacy checkpoint, written without trainguard: sizes, headers, JSON, zip CRCs only) or ``"none"`` (nothing
    could be checked: the folder is missing, or the save was interrupted). ``warnings`` are things worth knowing
    that do not make the checkpoint unusable (a ``.DS_Store`` added after the save).
    """

    path: Path
    ok: bool
    mode: str
    step: int | None = None
    files: int = 0
    bytes: int = 0
    hashed_bytes: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``verified``, ``unverified (legacy)`` (structural checks passed, no manifest) or ``FAILED``."""
        if not self.ok:
            return "FAILED"
        return "verified" if self.mode == "manifest" else "unverified (legacy)"

    @property
    def interrupted(self) -> bool:
        """True when the folder is an interrupted save (rather than damaged or legacy)."""
        return any(p.kind == "interrupted" for p in self.problems)

    def describe(self) -> str:
        """One printable line: the status and, when it failed, every problem."""
        name = printable(self.path.name)
        if self.ok:
            extra = f"; warning: {'; '.join(w.format() for w in self.warnings)}" if self.warnings else ""
            return f"{name}: {self.status} ({self.files} files, {self.mode} checks){extra}"
        return f"{name}: " + "; ".join(p.format() for p in self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": display_name(self.path),
            "name": display_name(self.path.name),
            "ok": self.ok,
            "status": self.status,
            "mode": self.mode,
            "step": self.step,
            "files": self.files,
            "bytes": self.bytes,
            "hashed_bytes": self.hashed_bytes,
            "seconds": round(self.seconds, 4),
            "problems": [p.to_dict() for p in self.problems],
            "warnings": [w.to_dict() for w in self.warnings],
            "notes": list(self.notes),
        }
