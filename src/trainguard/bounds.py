"""Finite, bounded option values: the one check every numeric option of every guard goes through.

A value from ``TRAINGUARD_*``, ``trainguard.toml`` or code reaches a guard's constructor unchecked by type: ``1e308``
or ``inf`` seconds would be accepted and overflow in a timer at step 1; ``1.5`` batches would be truncated to 1;
``True`` would count as the number 1. Each constructor checks its numbers here instead, so every one is refused at
construction with a :class:`~trainguard.errors.ConfigError` that names the option, the value and the allowed range.
:func:`trainguard.config.build_guards` adds where a configured value came from (the variable, or the file, line and
key), read from ``evidence["option"]``.

The bounds, and why:

- seconds (timeouts, waits, intervals): above 0 (or from 0 where 0 means "do not wait") and at most one year,
  :data:`MAX_SECONDS`. A budget longer than that never fires in a real run: it is a typo (``1e308``) or "never",
  and the timers it arms (``faulthandler``, thread waits) overflow long before ``1e308``.
- counts (steps, windows, patience, rows, repeats): whole numbers, at most :data:`MAX_COUNT` (a billion).
- factors and thresholds: finite, at most :data:`MAX_FACTOR`.
- fractions: from 0 to 1.
- switches: True or False (0 or 1), never a truthy string such as ``"false"``.

Example::

    from trainguard.bounds import seconds, whole_number
    timeout = seconds("timeout", 1800, owner="HangWatchdog")                     # 1800.0
    skip = whole_number("skip_batches", 1.5, low=1, owner="SpikeGuard")          # raises: ConfigError (not whole)
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, overload

from .errors import ConfigError

__all__ = ["MAX_COUNT", "MAX_FACTOR", "MAX_SECONDS", "finite_number", "seconds", "whole_number", "yes_no"]

#: One year in seconds: the longest timeout, wait or interval any guard accepts.
MAX_SECONDS = 365 * 24 * 3600
#: The largest count (steps, windows, patience, rows) any guard accepts.
MAX_COUNT = 1_000_000_000
#: The largest factor or threshold (spike factors, z-scores, budget multipliers) any guard accepts.
MAX_FACTOR = 1_000_000.0

# A crafted value (a 20,000-deep list) must not make the message itself huge.
_SHOWN = 80


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _fmt(number: float) -> str:
    # 31536000, not 3.1536e+07: the bound is read by a person choosing a value.
    return f"{int(number):,}" if float(number).is_integer() else f"{number:g}"


def _label(name: str, owner: str | None) -> str:
    return f"{owner}({name}=...)" if owner else name


def _refuse(name: str, value: Any, owner: str | None, kind: str, allowed: str) -> ConfigError:
    wanted = f"{kind} {allowed}".strip()
    return ConfigError(
        f"{_label(name, owner)} must be {wanted}, not {_shown(value)}",
        where={"field": name},
        next_step=f"Give {name} {wanted}.",
        evidence={"option": name, "value": _shown(value), "allowed": wanted},
    )


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else None; a huge int is infinite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond float range: out of any bound
        return math.inf


@overload
def finite_number(
    name: str,
    value: Any,
    *,
    low: float,
    high: float,
    low_open: bool = ...,
    allow_none: Literal[False] = False,
    owner: str | None = ...,
    kind: str = ...,
) -> float: ...
@overload
def finite_number(
    name: str,
    value: Any,
    *,
    low: float,
    high: float,
    low_open: bool = ...,
    allow_none: bool,
    owner: str | None = ...,
    kind: str = ...,
) -> float | None: ...
def finite_number(
    name: str,
    value: Any,
    *,
    low: float,
    high: float,
    low_open: bool = False,
    allow_none: bool = False,
    owner: str | None = None,
    kind: str = "a finite number",
) -> float | None:
    """``value`` as a float, when it is a finite real number (not a bool) from ``low`` to ``high``.

    Args:
        name: The option's keyword (``"threshold"``), as the constructor takes it.
        value: What was given.
        low: The smallest value allowed (excluded with ``low_open``).
        high: The largest value allowed.
        low_open: ``low`` itself is refused ("above 0").
        allow_none: None is accepted and returned (an option that None switches off).
        owner: The class, for the message (``"SpikeGuard"``).
        kind: The value in words, for the message.

    Raises:
        ConfigError: Not a real number, not finite (``nan``, ``inf``, ``1e308 * 10``), or out of range; the message
            names the option, the value and the range, ``evidence["option"]`` the option.
    """
    if value is None and allow_none:
        return None
    number = _number(value)
    span = f"above {_fmt(low)} and at most" if low_open else f"from {_fmt(low)} to"
    allowed = f"{span} {_fmt(high)}" + (" (or none)" if allow_none else "")
    if number is None or not math.isfinite(number) or not (number > low if low_open else number >= low):
        raise _refuse(name, value, owner, kind, allowed)
    if number > high:
        raise _refuse(name, value, owner, kind, allowed)
    return number


@overload
def whole_number(
    name: str, value: Any, *, low: int, high: int = ..., allow_none: Literal[False] = False, owner: str | None = ...
) -> int: ...
@overload
def whole_number(
    name: str, value: Any, *, low: int, high: int = ..., allow_none: bool, owner: str | None = ...
) -> int | None: ...
def whole_number(
    name: str, value: Any, *, low: int, high: int = MAX_COUNT, allow_none: bool = False, owner: str | None = None
) -> int | None:
    """``value`` as an int, when it is a whole number (not a bool; ``2.0`` is 2, ``1.5`` is refused, never
    truncated) from ``low`` to ``high``.

    Raises:
        ConfigError: Not a whole number, or out of range (see :func:`finite_number`).
    """
    if value is None and allow_none:
        return None
    allowed = f"from {low:,} to {high:,}" + (" (or none)" if allow_none else "")
    whole: int | None = None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        whole = int(value)
    else:
        number = _number(value)
        if number is not None and math.isfinite(number) and number.is_integer():
            whole = int(number)
    if whole is None or not low <= whole <= high:
        raise _refuse(name, value, owner, "a whole number", allowed)
    return whole


@overload
def seconds(
    name: str, value: Any, *, allow_zero: bool = ..., allow_none: Literal[False] = False, owner: str | None = ...
) -> float: ...
@overload
def seconds(
    name: str, value: Any, *, allow_zero: bool = ..., allow_none: bool, owner: str | None = ...
) -> float | None: ...
def seconds(
    name: str, value: Any, *, allow_zero: bool = False, allow_none: bool = False, owner: str | None = None
) -> float | None:
    """``value`` as seconds: a finite number above 0 (from 0 with ``allow_zero``) and at most :data:`MAX_SECONDS`.

    Raises:
        ConfigError: Not a number of seconds in that range (see :func:`finite_number`).
    """
    return finite_number(
        name,
        value,
        low=0.0,
        high=MAX_SECONDS,
        low_open=not allow_zero,
        allow_none=allow_none,
        owner=owner,
        kind="a number of seconds",
    )


@overload
def yes_no(name: str, value: Any, *, allow_none: Literal[False] = False, owner: str | None = ...) -> bool: ...
@overload
def yes_no(name: str, value: Any, *, allow_none: bool, owner: str | None = ...) -> bool | None: ...
def yes_no(name: str, value: Any, *, allow_none: bool = False, owner: str | None = None) -> bool | None:
    """``value`` as a bool, when it is True or False (or the whole number 0 or 1).

    ``bool(value)`` would turn the string ``"false"`` from a file, or ``inf``, into True; this refuses them.

    Raises:
        ConfigError: Anything else (see :func:`finite_number`).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    raise _refuse(name, value, owner, "true or false", "(or none)" if allow_none else "")
