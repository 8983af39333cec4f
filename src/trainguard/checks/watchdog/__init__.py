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
   about once a second: re-arming costs tens of microseconds, too much for every event). It writes all stacks into a
   pipe; a small helper process copies them into the visible live file
   ``output_dir/trainguard-hang-rank{r}-pid{pid}-live.txt`` and onto stderr with a banner, neither needing this
   process's GIL, so both show the hang while it lasts. When Python runs again, the monitor turns that into
   ``trainguard-hang-rank{r}-{utc}.txt``, logs it and reports it. With ``action="abort"``
   the timer exits the process itself (faulthandler's ``exit=True``: exit status 1) right after writing; the next
   start of a watchdog on that ``output_dir`` and rank turns the leftover into a dump file and reports it.

Each phase (first step, step, eval, save, resume, finalize) has its own budget: see :mod:`.budget`.

Modules, one concern each:

- :mod:`.settings`: :class:`WatchdogSettings`, the options with their defaults, reasons and validation, and
  :class:`WatchdogOptions`, the type of the keyword options of ``Watchdog`` and ``HangWatchdog``;
- :mod:`.budget`: phases and their budgets (explicit or learned from step cycles), the monitor's tick, the grace of
  the C-level timer, the spacing of repeated dumps;
- :mod:`.report`: :class:`HangReport`, dump file names, :func:`find_dumps`, the dump text, writing and logging it;
- :mod:`.stacks`: Python stacks of every thread, native stacks from py-spy;
- :mod:`.pending`: the live file of faulthandler's timer (and its stderr copy), and the leftovers of earlier
  processes;
- :mod:`.monitor`: :class:`Watchdog` itself: hot path, monitor thread, arming the timer, delivery and abort.

Example::

    loader, train_step = range(3), print     # your data loader and your step
    with Watchdog(timeout=600, output_dir="out") as wd:
        for batch in loader: wd.beat(); train_step(batch)
"""

from __future__ import annotations

from .budget import PHASES
from .monitor import Watchdog
from .report import HangReport, dump_file_name, find_dumps
from .settings import ACTIONS, WatchdogOptions, WatchdogSettings
from .stacks import _python_stacks as _python_stacks  # used by benchmarks/bench_watchdog.py

__all__ = [
    "ACTIONS",
    "PHASES",
    "HangReport",
    "Watchdog",
    "WatchdogOptions",
    "WatchdogSettings",
    "dump_file_name",
    "find_dumps",
]
