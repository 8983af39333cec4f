"""Crash-loop detection: record how each run in an ``output_dir`` ended, refuse a start that would repeat a failure.

Every start appends a ``start`` record to ``output_dir/trainguard-crashes.jsonl`` (step it starts at, batch
settings, UTC time, host, PID); an exception out of training appends a ``failure`` record (step, exception type,
first line of the message, whether it is an out-of-memory error, rank); a finished or gracefully stopped run
appends ``end`` with ``status="clean"``; a run interrupted on purpose (Ctrl-C, a second stop signal) appends
``end`` with ``status="interrupted"``. A start with none of these after it and no live process died without a
trace (SIGKILL, the kernel's OOM killer, a node failure): it counts as a failure of unknown type at the step it
started from.

:func:`find_crash_loop` walks back from the newest finished run: when the same failure (same step, same exception
type) ended the last ``max_repeats`` runs in a row, it is a loop. A clean end breaks the streak; an interrupted
run is neutral. For a CUDA out-of-memory loop :func:`oom_fix` proposes half the per-device batch and twice the
gradient accumulation, which keeps the global batch. :func:`decide_start` is the policy CrashLoopGuard acts on
before a run starts: go on, apply that fix, or refuse.

Every line is one ``append_line`` write, so ranks of one job can record their own failures in the same file.

The log is written ``0600`` and holds no secret: the exception message (the only free text in it) is redacted
(:func:`trainguard.redact.redact_text`) before it is written, and again when read (older logs). It is never written
or read through a symbolic link and never blocks on a FIFO: a link or special file at its name is an
:class:`~trainguard.errors.UnsafeFileError` naming it (:func:`load_runs` raises it; CrashLoopGuard refuses the
start with it rather than decide without the history). A line that is not JSON, nests too deep, holds a number
JSON cannot (``1e999``) or a field of the wrong type is skipped and counted, never a traceback.

Example::

    loop = find_crash_loop("out", max_repeats=3)
    if loop: print(loop.describe())
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._util import pid_alive, utc_now
from ..alerts import get_logger
from ..atomic import append_line
from ..errors import MalformedFileError, PreflightError, TrainGuardError
from ..redact import redact_json, redact_text
from ..safe_fs import display_name, parse_json, read_tail_lines

__all__ = [
    "CRASH_LOG",
    "CrashLoop",
    "OpenRuns",
    "RunRecord",
    "StartDecision",
    "check_crash_loop",
    "crash_log_path",
    "crash_loop_error",
    "decide_start",
    "describe_exception",
    "failing_step",
    "find_crash_loop",
    "is_oom",
    "load_run_history",
    "load_runs",
    "oom_fix",
    "record_end",
    "record_failure",
    "record_start",
]

CRASH_LOG = "trainguard-crashes.jsonl"
UNKNOWN = "unknown (died without a record: SIGKILL, OOM killer or node failure)"
_MESSAGE_HEAD = 300
# Only the tail of a (huge, append-only) log is read: the recent runs are the ones that decide.
_READ_LIMIT = 64 << 20
_MAX_RECORD_DEPTH = 16

PathLike = str | os.PathLike[str]


def crash_log_path(output_dir: PathLike) -> Path:
    """``output_dir/trainguard-crashes.jsonl``."""
    return Path(output_dir) / CRASH_LOG


def _append(output_dir: PathLike, record: dict[str, Any]) -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    # 0600: records carry host names, PIDs and exception text; never through a link, never into a FIFO.
    append_line(crash_log_path(output_dir), json.dumps(record, ensure_ascii=False, default=str), mode=0o600)


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA (or other accelerator) out-of-memory error, without importing torch.

    ``torch.OutOfMemoryError`` (alias ``torch.cuda.OutOfMemoryError``) or a ``RuntimeError`` whose message says
    "out of memory" (older torch, cuDNN, XPU and NPU report it that way).
    """
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def describe_exception(exc: BaseException) -> tuple[str, str]:
    """``(qualified type name, first line of the message with secrets redacted, at most 300 characters)``."""
    cls = type(exc)
    module = cls.__module__
    name = cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"
    text = str(exc).strip().splitlines()
    # Redact before cutting (a cut token is no longer recognised), and only a bounded head of a huge message.
    head = redact_text(text[0][: _MESSAGE_HEAD * 4]) if text else ""
    return name, head[:_MESSAGE_HEAD]


# -------------------------------------------------------------------------------------------------- writing
def record_start(
    output_dir: PathLike,
    *,
    run_id: str,
    step: int,
    batch: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Append the ``start`` record of run ``run_id`` (one writer per job)."""
    _append(
        output_dir,
        {
            "event": "start",
            "run_id": run_id,
            "step": int(step),
            "batch": dict(batch or {}),
            "utc": utc_now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **redact_json(extra or {}),
        },
    )


def record_failure(output_dir: PathLike, *, run_id: str, step: int, exc: BaseException, rank: int = 0) -> None:
    """Append a ``failure`` record: the exception that ended run ``run_id`` on this rank at ``step``."""
    name, head = describe_exception(exc)
    _append(
        output_dir,
        {
            "event": "failure",
            "run_id": run_id,
            "step": int(step),
            "exception": name,
            "message": head,
            "oom": is_oom(exc),
            "utc": utc_now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "rank": int(rank),
        },
    )


def record_end(output_dir: PathLike, *, run_id: str, step: int, status: str = "clean", reason: str = "") -> None:
    """Append the ``end`` record of run ``run_id``: ``status`` is ``"clean"`` or ``"interrupted"``."""
    if status not in ("clean", "interrupted"):
        raise ValueError(f"status must be 'clean' or 'interrupted', not {status!r}")
    record: dict[str, Any] = {"event": "end", "run_id": run_id, "step": int(step), "status": status}
    if reason:
        record["reason"] = redact_text(reason)
    record.update({"utc": utc_now(), "host": socket.gethostname(), "pid": os.getpid()})
    _append(output_dir, record)


class OpenRuns:
    """Runs that have started and not ended: run_id -> (output_dir, step getter). The guards on each Trainer keep
    one; a hard exit (second stop signal) marks its runs interrupted so that a deliberate kill is never counted as
    a crash, and a hang abort records its failure into them."""

    def __init__(self) -> None:
        self._runs: dict[str, tuple[Path, Any]] = {}

    def open(self, run_id: str, output_dir: PathLike, step_getter: Any) -> None:
        """Register run ``run_id`` writing its crash log in ``output_dir``; ``step_getter()`` gives its step."""
        self._runs[run_id] = (Path(output_dir), step_getter)

    def close(self, run_id: str) -> None:
        """The run ended (its end or failure is recorded, or is being recorded now)."""
        self._runs.pop(run_id, None)

    def ids(self) -> list[str]:
        return list(self._runs)

    def items(self) -> list[tuple[str, Path]]:
        """``(run_id, output_dir)`` of every open run."""
        return [(run_id, output_dir) for run_id, (output_dir, _getter) in list(self._runs.items())]

    def mark_interrupted(self, reason: str) -> None:
        """Record every open run as interrupted and close it (called just before a deliberate hard exit: never
        raises)."""
        for run_id, (output_dir, step_getter) in list(self._runs.items()):
            try:
                step = int(step_getter()) if callable(step_getter) else 0
                record_end(output_dir, run_id=run_id, step=step, status="interrupted", reason=reason)
            except Exception:  # about to exit: never let bookkeeping stop the exit
                pass
            self._runs.pop(run_id, None)


# -------------------------------------------------------------------------------------------------- reading
@dataclass
class RunRecord:
    """One start and what became of it.

    Attributes:
        run_id: The id shared by the job's ranks.
        start: The ``start`` record (empty when the log holds failures of a start it lacks).
        failures: ``failure`` records, one per rank that recorded one.
        end: The ``end`` record, or None.
        outcome: ``clean``, ``failed``, ``interrupted``, ``unknown`` (died without a record) or ``running``.
    """

    run_id: str
    start: dict[str, Any] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    outcome: str = "running"

    @property
    def signatures(self) -> set[tuple[int, str]]:
        """The ``(step, exception type)`` pairs that ended this run (several ranks may record different ones)."""
        if self.outcome == "unknown":
            return {(_as_int(self.start.get("step")), UNKNOWN)}
        return {(_as_int(f.get("step")), str(f.get("exception"))) for f in self.failures}

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "outcome": self.outcome,
            "start": self.start,
            "failures": self.failures,
            "end": self.end,
        }


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _still_running(run: RunRecord, host: str, open_runs: Collection[str]) -> bool:
    """A start without an end is alive if it is one of this process's open runs or its PID lives on this host."""
    pid = run.start.get("pid")
    if pid == os.getpid():
        return run.run_id in open_runs
    return run.start.get("host") == host and pid_alive(pid)


# The type each field must have where present (bool is not an int here); a line breaking one is skipped.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "pid": (int,),
    "rank": (int,),
    "host": (str,),
    "utc": (str,),
    "exception": (str,),
    "message": (str,),
    "oom": (bool,),
    "status": (str,),
    "reason": (str,),
    "batch": (dict,),
}
_EVENTS = ("start", "failure", "end")


def _valid(value: Any) -> bool:
    if not isinstance(value, dict) or value.get("event") not in _EVENTS or not isinstance(value.get("run_id"), str):
        return False
    for key, types in _FIELD_TYPES.items():
        if key in value:
            item = value[key]
            if not isinstance(item, types) or (bool not in types and isinstance(item, bool)):
                return False
    return True


def _read_records(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The records of the log and the line numbers of malformed lines (a torn last line is expected).

    Raises:
        UnsafeFileError: A link, FIFO, device or socket is at ``path`` (never followed, never blocks).
    """
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    try:
        lines = read_tail_lines(path, limit=_READ_LIMIT, follow=False)
    except FileNotFoundError:
        return records, bad
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            value = parse_json(raw, source=path, max_depth=_MAX_RECORD_DEPTH)
        except MalformedFileError:
            value = None
        if _valid(value):
            records.append(redact_json(value))
        else:
            bad.append(number)
    return records, bad


def load_runs(output_dir: PathLike, *, warn: bool = True, open_runs: Collection[str] = ()) -> list[RunRecord]:
    """Every run recorded in ``output_dir/trainguard-crashes.jsonl``, oldest first, with its outcome.

    Malformed lines (not JSON, too deep, a number JSON cannot hold, a field of the wrong type) are skipped (the log
    must never stop a run); with ``warn`` they are counted and named, with the file and line, on the ``trainguard``
    logger. A run whose start has no end and no failure is ``unknown`` unless its process is alive on this host
    (then ``running``); for a start of this process, unless its id is in ``open_runs`` (the runs open here).

    Raises:
        UnsafeFileError: A link, FIFO, device or socket is at the log's name (never followed, never blocks).

    Example::

        [r.outcome for r in load_runs("out")]
    """
    runs, bad = load_run_history(output_dir, open_runs=open_runs)
    if bad and warn:
        get_logger().warning(
            "%s: skipped %d malformed line(s) (line %s); the crash history may be incomplete",
            display_name(crash_log_path(output_dir)),
            len(bad),
            ", ".join(map(str, bad[:10])),
        )
    return runs


def load_run_history(output_dir: PathLike, *, open_runs: Collection[str] = ()) -> tuple[list[RunRecord], list[int]]:
    """:func:`load_runs` without the warning: the runs, and the numbers of the lines that were skipped as
    malformed (for a report such as ``trainguard inspect``).

    Raises:
        UnsafeFileError: A link, FIFO, device or socket is at the log's name.
    """
    records, bad = _read_records(crash_log_path(output_dir))
    runs: dict[str, RunRecord] = {}
    for record in records:
        run = runs.setdefault(record["run_id"], RunRecord(record["run_id"]))
        event = record["event"]
        if event == "start":
            run.start = record
        elif event == "failure":
            run.failures.append(record)
        elif event == "end":
            run.end = record
    host = socket.gethostname()
    for run in runs.values():
        if run.end is not None and run.end.get("status") == "interrupted":
            run.outcome = "interrupted"
        elif run.failures:
            run.outcome = "failed"
        elif run.end is not None:
            run.outcome = "clean"
        else:
            run.outcome = "running" if _still_running(run, host, open_runs) else "unknown"
    return list(runs.values()), bad


@dataclass
class CrashLoop:
    """A failure that ended the last ``count`` runs in a row.

    Attributes:
        step: The step it happened at (for ``unknown`` deaths: the step the runs started from).
        exception: The exception type, or :data:`UNKNOWN`.
        count: How many runs in a row it ended.
        oom: True when it is an out-of-memory error.
        runs: Those runs, newest first.
        message: The first line of the newest failure's message.
    """

    step: int
    exception: str
    count: int
    oom: bool
    runs: list[RunRecord]
    message: str = ""

    @property
    def last_batch(self) -> dict[str, Any]:
        """The batch settings the newest of these runs started with (empty if not recorded)."""
        batch = self.runs[0].start.get("batch") if self.runs else None
        return dict(batch) if isinstance(batch, dict) else {}

    def describe(self) -> str:
        where = "started from" if self.exception == UNKNOWN else "at"
        text = f"the last {self.count} runs in a row ended with {self.exception} {where} step {self.step}"
        return text + (f" ({self.message})" if self.message else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "exception": self.exception,
            "count": self.count,
            "oom": self.oom,
            "message": self.message,
            "run_ids": [r.run_id for r in self.runs],
        }


def find_crash_loop(
    output_dir: PathLike,
    *,
    max_repeats: int = 3,
    runs: Iterable[RunRecord] | None = None,
    progress_step: int | None = None,
) -> CrashLoop | None:
    """The failure that ended the newest ``max_repeats`` (or more) finished runs in a row, or None.

    Runs still running and interrupted runs are skipped; a clean end breaks the streak, and so does progress: a run
    after which the next one started from a later step (it committed a checkpoint past its own start, and the next
    resumed from it) is not the repeat of a loop, even if it died the same way. ``progress_step`` is the step the
    coming start resumes from, which decides that for the newest run (None: unknown, no progress). A loop is the
    same failure at the same place with nothing new committed.

    Example::

        find_crash_loop("out", max_repeats=3)
    """
    if max_repeats < 1:
        return None
    history = [
        r for r in (runs if runs is not None else load_runs(output_dir)) if r.outcome in ("clean", "failed", "unknown")
    ]
    if not history or history[-1].outcome == "clean":
        return None
    starts = [_as_int(r.start.get("step")) for r in history]
    later = [*starts[1:], progress_step if progress_step is not None else -1]
    progressed = [after > start for start, after in zip(starts, later, strict=True)]
    newest = history[-1]
    best: CrashLoop | None = None
    for signature in sorted(newest.signatures):
        streak: list[RunRecord] = []
        for run, made_progress in zip(reversed(history), reversed(progressed), strict=True):
            if signature not in run.signatures or made_progress:
                break
            streak.append(run)
        step, name = signature
        failures = [f for f in newest.failures if (_as_int(f.get("step")), str(f.get("exception"))) == signature]
        oom = any(bool(f.get("oom")) for f in failures)
        message = str(failures[0].get("message", "")) if failures else ""
        # Several ranks may record different errors for one failure (an OOM on one, a broken collective on the
        # others): the longest streak wins, and on a tie the OOM, because it comes with a fix.
        if best is None or (len(streak), oom) > (best.count, best.oom):
            best = CrashLoop(step, name, len(streak), oom, streak, message)
    if best is None or best.count < max_repeats:
        return None
    return best


def oom_fix(per_device_train_batch_size: int, gradient_accumulation_steps: int) -> tuple[int, int] | None:
    """Half the per-device batch, twice the accumulation: the same global batch. None when the batch is 1 or odd
    halving would change the global batch.

    Example::

        oom_fix(8, 2)   # (4, 4)
    """
    if per_device_train_batch_size < 2 or per_device_train_batch_size % 2:
        return None
    return per_device_train_batch_size // 2, gradient_accumulation_steps * 2


def check_crash_loop(
    output_dir: PathLike,
    *,
    max_repeats: int = 3,
    per_device_train_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
) -> None:
    """Raise :class:`PreflightError` when the last ``max_repeats`` runs in ``output_dir`` ended the same way;
    return (nothing) when they did not. :func:`find_crash_loop` gives the loop itself instead of raising.

    For an out-of-memory loop the message proposes the halved per-device batch with doubled accumulation
    (from the given settings, else from those the failing runs recorded).

    Raises:
        PreflightError: The same failure repeats; the message says which, at which step and how often.

    Example::

        check_crash_loop("out", per_device_train_batch_size=8, gradient_accumulation_steps=1)
    """
    loop = find_crash_loop(output_dir, max_repeats=max_repeats)
    if loop is not None:
        raise crash_loop_error(output_dir, loop, per_device_train_batch_size, gradient_accumulation_steps)


@dataclass(frozen=True)
class StartDecision:
    """What to do with a run about to start in an ``output_dir``, from its recorded runs (:func:`decide_start`).

    Attributes:
        action: ``"go"`` (no loop: start as configured), ``"fix"`` (an out-of-memory loop: start with the batch
            settings in ``after``) or ``"refuse"`` (raise ``error``).
        runs: Earlier runs recorded in the log.
        abnormal: How many of them ended abnormally (failed, or died without a record).
        loop: The crash loop found, or None.
        before: For ``"fix"``: ``(per_device_train_batch_size, gradient_accumulation_steps)`` the fix halves from.
        after: For ``"fix"``: the settings to apply (same global batch).
        error: For ``"refuse"``: the :class:`PreflightError` to raise.
    """

    action: str
    runs: int = 0
    abnormal: int = 0
    loop: CrashLoop | None = None
    before: tuple[int, int] | None = None
    after: tuple[int, int] | None = None
    error: PreflightError | None = None

    @property
    def history(self) -> str:
        """``"4 earlier run(s), 3 ended abnormally"``."""
        return f"{self.runs} earlier run(s), {self.abnormal} ended abnormally"


def decide_start(
    output_dir: PathLike,
    *,
    per_device_train_batch_size: int,
    gradient_accumulation_steps: int,
    max_repeats: int = 3,
    apply_oom_fix: bool = False,
    can_change_batch: bool = True,
    resume_step: int | None = None,
    open_runs: Collection[str] = (),
) -> StartDecision:
    """Decide, from the runs recorded in ``output_dir``, whether a run with these batch settings may start.

    No loop (or ``max_repeats`` 0): go on. An out-of-memory loop with ``apply_oom_fix``: the :func:`oom_fix` of the
    batch the last failing run used when it kept this run's global batch (so repeated OOMs keep halving), else of
    the given settings; refused instead when the batch cannot be halved evenly or ``can_change_batch`` is False
    (DeepSpeed holds the batch size in its own config). Any other loop: refuse with :func:`crash_loop_error`.
    ``resume_step``: the step this start resumes from (0 for a fresh start); past the step the failing runs
    started from, it is progress and no loop. ``open_runs``: the ids of the runs this process has open.

    Example::

        decision = decide_start("out", per_device_train_batch_size=8, gradient_accumulation_steps=1,
                                apply_oom_fix=True)
        if decision.action == "refuse": raise decision.error
    """
    runs = load_runs(output_dir, open_runs=open_runs)
    abnormal = sum(1 for r in runs if r.outcome in ("failed", "unknown"))
    loop = find_crash_loop(output_dir, max_repeats=max_repeats, runs=runs, progress_step=resume_step)
    if loop is None:
        return StartDecision("go", runs=len(runs), abnormal=abnormal)
    bs, ga = int(per_device_train_batch_size), int(gradient_accumulation_steps)
    if loop.oom and apply_oom_fix:
        last = loop.last_batch
        # Halve from where the last failing run stood when it kept this run's global batch (a fix applied
        # before), so repeated OOMs keep halving instead of restarting from the user's setting.
        lbs, lga = last.get("per_device_train_batch_size"), last.get("gradient_accumulation_steps")
        if isinstance(lbs, int) and isinstance(lga, int) and lbs * lga == bs * ga:
            bs, ga = lbs, lga
        fix = oom_fix(bs, ga)
        if fix is not None and can_change_batch:
            return StartDecision("fix", len(runs), abnormal, loop, before=(bs, ga), after=fix)
    error = crash_loop_error(output_dir, loop, bs, ga)
    return StartDecision("refuse", len(runs), abnormal, loop, error=error)


def crash_loop_error(
    output_dir: PathLike,
    loop: CrashLoop,
    per_device_train_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
) -> PreflightError:
    """The :class:`PreflightError` that refuses a start repeating ``loop`` (with the OOM advice when it applies)."""
    log = crash_log_path(output_dir)
    batch = loop.last_batch
    bs = per_device_train_batch_size or _as_int(batch.get("per_device_train_batch_size"))
    ga = gradient_accumulation_steps or _as_int(batch.get("gradient_accumulation_steps"))
    evidence: dict[str, Any] = {"loop": loop.to_dict(), "log": str(log)}
    advice = ""
    if loop.oom:
        fix = oom_fix(bs, max(ga, 1)) if bs > 0 else None
        if fix is not None:
            evidence["oom_fix"] = {"per_device_train_batch_size": fix[0], "gradient_accumulation_steps": fix[1]}
            advice = (
                f"This is an out-of-memory loop: set per_device_train_batch_size={fix[0]} and "
                f"gradient_accumulation_steps={fix[1]} (was {bs} and {max(ga, 1)}; the global batch stays the same), "
                "or pass CrashLoopGuard(apply_oom_fix=True) to apply it automatically. "
            )
        else:
            advice = (
                f"This is an out-of-memory loop and the per-device batch ({bs if bs > 0 else 'unknown'}) cannot be "
                "halved evenly: shorten the longest sequences, enable gradient checkpointing, or use a smaller "
                "model or more memory. "
            )
    return PreflightError(
        f"crash loop in {output_dir}: {loop.describe()}; starting again would most likely fail the same way",
        where={"file": str(log), "step": loop.step},
        next_step=advice
        + f"Fix the cause, then start again; to start anyway, set the log {log.name} aside (rename it) or pass "
        "CrashLoopGuard(max_repeats=None).",
        evidence=evidence,
    )


def failing_step(exc: BaseException, global_step: int, *, in_step: bool) -> int:
    """The step being trained when ``exc`` happened, the meaning of "step" in every guard's messages: the step a
    trainguard error names; otherwise ``global_step + 1`` inside a step (the Trainer counts a step once it ends), and
    ``global_step`` between steps (an evaluation or a save after it)."""
    named = getattr(exc, "where", None)
    if isinstance(exc, TrainGuardError) and isinstance(named, dict) and isinstance(named.get("step"), int):
        return int(named["step"])
    return global_step + 1 if in_step else global_step
