"""Phase budgets of the hang watchdog: how long each phase may go without progress, and the rule that says so.

Budgets (seconds without any progress) per phase:

- ``step``: ``timeout`` when given; else learned: ``floor`` until ``warmup_steps`` steps were measured, then
  ``max(floor, multiplier x slowest step cycle seen)``. A step cycle is the time from one step's end to the next
  (data loading, forward, backward, optimizer, logging); cycles that include an evaluation or a save are not used
  (the :class:`~trainguard.checks.watchdog.Watchdog` measures the cycles and feeds them to
  :meth:`PhaseBudgets.observe_step`).
- ``first_step`` (compilation, data-loader warm-up, sharded-model initialisation), ``eval`` (between evaluation
  batches, plus building the eval loader and ``compute_metrics``), ``save`` (one checkpoint save; also the end of
  training: ``load_best_model_at_end``) and ``resume`` (the first step after a resume, which includes the
  Trainer's data skip): each its own option, by default the larger of the step budget and 1800 s (3600 s for
  ``resume``).

Also the timing derived from a budget: how often the monitor wakes (:meth:`PhaseBudgets.tick`), how late
faulthandler's C-level timer fires after the Python deadline (:meth:`PhaseBudgets.grace`), and how far apart the
dumps of one long stall are (:meth:`PhaseBudgets.next_dump_after`).
"""

from __future__ import annotations

from .settings import WatchdogSettings

__all__ = ["PHASES", "PhaseBudgets"]

#: Phases, each with its own budget. ``finalize`` (after the last step) uses the ``save`` budget.
PHASES = ("first_step", "step", "eval", "save", "resume", "finalize")

# Defaults of the phase budgets, used when the option is None (never below the step budget).
_PHASE_DEFAULTS = {"first_step": 1800.0, "eval": 1800.0, "save": 1800.0, "resume": 3600.0}
_PHASE_OPTION = {"first_step": "first_step", "eval": "eval", "save": "save", "finalize": "save", "resume": "resume"}
_REPEAT_CAP = 3600.0


class PhaseBudgets:
    """The budget policy of one watchdog: its settings plus the step cycles it has learned from."""

    def __init__(self, settings: WatchdogSettings) -> None:
        self.settings = settings
        self.phase_timeouts: dict[str, float | None] = {
            "first_step": settings.first_step_timeout,
            "eval": settings.eval_timeout,
            "save": settings.save_timeout,
            "resume": settings.resume_timeout,
        }
        self.steps_measured = 0
        self.slowest_step = 0.0

    def observe_step(self, seconds: float) -> None:
        """Feed one step cycle time to the learned budget."""
        self.steps_measured += 1
        if seconds > self.slowest_step:
            self.slowest_step = float(seconds)

    def step_budget(self) -> tuple[float, str]:
        """The budget of a training step and the rule that gave it."""
        settings = self.settings
        if settings.timeout is not None:
            return settings.timeout, "explicit timeout"
        if self.steps_measured < settings.warmup_steps or self.slowest_step <= 0:
            return settings.floor, f"floor: learning, {self.steps_measured}/{settings.warmup_steps} step(s) measured"
        learned = settings.multiplier * self.slowest_step
        if learned <= settings.floor:
            return settings.floor, f"floor; {settings.multiplier:g} x slowest step {self.slowest_step:.3g} s is lower"
        return learned, f"learned: {settings.multiplier:g} x slowest step {self.slowest_step:.3g} s"

    def budget(self, phase: str) -> tuple[float, str]:
        """The budget of ``phase`` in seconds, and the rule that gave it."""
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

    def tick(self, budget: float) -> float:
        """Seconds between monitor wake-ups under ``budget``."""
        return min(self.settings.check_interval, max(0.05, budget / 4))

    def grace(self, budget: float) -> float:
        """How long after the Python deadline faulthandler's C-level timer fires."""
        # The C timer is the backup: it fires only when the Python monitor missed the deadline by this much
        # (it could not run), so a healthy monitor always answers first and a loaded machine does not double-dump.
        return min(60.0, max(2.0, 2 * self.tick(budget), 0.1 * budget))

    def next_dump_after(self, budget: float, dumps_in_stall: int) -> float:
        """Seconds until the next dump of a stall that lasts, after ``dumps_in_stall`` dumps."""
        if self.settings.repeat_interval is not None:
            return self.settings.repeat_interval
        return min(_REPEAT_CAP, budget * (2 ** max(0, dumps_in_stall - 1)))
