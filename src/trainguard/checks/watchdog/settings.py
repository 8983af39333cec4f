"""The options of the hang watchdog, defined once: their defaults, the reasons for them, and their validation.

:class:`WatchdogSettings` (a frozen dataclass) is the one source of truth; :class:`~trainguard.checks.watchdog.Watchdog`
builds one from its keyword arguments (or takes one as ``settings=``) and
:class:`~trainguard.HangWatchdog` builds one and hands it over. :class:`WatchdogOptions` types those keyword
arguments (``**options: Unpack[WatchdogOptions]``): every field but ``timeout``, which both take positionally.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TypedDict

from ...bounds import MAX_FACTOR, finite_number, seconds, whole_number, yes_no

__all__ = ["ACTIONS", "WatchdogOptions", "WatchdogSettings"]

ACTIONS = ("dump", "abort")


@dataclass(frozen=True, kw_only=True)
class WatchdogSettings:
    """What a watchdog watches for and what it does then; checked at construction, before any training.

    Attributes:
        timeout: Budget of a training step in seconds. None (default): learned (see ``floor``, ``multiplier``,
            ``warmup_steps``).
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

    Raises:
        ValueError: An unknown ``action``; :class:`~trainguard.errors.ConfigError` (a ``ValueError``) for a number
            that is not finite, not whole where a count is meant, or out of its range (the message names the option,
            the value and the range; every timeout is at most one year, :data:`trainguard.bounds.MAX_SECONDS`).
    """

    timeout: float | None = None
    action: str = "dump"
    repeat_interval: float | None = None
    warmup_steps: int = 5
    floor: float = 300.0
    multiplier: float = 10.0
    first_step_timeout: float | None = None
    eval_timeout: float | None = None
    save_timeout: float | None = None
    resume_timeout: float | None = None
    exit_code: int = 124
    abort_grace: float = 30.0
    native_stacks: bool | None = None
    check_interval: float = 1.0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Watchdog(action=...) must be one of {ACTIONS}, not {self.action!r}")
        owner = "Watchdog"
        # Every number through trainguard.bounds: finite, and no budget beyond a year (1e308 seconds would be
        # accepted here and overflow faulthandler's timer at the first step).
        normal: dict[str, float | int | bool | None] = {
            "warmup_steps": whole_number("warmup_steps", self.warmup_steps, low=0, owner=owner),
            "exit_code": whole_number("exit_code", self.exit_code, low=1, high=255, owner=owner),
            "abort_grace": seconds("abort_grace", self.abort_grace, allow_zero=True, owner=owner),
            "floor": seconds("floor", self.floor, owner=owner),
            "multiplier": finite_number("multiplier", self.multiplier, low=1, high=MAX_FACTOR, owner=owner),
            "check_interval": seconds("check_interval", self.check_interval, owner=owner),
            "native_stacks": yes_no("native_stacks", self.native_stacks, allow_none=True, owner=owner),
        }
        for name in (
            "timeout",
            "repeat_interval",
            "first_step_timeout",
            "eval_timeout",
            "save_timeout",
            "resume_timeout",
        ):
            normal[name] = seconds(name, getattr(self, name), allow_none=True, owner=owner)
        for name, value in normal.items():
            object.__setattr__(self, name, value)  # frozen: store the checked, normalised value once


class WatchdogOptions(TypedDict, total=False):
    """The keyword options of ``Watchdog`` and ``HangWatchdog``: the fields of :class:`WatchdogSettings` but
    ``timeout`` (positional in both). Defaults and reasons are documented there."""

    action: str
    repeat_interval: float | None
    warmup_steps: int
    floor: float
    multiplier: float
    first_step_timeout: float | None
    eval_timeout: float | None
    save_timeout: float | None
    resume_timeout: float | None
    exit_code: int
    abort_grace: float
    native_stacks: bool | None
    check_interval: float


# mypy checks that every key of WatchdogOptions is a field of the right type (Watchdog passes them to
# WatchdogSettings); this catches the other direction: a new field must also be a keyword of both constructors.
if {f.name for f in fields(WatchdogSettings)} != {"timeout", *WatchdogOptions.__annotations__}:
    raise TypeError("WatchdogOptions must name every field of WatchdogSettings except timeout")
