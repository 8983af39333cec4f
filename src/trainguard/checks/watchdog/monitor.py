"""The :class:`Watchdog`: its hot path, its monitor thread, faulthandler's timer, delivery of reports and the abort.

The training thread calls :meth:`Watchdog.beat` at each sign of progress (one ``time.monotonic()`` stored in an
attribute, nothing else). The monitor thread (``trainguard-watchdog``) compares it with the budget of the current
phase (:mod:`.budget`), dumps (:mod:`.stacks`, :mod:`.report`), hands each :class:`~.report.HangReport` to
``on_report``, then acts. It keeps faulthandler's C-level timer armed as a backup for stalls in C code that holds
the GIL, writing to the pending file (:mod:`.pending`). faulthandler's timer is process-wide: one watchdog at a time
owns it.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from ... import distributed
from ...alerts import get_logger
from .budget import PHASES, PhaseBudgets
from .pending import PendingFile, claim_earlier_dumps
from .report import HangReport, _utc_iso, dump_file_name, dumped_ranks, log_dump, render_dump, write_dump
from .settings import WatchdogSettings
from .stacks import _python_stacks, native_stacks

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .settings import WatchdogOptions

__all__ = ["Watchdog"]

# faulthandler's timer is process-wide: one watchdog at a time owns it.
_ACTIVE: weakref.ReferenceType[Watchdog] | None = None
_ACTIVE_LOCK = threading.Lock()
_ATEXIT_REGISTERED = False


class Watchdog:
    """Dump every thread's stack when no progress is seen within a phase's budget, then act.

    Args:
        timeout: Budget of a training step in seconds. None (default): learned (see ``floor``, ``multiplier``,
            ``warmup_steps`` in :class:`~trainguard.checks.watchdog.WatchdogSettings`).
        output_dir: Folder for dump files (created when missing).
        rank: Rank in the file names; None: :func:`trainguard.distributed.rank` at :meth:`start`.
        world_size: Ranks to wait for with ``"abort"``; None: :func:`trainguard.distributed.world_size`.
        on_report: Called with each :class:`HangReport` (from the monitor thread; must not block for long).
        settings: All options at once, instead of ``timeout`` and ``**options``.
        **options: The other fields of :class:`~trainguard.checks.watchdog.WatchdogSettings`, where their
            defaults and reasons are: ``action`` (``"dump"`` or ``"abort"``), ``repeat_interval``,
            ``warmup_steps``, ``floor``, ``multiplier``, ``first_step_timeout``, ``eval_timeout``,
            ``save_timeout``, ``resume_timeout``, ``exit_code``, ``abort_grace``, ``native_stacks``,
            ``check_interval``.

    Raises:
        ValueError: An option is out of range.
        TypeError: ``settings`` together with ``timeout`` or ``**options``.

    Example::

        loader, train_step = range(3), print     # your data loader and your step
        with Watchdog(timeout=600, output_dir="out", action="abort") as wd:
            for batch in loader: wd.beat(); train_step(batch)
    """

    def __init__(
        self,
        timeout: float | None = None,
        *,
        output_dir: str | os.PathLike[str] = ".",
        rank: int | None = None,
        world_size: int | None = None,
        on_report: Callable[[HangReport], None] | None = None,
        settings: WatchdogSettings | None = None,
        **options: Unpack[WatchdogOptions],
    ) -> None:
        if settings is None:
            settings = WatchdogSettings(timeout=timeout, **options)
        elif timeout is not None or options:
            raise TypeError("Watchdog() takes settings=... or timeout and options, not both")
        self.settings = settings
        #: The budget policy: per-phase budgets, the learned step budget, tick and grace.
        self.budgets = PhaseBudgets(settings)
        self.output_dir = Path(output_dir)
        self.rank = rank
        self.world_size = world_size
        self.on_report = on_report
        #: Completed steps (the Trainer's ``global_step``); shown in reports.
        self.step = 0
        #: Every report so far (stalls, recoveries, earlier processes' dumps).
        self.reports: list[HangReport] = []
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
        self._pending = PendingFile()
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

    # ------------------------------------------------------------------------------------------- settings
    @property
    def timeout(self) -> float | None:
        return self.settings.timeout

    @property
    def action(self) -> str:
        return self.settings.action

    @property
    def repeat_interval(self) -> float | None:
        return self.settings.repeat_interval

    @property
    def warmup_steps(self) -> int:
        return self.settings.warmup_steps

    @property
    def floor(self) -> float:
        return self.settings.floor

    @property
    def multiplier(self) -> float:
        return self.settings.multiplier

    @property
    def phase_timeouts(self) -> dict[str, float | None]:
        return self.budgets.phase_timeouts

    @property
    def exit_code(self) -> int:
        return self.settings.exit_code

    @property
    def abort_grace(self) -> float:
        return self.settings.abort_grace

    @property
    def native_stacks(self) -> bool | None:
        return self.settings.native_stacks

    @property
    def check_interval(self) -> float:
        return self.settings.check_interval

    @property
    def steps_measured(self) -> int:
        """Step cycles fed to the learned budget."""
        return self.budgets.steps_measured

    @property
    def slowest_step(self) -> float:
        """The slowest step cycle seen, in seconds."""
        return self.budgets.slowest_step

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
                self._arm(budget + self.budgets.grace(budget))
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
        self.budgets.observe_step(seconds)

    @property
    def phase(self) -> str:
        return self._phase

    # -------------------------------------------------------------------------------------------- budgets
    def step_budget(self) -> tuple[float, str]:
        """The budget of a training step and the rule that gave it."""
        return self.budgets.step_budget()

    def budget(self, phase: str | None = None) -> tuple[float, str]:
        """The budget of ``phase`` (default: the current one) in seconds, and the rule that gave it."""
        return self.budgets.budget(phase or self._phase)

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
        self._pending.open(self.output_dir, self._rank, self._world, self._started_wall)
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
            self._pending.close()
        self._thread = None

    def __enter__(self) -> Watchdog:
        return self.start("step")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _owns_timer(self) -> bool:
        return _ACTIVE is not None and _ACTIVE() is self

    def _arm(self, timeout: float) -> None:
        if not self._owns_timer():
            return
        timeout = max(0.05, timeout)
        fd = self._pending.timer_fd
        faulthandler.dump_traceback_later(
            timeout,
            repeat=self.settings.action == "dump",
            file=fd if fd is not None else sys.__stderr__.fileno(),  # type: ignore[union-attr]
            exit=self.settings.action == "abort",
        )
        self._armed_timeout = timeout
        self._armed_wall_deadline = time.time() + timeout
        self._armed_mono_deadline = time.monotonic() + timeout

    # ------------------------------------------------------------------------------------------- monitor
    def _run(self) -> None:
        warned = False
        while True:
            budget, _ = self.budget()
            if self._stop.wait(self.budgets.tick(budget)):
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
            remaining = last + budget + self.budgets.grace(budget) - now
            self._arm(max(remaining, min(budget, 60.0)))
        stalled_for = now - last
        if self._stalled_since is None:
            if stalled_for >= budget:
                self._stalled_since = last
                self._stall_phase = phase
                self._stall_step = self.step
                self._dumps_in_stall = 0
                self._dump(now, budget)
        elif now >= self._next_dump and stalled_for >= budget and self.settings.action == "dump":
            self._dump(now, budget)

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
            action=self.settings.action,
            detected_by="the watchdog thread (Python)",
            dump_index=self._dumps_in_stall,
        )
        if self._starved_for > 1.0 + self.settings.check_interval:
            # The monitor itself could not run for a while (the GIL was held but the C timer had not fired yet):
            # the main thread may have moved on from where it stalled.
            report.detected_by += (
                f"; note: this thread could not run for {self._starved_for:.1f} s before this dump (the GIL was "
                "held), so the stacks show where the main thread is now, which may be past the stall"
            )
        path = self.output_dir / dump_file_name(self._rank)
        text = render_dump(report, self._world, _python_stacks(), "most recent call LAST")
        report.file = write_dump(path, text + "\n")
        native = native_stacks(self.settings.native_stacks)
        if native:
            text += "\n\n== Native stacks (py-spy dump --native) ==\n" + native
            write_dump(path, text + "\n")
        report.stacks = text
        log_dump(report, text)
        self._deliver(report)
        if self.settings.action == "abort":
            self._abort()
        interval = self.budgets.next_dump_after(budget, self._dumps_in_stall)
        self._next_dump = time.monotonic() + interval
        # Keep the C backup armed while the stall lasts: it may turn into a GIL-holding one.
        self._arm(interval + self.budgets.grace(budget))

    def _collect_c_dump(self, now: float) -> None:
        size = self._pending.size()
        if size <= self._pending.header_len:
            return
        if self._owns_timer():
            faulthandler.cancel_dump_traceback_later()
        body = self._pending.take(size)
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
            action=self.settings.action,
            detected_by="faulthandler's C-level timer: the Python watchdog thread could not run (the GIL was held)",
            time=_utc_iso(fired_wall),
        )
        path = self.output_dir / dump_file_name(self._rank, fired_wall)
        text = render_dump(report, self._world, body.rstrip("\n"), "most recent call FIRST")
        report.file = write_dump(path, text + "\n")
        report.stacks = text
        log_dump(report, text)
        self._deliver(report)
        self._stalled_since = began
        self._stall_phase = phase
        self._stall_step = report.step
        self._dumps_in_stall = max(1, body.count("Timeout ("))
        if ongoing:
            # Python runs again but the main thread has not progressed: the stall goes on; next dump is a repeat.
            self._armed_last, self._armed_phase = last, self._phase
            interval = self.budgets.next_dump_after(budget, self._dumps_in_stall)
            self._next_dump = time.monotonic() + interval
            self._arm(interval + self.budgets.grace(budget))
        else:
            self._armed_last = None  # progress already resumed: the next check reports the recovery and re-arms

    def _step_at(self, when: float) -> int:
        """The completed-step count at monotonic time ``when`` (from the recent step-end times)."""
        return self.step - sum(1 for t in self._step_ends if t > when)

    def _collect_earlier(self) -> None:
        """Report the dumps left by earlier processes of this rank (ended by faulthandler's exit, or killed while
        stuck), each now a dump file."""
        for earlier in claim_earlier_dumps(self.output_dir, self._rank):
            report = HangReport(
                kind="earlier",
                rank=self._rank,
                phase="step",
                step=self.step,
                budget=0.0,
                budget_rule="earlier process",
                stalled_for=0.0,
                action="reported",
                detected_by=f"faulthandler's C-level timer in process {earlier.pid}, which then ended",
                file=earlier.file,
                time=_utc_iso(earlier.mtime),
                stacks=earlier.content,
            )
            get_logger().critical(
                "trainguard hang watchdog: rank %d, pid %d was dumped by faulthandler's C-level timer at %s and then "
                "ended (the GIL was held, so Python could not log it); its stacks are in %s\n%s",
                self._rank,
                earlier.pid,
                report.time,
                earlier.file,
                earlier.body,
            )
            self._deliver(report)

    # ------------------------------------------------------------------------------------------- outputs
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
            action=self.settings.action,
            detected_by="the watchdog thread (Python)",
            dump_index=self._dumps_in_stall,
        )
        self._stalled_since = None
        self._dumps_in_stall = 0
        get_logger().warning("trainguard hang watchdog: %s", report.message)
        self._deliver(report)

    def _abort(self) -> None:
        self._wait_for_peers()
        get_logger().critical(
            "trainguard hang watchdog: ending the process with exit status %d (action='abort') so the launcher "
            "restarts it from the last checkpoint",
            self.settings.exit_code,
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
            self._pending.close()
        os._exit(self.settings.exit_code)

    def _wait_for_peers(self) -> None:
        grace = self.settings.abort_grace
        if self._world <= 1 or grace <= 0:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if dumped_ranks(self.output_dir, since=self._started_wall - 1) >= set(range(self._world)):
                return
            time.sleep(0.2)
        get_logger().warning(
            "trainguard hang watchdog: not every rank dumped within abort_grace=%g s (output_dir not shared, "
            "or their watchdogs have longer budgets); exiting anyway",
            grace,
        )

    def summary(self) -> str:
        """One line: budgets in force and the stalls seen (named only when there were some)."""
        step, rule = self.step_budget()
        line = f"step budget {step:g} s ({rule}); {self.steps_measured} step(s) measured"
        stalls = [r for r in self.reports if r.kind == "stall"]
        if stalls:
            files = ", ".join(str(r.file.name) for r in stalls if r.file) or "not written"
            line += f"; {len(stalls)} stall dump(s): {files}"
        return line


def _stop_active() -> None:
    # Interpreter shutdown can take long (joining workers, flushing): the C timer must not call that a hang.
    watchdog = _ACTIVE() if _ACTIVE is not None else None
    if watchdog is not None:
        with contextlib.suppress(Exception):
            watchdog.stop()
