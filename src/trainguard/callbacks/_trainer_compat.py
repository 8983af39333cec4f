"""The seam between trainguard and the Trainer's private internals, for saves and rotation.

The Trainer has no "a save begins" event, no event for saves that bypass ``on_save`` (JIT checkpoints), and rotates
checkpoints inside its save. To act there, trainguard wraps this trainer's ``_save_checkpoint`` (and, for rotation,
``_rotate_checkpoints``/``_sorted_checkpoints`` on 4.x, or routes the module functions ``rotate_checkpoints`` and
``sort_checkpoints`` of ``transformers.trainer`` on 5.x). Every touch is:

- **instance-scoped**: wrappers are set on the trainer instance, never on the class. Module functions are replaced
  once per process by a dispatcher that calls the original unless the *current thread* is inside a guarded call of a
  trainer (a :class:`contextvars.ContextVar`), so two Trainers in one process never see each other's routing;
- **gated** on what the installed transformers has; what is missing is returned by name so the guard can log
  which of its features is off.

Example::

    missing = install_checkpoint_hooks(trainer, hooks)   # [] on transformers 5.24
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, Protocol

__all__ = ["CheckpointHooks", "install_checkpoint_hooks", "output_dir_for", "routing"]

_MARK = "_trainguard_checkpoint_hooks"
_ROUTES: ContextVar[Mapping[str, Callable[..., Any]] | None] = ContextVar("trainguard_routes", default=None)


class CheckpointHooks(Protocol):
    """What a guard implements to be called around the Trainer's saves and rotation."""

    def before_save(self, trainer: Any, run_dir: str) -> bool:
        """On every rank, before the Trainer writes anything; False skips this save on every rank."""
        ...

    def after_save(self, trainer: Any, run_dir: str) -> None:
        """On every rank, after the Trainer's save returned (before ``on_save``, which bypassing saves never get)."""
        ...

    def rotate(self, run_dir: str, limit: int | None, best: str | None) -> None:
        """Instead of the Trainer's ``save_total_limit`` rotation inside a save."""
        ...

    def end_of_training_candidates(self, run_dir: str, best: str | None) -> list[str]:
        """The checkpoints the Trainer's end-of-training cleanup (``save_total_limit=1`` with a best checkpoint) may
        delete, besides the best one."""
        ...


@contextlib.contextmanager
def routing(**handlers: Callable[..., Any]) -> Iterator[None]:
    """Route the named module functions to ``handlers`` in this thread for the duration of the block."""
    token = _ROUTES.set({**(_ROUTES.get() or {}), **handlers})
    try:
        yield
    finally:
        _ROUTES.reset(token)


def _install_dispatcher(module: Any, name: str) -> bool:
    """Replace ``module.name`` once per process by a dispatcher honouring :func:`routing`; False if it is missing."""
    original = getattr(module, name, None)
    if original is None:
        return False
    if getattr(original, _MARK, False):
        return True

    @functools.wraps(original)
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        handler = (_ROUTES.get() or {}).get(name)
        if handler is None:
            return original(*args, **kwargs)
        return handler(original, *args, **kwargs)

    setattr(dispatch, _MARK, True)
    setattr(module, name, dispatch)
    return True


def output_dir_for(trainer: Any, trial: Any = None) -> str:
    """Where this trainer writes ``checkpoint-N`` folders (a hyper-parameter search trial has its own)."""
    get = getattr(trainer, "_get_output_dir", None)
    if callable(get):
        with contextlib.suppress(Exception):
            return str(get(trial=trial))
    return str(trainer.args.output_dir)


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


def install_checkpoint_hooks(trainer: Any, hooks: CheckpointHooks) -> list[str]:
    """Call ``hooks`` around every save of ``trainer`` and route its rotation to them. Once per trainer.

    Returns:
        The features that could not be installed on this transformers version, by name (empty when all are on).
    """
    if getattr(trainer, _MARK, False):
        return []
    missing: list[str] = []
    original_save = getattr(trainer, "_save_checkpoint", None)
    if original_save is None:
        return ["save hooks (Trainer._save_checkpoint is missing)", "rotation protection"]

    import transformers.trainer as trainer_module

    # 5.x: rotation and sorting are module functions looked up in transformers.trainer at call time.
    module_rotation = _install_dispatcher(trainer_module, "rotate_checkpoints")
    module_sorting = _install_dispatcher(trainer_module, "sort_checkpoints")

    def routed_rotation(original: Any, *args: Any, **kwargs: Any) -> None:
        bound = _bind(args, kwargs, ("output_dir", "save_total_limit", "best_model_checkpoint"))
        hooks.rotate(str(bound.get("output_dir")), bound.get("save_total_limit"), bound.get("best_model_checkpoint"))

    @functools.wraps(original_save)
    def _save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        trial = _bind(args, kwargs, ("model", "trial")).get("trial")
        run_dir = output_dir_for(trainer, trial)
        if not hooks.before_save(trainer, run_dir):
            return None
        with routing(rotate_checkpoints=routed_rotation):
            result = original_save(*args, **kwargs)
        hooks.after_save(trainer, run_dir)
        return result

    trainer._save_checkpoint = _save_checkpoint

    if not module_rotation:
        # 4.x: rotation is the instance method _rotate_checkpoints(use_mtime=False, output_dir=None).
        original_rotate = getattr(trainer, "_rotate_checkpoints", None)
        if original_rotate is None:
            missing.append("rotation protection (no rotate_checkpoints / Trainer._rotate_checkpoints)")
        else:

            @functools.wraps(original_rotate)
            def _rotate_checkpoints(*args: Any, **kwargs: Any) -> None:
                bound = _bind(args, kwargs, ("use_mtime", "output_dir"))
                run_dir = bound.get("output_dir") or trainer.args.output_dir
                hooks.rotate(str(run_dir), trainer.args.save_total_limit, trainer.state.best_model_checkpoint)

            trainer._rotate_checkpoints = _rotate_checkpoints

    original_finalize = getattr(trainer, "_finalize_training", None)
    if module_sorting and original_finalize is not None:

        def routed_sorting(original: Any, *args: Any, **kwargs: Any) -> list[str]:
            bound = _bind(args, kwargs, ("output_dir", "checkpoint_prefix", "use_mtime", "best_model_checkpoint"))
            return hooks.end_of_training_candidates(str(bound.get("output_dir")), bound.get("best_model_checkpoint"))

        @functools.wraps(original_finalize)
        def _finalize_training(*args: Any, **kwargs: Any) -> Any:
            with routing(sort_checkpoints=routed_sorting):
                return original_finalize(*args, **kwargs)

        trainer._finalize_training = _finalize_training
    else:
        # 4.x: the end-of-training cleanup sorts with the instance method _sorted_checkpoints.
        original_sorted = getattr(trainer, "_sorted_checkpoints", None)
        if original_sorted is None:
            missing.append("end-of-training cleanup protection (no sort_checkpoints / Trainer._sorted_checkpoints)")
        else:

            @functools.wraps(original_sorted)
            def _sorted_checkpoints(*args: Any, **kwargs: Any) -> list[str]:
                bound = _bind(args, kwargs, ("output_dir", "checkpoint_prefix", "use_mtime"))
                run_dir = bound.get("output_dir") or trainer.args.output_dir
                return hooks.end_of_training_candidates(str(run_dir), trainer.state.best_model_checkpoint)

            trainer._sorted_checkpoints = _sorted_checkpoints
    setattr(trainer, _MARK, True)
    return missing
