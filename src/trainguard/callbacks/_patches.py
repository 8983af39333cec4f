"""Process-wide replacements of transformers module functions, for the Trainer seam (:mod:`._trainer_compat`).

A module function (``transformers.trainer.rotate_checkpoints``, ``hf_api``...) is looked up at call time, so a
guard can only reach it by replacing it in its module. The replacement is a dispatcher installed once per process
that calls the original unless the *current thread* is inside :func:`routing` for that name (a
:class:`contextvars.ContextVar`), so two Trainers in one process never see each other's routing. Each replacement
is a :class:`PatchHandle`; :meth:`PatchHandle.remove` puts the original back.

Example::

    # not run here: removing the handle would take the patch away from every Trainer in the process
    import transformers.trainer
    from trainguard.callbacks._patches import install_dispatcher, routing
    handle = install_dispatcher(transformers.trainer, "rotate_checkpoints")
    with routing(rotate_checkpoints=lambda original, *args, **kwargs: None):
        ...                      # rotation inside this block goes to the handler
    handle.remove()              # transformers.trainer.rotate_checkpoints is the original again
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

__all__ = ["PatchHandle", "install_dispatcher", "process_patches", "routing"]

# The same mark as before this module existed, so a dispatcher installed by an older copy is recognised.
_DISPATCH_MARK = "_trainguard_checkpoint_hooks"
_ROUTES: ContextVar[Mapping[str, Callable[..., Any]] | None] = ContextVar("trainguard_routes", default=None)


@contextlib.contextmanager
def routing(**handlers: Callable[..., Any]) -> Iterator[None]:
    """Route the named module functions to ``handlers`` in this thread for the duration of the block."""
    token = _ROUTES.set({**(_ROUTES.get() or {}), **handlers})
    try:
        yield
    finally:
        _ROUTES.reset(token)


class PatchHandle:
    """A process-wide replacement of ``module.name`` by trainguard's dispatcher; :meth:`remove` puts the original
    back (while the dispatcher is still the one installed: a later patch by someone else is left alone)."""

    def __init__(self, module: Any, name: str, original: Callable[..., Any], dispatcher: Callable[..., Any]) -> None:
        self.module, self.name, self.original, self.dispatcher = module, name, original, dispatcher

    @property
    def active(self) -> bool:
        """Whether ``module.name`` is still this handle's dispatcher."""
        return getattr(self.module, self.name, None) is self.dispatcher

    def remove(self) -> None:
        """Put the original function back; a no-op when it was removed already."""
        if self.active:
            setattr(self.module, self.name, self.original)
        _PATCHES.pop((id(self.module), self.name), None)


_PATCHES: dict[tuple[int, str], PatchHandle] = {}


def process_patches() -> list[PatchHandle]:
    """The process-wide patches installed so far, each removable (:meth:`PatchHandle.remove`)."""
    return [handle for handle in _PATCHES.values() if handle.active]


def install_dispatcher(module: Any, name: str) -> PatchHandle | None:
    """Replace ``module.name`` once per process by a dispatcher honouring :func:`routing`; None if it is missing."""
    original = getattr(module, name, None)
    if original is None:
        return None
    known = _PATCHES.get((id(module), name))
    if known is not None and known.active:
        return known
    if getattr(original, _DISPATCH_MARK, False):  # installed by an earlier copy of this module (a reload): adopt it
        handle = PatchHandle(module, name, getattr(original, "__wrapped__", original), original)
        _PATCHES[(id(module), name)] = handle
        return handle

    @functools.wraps(original)
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        handler = (_ROUTES.get() or {}).get(name)
        if handler is None:
            return original(*args, **kwargs)
        return handler(original, *args, **kwargs)

    setattr(dispatch, _DISPATCH_MARK, True)
    setattr(module, name, dispatch)
    handle = PatchHandle(module, name, original, dispatch)
    _PATCHES[(id(module), name)] = handle
    return handle
