"""Trainer callbacks: thin adapters from Trainer events to trainguard's checks. One module per callback."""

from __future__ import annotations

from typing import Any

from ._base import GuardCallback

__all__ = ["GuardCallback", "all_guards"]

# Guard classes in the order they should run, as (keyword, "module:Class"). all_guards() builds one of each.
_GUARDS: tuple[tuple[str, str], ...] = ()


def all_guards(**overrides: Any) -> list[GuardCallback]:
    """One of every trainguard guard, with careful defaults, in a working order.

    Args:
        **overrides: For each guard, by its keyword (``checkpoint_verifier=``, ...): a dict of options for it,
            an instance to use as is, or ``False`` to leave it out.

    Raises:
        TypeError: A keyword names no guard.

    Example::

        trainer = Trainer(..., callbacks=trainguard.all_guards())
        trainer = Trainer(..., callbacks=trainguard.all_guards(checkpoint_verifier=False))
    """
    import importlib

    known = {key for key, _ in _GUARDS}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(
            f"all_guards() got unknown guard keyword(s) {unknown}; known guards: {sorted(known) or 'none yet'}"
        )
    guards: list[GuardCallback] = []
    for key, target in _GUARDS:
        option = overrides.get(key, {})
        if option is False or option is None:
            continue
        if isinstance(option, GuardCallback):
            guards.append(option)
            continue
        if not isinstance(option, dict):
            raise TypeError(f"all_guards({key}=...) takes a dict of options, a guard instance or False")
        module_name, cls_name = target.split(":")
        cls = getattr(importlib.import_module(module_name), cls_name)
        guards.append(cls(**option))
    return guards
