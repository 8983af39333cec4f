"""The hang watchdog engine: every thread's stack when progress stops, even while C code holds the GIL.

A plain class, usable with or without a Trainer. The training thread calls :meth:`Watchdog.beat` at each sign of
progress (one ``time.monotonic()`` stored in an attribute, nothing else). Two detectors watch the timestamp:

1. **A Python monitor thread** (``trainguard-watchdog``), woken about once a second. When the budget of the current
   phase has passed without a beat it writes every thread's stack (with thread names and source lines) to
   ``output_dir/trainguard-hang-rank{r}-{utc}.txt`` and to the ``trainguard`` logger, adds native stacks from
   ``py-spy dump --native`` where py-spy is installed, calls ``on_report`` (the callback alerts through its sinks),
   then acts: ``"dump"`` keeps watching and dumps again after ``repeat_interval`` while the stall lasts;
   ``"abort"`` ends the process with ``exit_code`` so torchrun or a supervisor restarts it.
2. **faulthandler's C-level timer** (``faulthandler.dump_traceback_later``), a C thread that needs no GIL. A Python
   thread cannot run while the main thread sits in C code that holds the GIL (a catastrophic regex, a C extension
   that never releases it), so the monitor arms this timer as a backup, ``grace`` seconds after the Python
   deadline, and re-arms it with the remaining budget whenever it saw progress (at most once per monitor tick,
   about once a second: re-arming costs tens of microseconds, too much for every event). It writes all stacks to a
   pre-opened hidden file ``output_dir/.trainguard-hang-rank{r}-pid{pid}.pending``. When Python runs again, the
   monitor turns that into ``trainguard-hang-rank{r}-{utc}.txt``, logs it and reports it. With ``action="abort"``
   the timer exits the process itself (faulthandler's ``exit=True``: exit status 1) right after writing; the next
   start of a watchdog on that ``output_dir`` and rank turns the leftover into a dump file and reports it.

Budgets (seconds without any progress) per phase:

- ``step``: ``timeout`` when given; else learned: ``floor`` until ``warmup_steps`` steps were measured, then
  ``max(floor, multiplier x slowest step cycle seen)``. A step cycle is the time from one step's end to the next
  (data loading, forward, backward, optimizer, logging); cycles that include an evaluation or a save are not used.
- ``first_step`` (compilation, data-loader warm-up, sharded-model initialisation), ``eval`` (between evaluation
  batches, plus building the eval loader and ``compute_metrics``), ``save`` (one checkpoint save; also the end of
  training: ``load_best_model_at_end``) and ``resume`` (the first step after a resume, which includes the
  Trainer's data skip): each its own option, by default the larger of the step budget and 1800 s (3600 s for
  ``resume``).

Example::

    with Watchdog(timeout=600, output_dir="out") as wd:
        for batch in loader: wd.beat(); train_step(batch)
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from .. import distributed
from ..alerts import get_logger
from ..atomic import atomic_write_text
from ..errors import HangError

__all__ = [
    "ACTIONS",
    "PHASES",
    "HangReport",
    "Watchdog",
    "dump_file_name",
    "find_dumps",
]

ACTIONS = ("dump", "abort")
#: Phases, each with its own budget. ``finalize`` (after the last step) uses the ``save`` budget.
PHASES = ("first_step", "step", "eval", "save", "resume", "finalize")

# Defaults of the phase budgets, used when the option is None (never below the step budget).
_PHASE_DEFAULTS = {"first_step": 1800.0, "eval": 1800.0, "save": 1800.0, "resume": 3600.0}
_PHASE_OPTION = {"first_step": "first_step", "eval": "eval", "save": "save", "finalize": "save", "resume": "resume"}
_REPEAT_CAP = 3600.0
_PENDING_MARK = "----- faulthandler output (most recent call first) -----\n"
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

# faulthandler's timer is process-wide: one watchdog at a time owns it.
_ACTIVE: weakref.ReferenceType[Watchdog] | None = None
_ACTIVE_LOCK = threading.Lock()
_ATEXIT_REGISTERED = False


def _utc_stamp(when: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if when is None else when, timezone.utc)
    return moment.strftime("%Y%m%dT%H%M%S.") + f"{moment.microsecond // 1000:03d}Z"


def _utc_iso(when: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if when is None else when, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


def _check_seconds(name: str, value: float | None, *, allow_none: bool = True) -> float | None:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"Watchdog({name}=...) must be a number of seconds > 0, not None")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"Watchdog({name}=...) must be a number of seconds > 0, not {value!r}")
    return float(value)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        return HangError(what, where={k: v for k, v in where.items() if v is not None}, next_step=next_step,
                         evidence=self.evidence())

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


class Watchdog:
    """Dump every thread's stack when no progress is seen within a phase's budget, then act.

    Args:
        timeout: Budget of a training step in seconds. None (default): learned (see ``floor``, ``multiplier``,
            ``warmup_steps``).
        output_dir: Folder for dump files (created when missing).
        action: ``"dump"`` (default: dump, alert, keep watching and dump again while the stall lasts; nothing is
            killed by a false alarm) or ``"abort"`` (dump, alert, end the process with ``exit_code`` so torchrun or a
            supervisor restarts it from its last checkpoint).
        repeat_interval: With ``"dump"``, seconds between dumps while a stall lasts. None (default): the budget,
            doubling after each dump up to one hour, so a stall of hours leaves a handful of files, not hundreds.
        warmup_steps: Step cycles measured before the learned budget replaces ``floor`` (default 5, as NVRx: the
            first cycles carry allocator and cache warm-up).
        floor: The smallest learned step budget, and the budget during warm-up (default 300 s: a step of a healthy
            run can stall for minutes on a shared filesystem or a slow data shard; five minutes still beats the
            30 minutes of an NCCL timeout, or never when recipes set ``ddp_timeout`` to years).
        multiplier: Learned step budget = ``multiplier`` x the slowest step cycle seen (default 10: NVRx uses 5 for
            its max-observed rule; 10 leaves room for long-sequence batches and epoch boundaries).
        first_step_timeout: Budget of the first step. None: ``max(step budget, 1800)`` (torch.compile, DeepSpeed
            and FSDP initialisation, data-loader workers and streaming shards warm up here).
        eval_timeout: Budget between evaluation events. None: ``max(step budget, 1800)`` (building the eval loader
            and ``compute_metrics`` run without any event).
        save_timeout: Budget of a checkpoint save and of the end of training. None: ``max(step budget, 1800)``
            (large checkpoints on network storage take tens of minutes).
        resume_timeout: Budget of the first step after a resume, which includes the Trainer's skip over trained
            batches. None: ``max(step budget, 3600)`` (an iterable dataset is skipped by reading it).
        exit_code: Exit status of ``"abort"`` from the monitor thread (default 124, the ``timeout`` command's
            code). faulthandler's own exit, used when the GIL was held, is always 1.
        abort_grace: With ``"abort"`` on several ranks, seconds to wait for every rank's dump file to appear in
            ``output_dir`` before exiting (default 30), so the ranks that wait in a collective are dumped too
            before torchrun tears the job down. Returns early once all ranks have dumped.
        native_stacks: Add native stacks from ``py-spy dump --native``. None (default): when py-spy is installed.
        check_interval: Seconds between monitor wake-ups (default 1.0; shorter budgets wake it at a quarter of
            the budget).
        rank: Rank in the file names; None: :func:`trainguard.distributed.rank` at :meth:`start`.
        world_size: Ranks to wait for with ``"abort"``; None: :func:`trainguard.distributed.world_size`.
        on_report: Called with each :class:`HangReport` (from the monitor thread; must not block for long).

    Raises:
        ValueError: An option is out of range.

    Example::

        with Watchdog(timeout=600, output_dir="out", action="abort") as wd:
            for batch in loader: wd.beat(); train_step(batch)
    """

    def __init__(
        self,
        timeout: float | None = None,
        *,
        output_dir: str | os.PathLike[str] = ".",
        action: str = "dump",
        repeat_interval: float | None = None,
        warmup_steps: int = 5,
        floor: float = 300.0,
        multiplier: float = 10.0,
        first_step_timeout: float | None = None,
        eval_timeout: float | None = None,
        save_timeout: float | None = None,
        resume_timeout: float | None = None,
        exit_code: int = 124,
        abort_grace: float = 30.0,
        native_stacks: bool | None = None,
        check_interval: float = 1.0,
        rank: int | None = None,
        world_size: int | None = None,
        on_report: Callable[[HangReport], None] | None = None,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"Watchdog(action=...) must be one of {ACTIONS}, not {action!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Watchdog(warmup_steps=...) must be an integer >= 0, not {warmup_steps!r}")
        if isinstance(exit_code, bool) or not isinstance(exit_code, int) or not 0 < exit_code < 256:
            raise ValueError(f"Watchdog(exit_code=...) must be an integer from 1 to 255, not {exit_code!r}")
        if isinstance(abort_grace, bool) or not isinstance(abort_grace, (int, float)) or abort_grace < 0:
            raise ValueError(f"Watchdog(abort_grace=...) must be a number of seconds >= 0, not {abort_grace!r}")
        self.timeout = _check_seconds("timeout", timeout)
        self.repeat_interval = _check_seconds("repeat_interval", repeat_interval)
        self.floor = float(_check_seconds("floor", floor, allow_none=False) or 0.0)
        mult = _check_seconds("multiplier", multiplier, allow_none=False) or 0.0
        if mult < 1:
            raise ValueError(f"Watchdog(multiplier=...) must be >= 1, not {multiplier!r}")
        self.multiplier = float(mult)
        self.check_interval = float(_check_seconds("check_interval", check_interval, allow_none=False) or 1.0)
        self.phase_timeouts: dict[str, float | None] = {
            "first_step": _check_seconds("first_step_timeout", first_step_timeout),
            "eval": _check_seconds("eval_timeout", eval_timeout),
            "save": _check_seconds("save_timeout", save_timeout),
            "resume": _check_seconds("resume_timeout", resume_timeout),
        }
        self.output_dir = Path(output_dir)
        self.action = action
        self.warmup_steps = warmup_steps
        self.exit_code = exit_code
        self.abort_grace = float(abort_grace)
        self.native_stacks = native_stacks
        self.rank = rank
        self.world_size = world_size
        self.on_report = on_report
        #: Completed steps (the Trainer's ``global_step``); shown in reports.
        self.step = 0
        #: Every report so far (stalls, recoveries, earlier processes' dumps).
        self.reports: list[HangReport] = []
        self.steps_measured = 0
        self.slowest_step = 0.0
        # hot-path state: written by the training thread, read by the monitor
        self._last = time.monotonic()
        self._phase = "first_step"
        self._cycle_start: float | None = None
        self._stall_in_cycle = False
        self._step_ends: deque[float] = deque(maxlen=1024)
        self._prev_check = time.monotonic()
        self._starved_for = 0.0
        # monitor state
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._fd: int | None = None
        self._pending: Path | None = None
        self._header_len = 0
        self._armed_last: float | None = None
        self._armed_phase: str | None = None
        self._armed_wall_deadline = 0.0
        self._armed_mono_deadline = 0.0
        self._armed_timeout = 0.0
        self._stalled_since: float | None = None
        self._stall_phase = "step"
        self._stall_step = 0
        self._next_dump = 0.0
        self._dumps_in_stall = 0
        self._started_wall = 0.0
        self._rank = 0
        self._world = 1

    # ------------------------------------------------------------------------------------------- hot path
    def beat(self) -> None:
        """Record progress: one ``time.monotonic()`` stored in an attribute (about 0.1 µs)."""
        self._last = time.monotonic()

    def enter(self, phase: str) -> None:
        """Record progress and switch the budget to ``phase`` (one of :data:`PHASES`)."""
        if phase not in PHASES:
            raise ValueError(f"Watchdog phase must be one of {PHASES}, not {phase!r}")
        now = time.monotonic()
        if phase == self._phase:
            self._last = now
            return
        # A step cycle is measured only from a point inside the "step" phase, so the cycles that include an
        # evaluation, a save or the warm-up never feed the learned budget.
        self._cycle_start = now if phase == "step" else None
        self._phase = phase
        self._last = now
        # Phase changes are rare (first step done, evaluation, save): move the C timer to the new budget now rather
        # than at the monitor's next tick, so a GIL-holding stall right after a change from a long budget (first
        # step) to a short one (step) is still caught on time. Skipped while the monitor is busy dumping.
        if self.running and self._stalled_since is None and self._lock.acquire(blocking=False):
            try:
                budget, _ = self.budget(phase)
                self._armed_last, self._armed_phase = now, phase
                self._arm(budget + self._grace(budget))
            finally:
                self._lock.release()

    def step_end(self, step: int | None = None) -> None:
        """Record the end of a training step: progress, the step count, and (in phase ``step``) the cycle time."""
        now = time.monotonic()
        start = self._cycle_start
        if self._phase == "step" and start is not None and not self._stall_in_cycle:
            self.observe_step(now - start)
        # A cycle with a reported stall never feeds the learned budget: a hang must not teach a longer one.
        self._stall_in_cycle = False
        self._cycle_start = now
        self._step_ends.append(now)
        self.step = int(step) if step is not None else self.step + 1
        self._last = now

    def observe_step(self, seconds: float) -> None:
        """Feed one step cycle time to the learned budget."""
        self.steps_measured += 1
        if seconds > self.slowest_step:
            self.slowest_step = float(seconds)

    @property
    def phase(self) -> str:
        return self._phase

    # -------------------------------------------------------------------------------------------- budgets
    def step_budget(self) -> tuple[float, str]:
        """The budget of a training step and the rule that gave it."""
        if self.timeout is not None:
            return self.timeout, "explicit timeout"
        if self.steps_measured < self.warmup_steps or self.slowest_step <= 0:
            return self.floor, f"floor: learning, {self.steps_measured}/{self.warmup_steps} step(s) measured"
        learned = self.multiplier * self.slowest_step
        if learned <= self.floor:
            return self.floor, f"floor; {self.multiplier:g} x slowest step {self.slowest_step:.3g} s is lower"
        return learned, f"learned: {self.multiplier:g} x slowest step {self.slowest_step:.3g} s"

    def budget(self, phase: str | None = None) -> tuple[float, str]:
        """The budget of ``phase`` (default: the current one) in seconds, and the rule that gave it."""
        phase = phase or self._phase
        step, rule = self.step_budget()
        option = _PHASE_OPTION.get(phase)
        if option is None:
            return step, rule
        explicit = self.phase_timeouts[option]
        if explicit is not None:
            return explicit, f"{option}_timeout"
        default = _PHASE_DEFAULTS[option]
        if step > default:
            return step, f"{option} budget = step budget ({rule})"
        return default, f"{option}_timeout default {default:g} s"

    def _tick(self, budget: float) -> float:
        return min(self.check_interval, max(0.05, budget / 4))

    def _grace(self, budget: float) -> float:
        # The C timer is the backup: it fires only when the Python monitor missed the deadline by this much
        # (it could not run), so a healthy monitor always answers first and a loaded machine does not double-dump.
        return min(60.0, max(2.0, 2 * self._tick(budget), 0.1 * budget))

    # ------------------------------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, phase: str = "first_step") -> Watchdog:
        """Start watching in ``phase`` (idempotent: a running watchdog only records progress and the phase).

        Another running watchdog in this process is stopped first (faulthandler's timer is process-wide).
        """
        global _ACTIVE, _ATEXIT_REGISTERED
        if self.running:
            self.enter(phase)
            return self
        with _ACTIVE_LOCK:
            previous = _ACTIVE() if _ACTIVE is not None else None
            if previous is not None and previous is not self and previous.running:
                get_logger().warning("trainguard: a new hang watchdog replaces the one still running in this process")
                previous.stop()
            _ACTIVE = weakref.ref(self)
            if not _ATEXIT_REGISTERED:
                atexit.register(_stop_active)
                _ATEXIT_REGISTERED = True
        self._rank = distributed.rank() if self.rank is None else int(self.rank)
        self._world = distributed.world_size() if self.world_size is None else int(self.world_size)
        self._started_wall = time.time()
        self._stop.clear()
        self._prev_check = time.monotonic()
        self._stalled_since = None
        self._armed_last = None
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            get_logger().warning("trainguard hang watchdog: cannot create %s (%s)", self.output_dir, exc)
        self._collect_earlier()
        self._open_pending()
        self._cycle_start = None
        self._phase = phase if phase in PHASES else "first_step"
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="trainguard-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching: cancel the C timer, keep any dump it wrote, remove the empty pending file."""
        thread = self._thread
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        with self._lock:
            if self._owns_timer():
                faulthandler.cancel_dump_traceback_later()
            try:
                self._collect_c_dump(time.monotonic())
                if self._stalled_since is not None and self._last != self._armed_last:
                    self._report_recovered(self._last)  # progress came back after the monitor's last tick
            except Exception as exc:  # never let bookkeeping break the end of training
                get_logger().warning("trainguard hang watchdog: could not collect a dump: %s", exc)
            self._close_pending()
        self._thread = None

    def __enter__(self) -> Watchdog:
        return self.start("step")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _owns_timer(self) -> bool:
        return _ACTIVE is not None and _ACTIVE() is self

    # ------------------------------------------------------------------------------------- pending file
    def _pending_path(self, pid: int | None = None) -> Path:
        return self.output_dir / f".trainguard-hang-rank{self._rank}-pid{pid or os.getpid()}.pending"

    def _open_pending(self) -> None:
        path = self._pending_path()
        main = threading.main_thread()
        header = (
            "trainguard hang watchdog: stacks written by faulthandler's C-level timer\n"
            f"rank {self._rank} of {self._world}, pid {os.getpid()}, host {socket.gethostname()}, "
            f"started {_utc_iso(self._started_wall)}\n"
            f"main thread (runs the training loop): Thread 0x{main.ident or 0:016x}\n"
            "Stacks below mean: no progress for the budget and the Python monitor thread could not run, because\n"
            "the GIL was held (C code that does not release it). Each 'Timeout' line starts one dump.\n"
            + _PENDING_MARK
        )
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        except OSError as exc:
            # faulthandler can still write to stderr: the stacks reach the job's log instead of a file.
            get_logger().warning("trainguard hang watchdog: cannot open %s (%s); C-level dumps go to stderr", path, exc)
            self._fd, self._pending, self._header_len = None, None, 0
            return
        data = header.encode()
        os.write(fd, data)
        self._fd, self._pending, self._header_len = fd, path, len(data)

    def _close_pending(self) -> None:
        fd, path = self._fd, self._pending
        self._fd, self._pending = None, None
        if fd is not None:
            os.close(fd)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()  # our own file, empty of dumps (any dump was collected first)

    def _arm(self, timeout: float) -> None:
        if not self._owns_timer():
            return
        timeout = max(0.05, timeout)
        faulthandler.dump_traceback_later(
            timeout,
            repeat=self.action == "dump",
            file=self._fd if self._fd is not None else sys.__stderr__.fileno(),  # type: ignore[union-attr]
            exit=self.action == "abort",
        )
        self._armed_timeout = timeout
        self._armed_wall_deadline = time.time() + timeout
        self._armed_mono_deadline = time.monotonic() + timeout

    # ------------------------------------------------------------------------------------------- monitor
    def _run(self) -> None:
        warned = False
        while True:
            budget, _ = self.budget()
            if self._stop.wait(self._tick(budget)):
                return
            try:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self._check(time.monotonic())
            except Exception as exc:  # the watchdog must outlive its own bugs; say so once
                if not warned:
                    warned = True
                    get_logger().warning("trainguard hang watchdog: monitor error %s: %s", type(exc).__name__, exc)

    def _check(self, now: float) -> None:
        self._starved_for = now - self._prev_check
        self._prev_check = now
        self._collect_c_dump(now)
        last, phase = self._last, self._phase
        budget, _rule = self.budget(phase)
        if last != self._armed_last or phase != self._armed_phase:
            # Progress since the last tick: the stall (if any) is over; move the C timer's deadline. When this
            # thread was starved (the GIL was held, but not past the deadline) the remaining time can be short:
            # never arm a repeating timer shorter than the budget (a dump storm); the check below dumps from Python.
            if self._stalled_since is not None:
                self._report_recovered(last)
            self._armed_last, self._armed_phase = last, phase
            remaining = last + budget + self._grace(budget) - now
            self._arm(max(remaining, min(budget, 60.0)))
        stalled_for = now - last
        if self._stalled_since is None:
            if stalled_for >= budget:
                self._stalled_since = last
                self._stall_phase = phase
                self._stall_step = self.step
                self._dumps_in_stall = 0
                self._dump(now, budget)
        elif now >= self._next_dump and stalled_for >= budget and self.action == "dump":
            self._dump(now, budget)

    def _next_interval(self, budget: float) -> float:
        if self.repeat_interval is not None:
            return self.repeat_interval
        return min(_REPEAT_CAP, budget * (2 ** max(0, self._dumps_in_stall - 1)))

    def _dump(self, now: float, budget: float) -> None:
        if self._owns_timer():
            faulthandler.cancel_dump_traceback_later()
        self._dumps_in_stall += 1
        _, rule = self.budget(self._stall_phase)
        report = HangReport(
            kind="stall",
            rank=self._rank,
            phase=self._stall_phase,
            step=self.step,
            budget=budget,
            budget_rule=rule,
            stalled_for=now - self._last,
            action=self.action,
            detected_by="the watchdog thread (Python)",
            dump_index=self._dumps_in_stall,
        )
        if self._starved_for > 1.0 + self.check_interval:
            # The monitor itself could not run for a while (the GIL was held but the C timer had not fired yet):
            # the main thread may have moved on from where it stalled.
            report.detected_by += (
                f"; note: this thread could not run for {self._starved_for:.1f} s before this dump (the GIL was "
                "held), so the stacks show where the main thread is now, which may be past the stall"
            )
        path = self.output_dir / dump_file_name(self._rank)
        text = self._render(report, _python_stacks(), "most recent call LAST")
        report.file = self._write(path, text + "\n")
        native = self._native_stacks()
        if native:
            text += "\n\n== Native stacks (py-spy dump --native) ==\n" + native
            self._write(path, text + "\n")
        report.stacks = text
        self._log(report, text)
        self._deliver(report)
        if self.action == "abort":
            self._abort()
        interval = self._next_interval(budget)
        self._next_dump = time.monotonic() + interval
        # Keep the C backup armed while the stall lasts: it may turn into a GIL-holding one.
        self._arm(interval + self._grace(budget))

    def _collect_c_dump(self, now: float) -> None:
        fd = self._fd
        if fd is None:
            return
        size = os.fstat(fd).st_size
        if size <= self._header_len:
            return
        if self._owns_timer():
            faulthandler.cancel_dump_traceback_later()
        body = os.pread(fd, size - self._header_len, self._header_len).decode("utf-8", "replace")
        os.ftruncate(fd, self._header_len)  # O_APPEND: the next dump goes right after the header again
        fired_wall = self._armed_wall_deadline or time.time()
        fired = self._armed_mono_deadline or now
        last = self._last
        ongoing = last < fired  # no beat since the timer fired: the main thread has not moved on yet
        # The stall began at the last beat before the timer fired: the current one when nothing came since,
        # else the newest the monitor had seen (a tick early at most).
        began = last if ongoing else (self._armed_last if self._armed_last is not None else fired)
        phase = self._armed_phase or self._phase
        budget, rule = self.budget(phase)
        report = HangReport(
            kind="stall",
            rank=self._rank,
            phase=phase,
            step=self._step_at(began),
            budget=budget,
            budget_rule=rule,
            stalled_for=max(0.0, fired - began),
            action=self.action,
            detected_by="faulthandler's C-level timer: the Python watchdog thread could not run (the GIL was held)",
            time=_utc_iso(fired_wall),
        )
        path = self.output_dir / dump_file_name(self._rank, fired_wall)
        text = self._render(report, body.rstrip("\n"), "most recent call FIRST")
        report.file = self._write(path, text + "\n")
        report.stacks = text
        self._log(report, text)
        self._deliver(report)
        self._stalled_since = began
        self._stall_phase = phase
        self._stall_step = report.step
        self._dumps_in_stall = max(1, body.count("Timeout ("))
        if ongoing:
            # Python runs again but the main thread has not progressed: the stall goes on; next dump is a repeat.
            self._armed_last, self._armed_phase = last, self._phase
            interval = self._next_interval(budget)
            self._next_dump = time.monotonic() + interval
            self._arm(interval + self._grace(budget))
        else:
            self._armed_last = None  # progress already resumed: the next check reports the recovery and re-arms

    def _step_at(self, when: float) -> int:
        """The completed-step count at monotonic time ``when`` (from the recent step-end times)."""
        return self.step - sum(1 for t in self._step_ends if t > when)

    def _collect_earlier(self) -> None:
        """Turn dumps left by earlier processes of this rank (ended by faulthandler's exit, or killed while stuck)
        into dump files and report them; remove their empty pending files."""
        pattern = f".trainguard-hang-rank{self._rank}-pid*.pending"
        try:
            leftovers = sorted(self.output_dir.glob(pattern))
        except OSError:
            return
        for path in leftovers:
            match = re.search(r"-pid(\d+)\.pending$", path.name)
            pid = int(match.group(1)) if match else -1
            if pid == os.getpid() or (pid > 0 and _pid_alive(pid)):
                continue
            try:
                content = path.read_text(encoding="utf-8", errors="replace")
                mtime = path.stat().st_mtime
            except OSError:
                continue
            _, _, body = content.partition(_PENDING_MARK)
            if not body.strip():
                with contextlib.suppress(OSError):
                    path.unlink()  # ours, and empty: the earlier process ended without a stall
                continue
            target = self.output_dir / dump_file_name(self._rank, mtime)
            try:
                os.replace(path, target)
            except OSError as exc:
                get_logger().warning("trainguard hang watchdog: cannot rename %s (%s)", path, exc)
                continue
            report = HangReport(
                kind="earlier",
                rank=self._rank,
                phase="step",
                step=self.step,
                budget=0.0,
                budget_rule="earlier process",
                stalled_for=0.0,
                action="reported",
                detected_by=f"faulthandler's C-level timer in process {pid}, which then ended",
                file=target,
                time=_utc_iso(mtime),
                stacks=content,
            )
            get_logger().critical(
                "trainguard hang watchdog: rank %d, pid %d was dumped by faulthandler's C-level timer at %s and then "
                "ended (the GIL was held, so Python could not log it); its stacks are in %s\n%s",
                self._rank, pid, report.time, target, body,
            )
            self._deliver(report)

    # ------------------------------------------------------------------------------------------- outputs
    def _render(self, report: HangReport, stacks: str, order: str) -> str:
        main = threading.main_thread()
        names = ", ".join(
            f"0x{t.ident or 0:016x} {t.name!r}{' (main)' if t is main else ''}{' daemon' if t.daemon else ''}"
            for t in threading.enumerate()
        )
        err = report.error()
        lines = [
            f"trainguard hang dump: rank {report.rank} of {self._world}, pid {os.getpid()}, "
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

    def _write(self, path: Path, text: str) -> Path | None:
        try:
            atomic_write_text(path, text)
        except OSError as exc:
            get_logger().error("trainguard hang watchdog: cannot write %s (%s); the stacks follow in the log", path,
                               exc)
            return None
        return path

    def _log(self, report: HangReport, text: str) -> None:
        where = f" (written to {report.file})" if report.file else ""
        get_logger().critical("trainguard hang watchdog%s:\n%s", where, text)

    def _deliver(self, report: HangReport) -> None:
        if report.kind == "stall":
            self._stall_in_cycle = True
        self.reports.append(report)
        if self.on_report is None:
            return
        try:
            self.on_report(report)
        except Exception as exc:
            get_logger().warning("trainguard hang watchdog: on_report failed (%s: %s)", type(exc).__name__, exc)

    def _report_recovered(self, last: float) -> None:
        since = self._stalled_since if self._stalled_since is not None else last
        budget, rule = self.budget(self._stall_phase)
        report = HangReport(
            kind="recovered",
            rank=self._rank,
            phase=self._stall_phase,
            step=self._stall_step,
            budget=budget,
            budget_rule=rule,
            stalled_for=max(0.0, last - since),
            action=self.action,
            detected_by="the watchdog thread (Python)",
            dump_index=self._dumps_in_stall,
        )
        self._stalled_since = None
        self._dumps_in_stall = 0
        get_logger().warning("trainguard hang watchdog: %s", report.message)
        self._deliver(report)

    def _native_stacks(self) -> str:
        wanted = self.native_stacks
        pyspy = shutil.which("py-spy")
        if wanted is False or (wanted is None and pyspy is None):
            return ""
        if pyspy is None:
            return "py-spy is not installed (pip install py-spy) so there are no native stacks."
        outputs = []
        for extra in (["--native"], []):
            try:
                done = subprocess.run(
                    [pyspy, "dump", *extra, "--pid", str(os.getpid())],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                outputs.append(f"py-spy dump {' '.join(extra)} failed: {exc}")
                continue
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout
            outputs.append(
                f"py-spy dump {' '.join(extra)} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}"
            )
        return "\n".join(outputs) + "\n(py-spy needs ptrace permission: root, CAP_SYS_PTRACE, or ptrace_scope 0)"

    def _abort(self) -> None:
        self._wait_for_peers()
        get_logger().critical(
            "trainguard hang watchdog: ending the process with exit status %d (action='abort') so the launcher "
            "restarts it from the last checkpoint", self.exit_code,
        )
        for handler in logging.getLogger().handlers + get_logger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        if self._owns_timer():
            faulthandler.cancel_dump_traceback_later()
        with contextlib.suppress(Exception):
            self._close_pending()
        os._exit(self.exit_code)

    def _wait_for_peers(self) -> None:
        if self._world <= 1 or self.abort_grace <= 0:
            return
        deadline = time.monotonic() + self.abort_grace
        while time.monotonic() < deadline:
            ranks = set()
            for path in find_dumps(self.output_dir):
                match = _DUMP_RE.match(path.name)
                with contextlib.suppress(OSError):
                    if match and path.stat().st_mtime >= self._started_wall - 1:
                        ranks.add(int(match.group(1)))
            if ranks >= set(range(self._world)):
                return
            time.sleep(0.2)
        get_logger().warning(
            "trainguard hang watchdog: not every rank dumped within abort_grace=%g s (output_dir not shared, "
            "or their watchdogs have longer budgets); exiting anyway", self.abort_grace,
        )

    def summary(self) -> str:
        """One line: budgets in force and stalls seen."""
        step, rule = self.step_budget()
        stalls = [r for r in self.reports if r.kind == "stall"]
        files = ", ".join(str(r.file.name) for r in stalls if r.file) or "none"
        return (
            f"step budget {step:g} s ({rule}); {self.steps_measured} step(s) measured; "
            f"{len(stalls)} stall dump(s): {files}"
        )


def _python_stacks() -> str:
    """Every thread's Python stack with its name, main thread first (most recent call last, with source lines)."""
    frames = sys._current_frames()
    threads = {t.ident: t for t in threading.enumerate()}
    main = threading.main_thread().ident
    me = threading.get_ident()
    parts = []
    for ident in sorted(frames, key=lambda i: (i != main, i == me, i)):
        thread = threads.get(ident)
        name = thread.name if thread is not None else "<not a threading.Thread>"
        tags = []
        if ident == main:
            tags.append("main thread: runs the training loop")
        if ident == me:
            parts.append(f"Thread 0x{ident:016x} {name!r} (this watchdog thread, writing this dump)\n")
            continue
        if thread is not None and thread.daemon:
            tags.append("daemon")
        label = f" ({'; '.join(tags)})" if tags else ""
        stack = "".join(traceback.format_stack(frames[ident]))
        parts.append(f"Thread 0x{ident:016x} {name!r}{label}:\n{stack}")
    return "\n".join(parts)


def _stop_active() -> None:
    # Interpreter shutdown can take long (joining workers, flushing): the C timer must not call that a hang.
    watchdog = _ACTIVE() if _ACTIVE is not None else None
    if watchdog is not None:
        with contextlib.suppress(Exception):
            watchdog.stop()
