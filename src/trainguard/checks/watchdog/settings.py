"""The options of the hang watchdog, defined once: their defaults, the reasons for them, and their validation.

:class:`WatchdogSettings` (a frozen dataclass) is the one source of truth; :class:`~trainguard.checks.watchdog.Watchdog`
builds one from its keyword arguments (or takes one as ``settings=``) and
:class:`~trainguard.HangWatchdog` builds one and hands it over. :class:`WatchdogOptions` types those keyword
arguments (``**options: Unpack[WatchdogOptions]``): every field but ``timeout``, which both take positionally.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TypedDict

__all__ = ["ACTIONS", "WatchdogOptions", "WatchdogSettings"]

ACTIONS = ("dump", "abort")


def _check_seconds(name: str, value: float | None, *, allow_none: bool = True) -> float | None:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"Watchdog({name}=...) must be a number of seconds > 0, not None")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"Watchdog({name}=...) must be a number of seconds > 0, not {value!r}")
    return float(value)


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
        ValueError: An option is out of range (the message names it).
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
        action, warmup_steps, exit_code, abort_grace = self.action, self.warmup_steps, self.exit_code, self.abort_grace
        if action not in ACTIONS:
            raise ValueError(f"Watchdog(action=...) must be one of {ACTIONS}, not {action!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Watchdog(warmup_steps=...) must be an integer >= 0, not {warmup_steps!r}")
        if isinstance(exit_code, bool) or not isinstance(exit_code, int) or not 0 < exit_code < 256:
            raise ValueError(f"Watchdog(exit_code=...) must be an integer from 1 to 255, not {exit_code!r}")
        if isinstance(abort_grace, bool) or not isinstance(abort_grace, (int, float)) or abort_grace < 0:
            raise ValueError(f"Watchdog(abort_grace=...) must be a number of seconds >= 0, not {abort_grace!r}")
        normal: dict[str, float | None] = {
            "timeout": _check_seconds("timeout", self.timeout),
            "repeat_interval": _check_seconds("repeat_interval", self.repeat_interval),
            "floor": float(_check_seconds("floor", self.floor, allow_none=False) or 0.0),
        }
        mult = _check_seconds("multiplier", self.multiplier, allow_none=False) or 0.0
        if mult < 1:
            raise ValueError(f"Watchdog(multiplier=...) must be >= 1, not {self.multiplier!r}")
        normal["multiplier"] = float(mult)
        normal["check_interval"] = float(_check_seconds("check_interval", self.check_interval, allow_none=False) or 1.0)
        for name in ("first_step_timeout", "eval_timeout", "save_timeout", "resume_timeout"):
            normal[name] = _check_seconds(name, getattr(self, name))
        normal["abort_grace"] = float(abort_grace)
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
