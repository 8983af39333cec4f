"""What the hang watchdog tells: :class:`HangReport`, dump file names, finding dumps, and the dump text.

A dump file is ``output_dir/trainguard-hang-rank{r}-{UTC as 20260807T120305.123Z}.txt``: a header (rank, pid, host,
the stall as a :class:`~trainguard.HangError`, phase, budget, who detected it, the threads) and every thread's
stack. It is written atomically and also logged on the ``trainguard`` logger.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..._util import utc_now, utc_stamp
from ...alerts import get_logger
from ...atomic import atomic_write_text
from ...errors import HangError

__all__ = ["HangReport", "dump_file_name", "dumped_ranks", "find_dumps", "log_dump", "render_dump", "write_dump"]

_DUMP_RE = re.compile(r"^trainguard-hang-rank(\d+)-(\d{8}T\d{6}\.\d{3}Z)(?:-\d+)?\.txt$")
_PHASE_WORDS = {
    "first_step": "the first step (compilation, data-loader warm-up)",
    "step": "a training step",
    "eval": "an evaluation",
    "save": "a checkpoint save",
    "resume": "the first step after a resume (includes the Trainer's skip over already-trained batches)",
    "finalize": "the end of training (final log, load_best_model_at_end)",
}
_PHASE_HINTS = {
    "resume": "If the Trainer is still skipping already-trained batches (transformers#11284), raise resume_timeout "
    "or pass ignore_data_skip=True; otherwise read the main thread's frames.",
    "eval": "The main thread's frames show whether it waits in the eval data loader, in a collective (a rank that "
    "evaluates alone) or in compute_metrics.",
    "save": "A save that waits in a collective usually means a rank skipped the save or saves alone "
    "(FSDP/ZeRO-3 gathers); compare the dumps of every rank.",
}


def _utc_stamp(when: float | None = None) -> str:
    return utc_stamp(when, milliseconds=True)


def _utc_iso(when: float | None = None) -> str:
    return utc_now("milliseconds", time.time() if when is None else when)


def dump_file_name(rank: int, when: float | None = None) -> str:
    """The name of a dump file: ``trainguard-hang-rank{rank}-{UTC as 20260807T120305.123Z}.txt``."""
    return f"trainguard-hang-rank{rank}-{_utc_stamp(when)}.txt"


def find_dumps(output_dir: str | os.PathLike[str], rank: int | None = None) -> list[Path]:
    """The dump files in ``output_dir`` (for one rank, or all), oldest first by the UTC time in their name."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _DUMP_RE.match(path.name)
        if match and (rank is None or int(match.group(1)) == rank):
            found.append((match.group(2), path.name, path))
    return [path for _, _, path in sorted(found)]


def dumped_ranks(output_dir: str | os.PathLike[str], since: float) -> set[int]:
    """The ranks with a dump file in ``output_dir`` modified at or after wall-clock time ``since``."""
    ranks = set()
    for path in find_dumps(output_dir):
        match = _DUMP_RE.match(path.name)
        with contextlib.suppress(OSError):
            if match and path.stat().st_mtime >= since:
                ranks.add(int(match.group(1)))
    return ranks


@dataclass
class HangReport:
    """One event of the watchdog, handed to ``on_report``.

    ``kind`` is ``"stall"`` (no progress within the budget: stacks dumped), ``"recovered"`` (progress came back
    after a reported stall) or ``"earlier"`` (a dump left by an earlier process that faulthandler's timer ended, or
    that died while stuck; found at start).
    """

    kind: str
    rank: int
    phase: str
    step: int
    budget: float
    budget_rule: str
    stalled_for: float
    action: str
    detected_by: str
    file: Path | None = None
    dump_index: int = 1
    time: str = field(default_factory=_utc_iso)
    stacks: str = ""

    @property
    def at_step(self) -> int:
        """The step the stall is in: the one being trained, or the last completed one for eval, save and finalize."""
        return self.step + 1 if self.phase in ("step", "first_step", "resume") else self.step

    @property
    def where_words(self) -> str:
        if self.phase in ("step", "first_step", "resume"):
            return f"step {self.step + 1} ({_PHASE_WORDS[self.phase]})"
        if self.phase == "eval":
            return f"the evaluation after step {self.step}"
        if self.phase == "save":
            return f"the save of checkpoint-{self.step}"
        return f"{_PHASE_WORDS.get(self.phase, self.phase)}, after step {self.step}"

    def error(self) -> HangError:
        """The stall as a :class:`~trainguard.HangError` (what, where, next step, evidence)."""
        if self.kind == "recovered":
            what = f"progress resumed after a stall of {self.stalled_for:.1f} s in {self.where_words}"
        elif self.kind == "earlier":
            what = (
                f"an earlier process on rank {self.rank} was dumped while stuck in {self.where_words} "
                f"({self.detected_by})"
            )
        else:
            what = (
                f"no training progress for {self.stalled_for:.1f} s in {self.where_words}; "
                f"budget {self.budget:g} s ({self.budget_rule})"
            )
        hint = _PHASE_HINTS.get(self.phase)
        next_step = HangError.default_next_step + (" " + hint if hint else "")
        where: dict[str, Any] = {"file": str(self.file) if self.file else None, "step": self.at_step, "rank": self.rank}
        where["phase"] = self.phase
        return HangError(
            what, where={k: v for k, v in where.items() if v is not None}, next_step=next_step, evidence=self.evidence()
        )

    @property
    def message(self) -> str:
        return self.error().what

    def evidence(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "phase": self.phase,
            "step": self.step,
            "budget_s": round(self.budget, 3),
            "budget_rule": self.budget_rule,
            "stalled_for_s": round(self.stalled_for, 3),
            "action": self.action,
            "detected_by": self.detected_by,
            "file": str(self.file) if self.file else None,
            "dump_index": self.dump_index,
        }


def render_dump(report: HangReport, world: int, stacks: str, order: str) -> str:
    """The text of a dump file: the header (who, where, what, which threads), then ``stacks`` in ``order``."""
    main = threading.main_thread()
    names = ", ".join(
        f"0x{t.ident or 0:016x} {t.name!r}{' (main)' if t is main else ''}{' daemon' if t.daemon else ''}"
        for t in threading.enumerate()
    )
    err = report.error()
    lines = [
        f"trainguard hang dump: rank {report.rank} of {world}, pid {os.getpid()}, "
        f"host {socket.gethostname()}, {report.time} UTC",
        str(err),
        f"  phase: {report.phase}; step: {report.step} completed; budget: {report.budget:g} s "
        f"({report.budget_rule}); action: {report.action}; dump {report.dump_index} of this stall",
        f"  detected by: {report.detected_by}",
        f"  main thread (runs the training loop): Thread 0x{main.ident or 0:016x}",
        f"  threads now: {names}",
        "",
        f"== Python stacks of every thread ({order}) ==",
        stacks,
    ]
    return "\n".join(lines)


def write_dump(path: Path, text: str) -> Path | None:
    """Write a dump file atomically; None (and an error log) when it cannot be written."""
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        get_logger().error("trainguard hang watchdog: cannot write %s (%s); the stacks follow in the log", path, exc)
        return None
    return path


def log_dump(report: HangReport, text: str) -> None:
    """Log a dump on the ``trainguard`` logger (CRITICAL), naming its file when it was written."""
    where = f" (written to {report.file})" if report.file else ""
    get_logger().critical("trainguard hang watchdog%s:\n%s", where, text)
