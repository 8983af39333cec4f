"""Which checkpoint a ``Trainer.train(resume_from_checkpoint=...)`` call would load, and what it holds.

Shared by the guards that must act before the Trainer loads anything (DatasetGuard, LoraConfigGuard). Reads files
only; imports neither torch nor transformers.

Example::

    ckpt = resolve_resume_checkpoint("out", True)      # like transformers' get_last_checkpoint("out")
    state = read_trainer_state(ckpt) if ckpt else None
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import distributed
from ..errors import CheckpointIntegrityError, CheckpointNotFoundError, TrainGuardError
from ..safe_fs import display_name, load_json
from ._layout import TRAINER_STATE, CheckpointLayout, checkpoint_step

__all__ = [
    "TRAINER_STATE",
    "checkpoint_dirs",
    "checkpoint_step",
    "on_main_then_share",
    "read_json_object",
    "read_trainer_state",
    "resolve_resume_checkpoint",
    "trainer_state_problem",
]


def checkpoint_dirs(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The ``checkpoint-N`` folders directly in ``output_dir``, oldest (lowest N) first; [] when there are none."""
    return CheckpointLayout(output_dir).list()


def resolve_resume_checkpoint(output_dir: str | os.PathLike[str] | None, resume_from_checkpoint: Any) -> Path | None:
    """The folder ``Trainer.train(resume_from_checkpoint=...)`` would load, or None when it would start fresh.

    ``True`` resolves like ``transformers.trainer_utils.get_last_checkpoint(output_dir)`` (highest number wins);
    a path is taken as given. None is returned for ``None``/``False``, and for ``True`` with no checkpoint (the
    Trainer then raises its own "No valid checkpoint found" error, which is clear enough).

    Example::

        resolve_resume_checkpoint("out", True)  # Path("out/checkpoint-50")
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        if output_dir is None:
            return None
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    return Path(os.fspath(resume_from_checkpoint))


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON file that must hold an object (a regular file, bounded, finite numbers, shallow nesting).

    Raises:
        CheckpointIntegrityError: The file is unreadable, not a regular file, is not valid JSON (the line is named),
            is crafted (too deep, numbers out of range), or is not an object.
    """
    file = Path(path)
    try:
        value = load_json(file)
    except OSError as err:
        raise CheckpointIntegrityError(
            f"cannot read {display_name(file.name)}: {err}", where={"file": display_name(file)}
        ) from err
    except TrainGuardError as err:  # MalformedFileError, UnsafeFileError: the same refusal, as a checkpoint's
        raise CheckpointIntegrityError(
            err.what, where={**err.where, "file": display_name(file)}, evidence={"cause": type(err).__name__}
        ) from None
    if not isinstance(value, dict):
        raise CheckpointIntegrityError(
            f"{display_name(file.name)} holds a JSON {type(value).__name__}, not an object",
            where={"file": display_name(file)},
        )
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def trainer_state_problem(state: dict[str, Any]) -> tuple[str, str] | None:
    """``(field, why)`` for the first field of a parsed ``trainer_state.json`` whose type the Trainer (and
    trainguard's guards) cannot use, or None. Only fields the Trainer writes are checked, and only their types."""
    step = state.get("global_step")
    if step is not None and not (_is_int(step) and step >= 0):
        return "global_step", f"global_step is {str(step)[:40]!r}, not a non-negative integer"
    max_steps = state.get("max_steps")
    if max_steps is not None and not _is_int(max_steps):
        return "max_steps", f"max_steps is {str(max_steps)[:40]!r}, not an integer"
    epoch = state.get("epoch")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, (int, float))):
        return "epoch", f"epoch is {str(epoch)[:40]!r}, not a number"
    history = state.get("log_history")
    if history is not None and not (isinstance(history, list) and all(isinstance(e, dict) for e in history)):
        return "log_history", "log_history is not a list of objects"
    callbacks = state.get("stateful_callbacks")
    if callbacks is not None:
        if not isinstance(callbacks, dict):
            return "stateful_callbacks", f"stateful_callbacks is a JSON {type(callbacks).__name__}, not an object"
        for name, entry in callbacks.items():
            entries = entry if isinstance(entry, list) else [entry]
            if not all(isinstance(e, dict) for e in entries):
                return f"stateful_callbacks.{name}", f"stateful_callbacks[{name!r}] is not an object (or list of them)"
    return None


def read_trainer_state(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``trainer_state.json`` of a checkpoint folder, its fields of the types the Trainer writes.

    Raises:
        CheckpointNotFoundError: The folder is not there (also a ``ValueError``, as the Trainer's own error).
        CheckpointIntegrityError: The file is missing, is not a JSON object, or a field has another type
            (``where["field"]`` names it).
    """
    folder = Path(checkpoint)
    file = folder / TRAINER_STATE
    if not folder.is_dir():  # a ValueError too, as the plain Trainer's "Can't find a valid checkpoint at ..."
        raise CheckpointNotFoundError(
            f"the checkpoint to resume from does not exist: {display_name(folder)}",
            where={"folder": display_name(folder)},
        )
    if not file.is_file():
        raise CheckpointIntegrityError(
            f"{display_name(folder.name)} has no {TRAINER_STATE}: it is incomplete (killed mid-save?) or not a Trainer "
            "checkpoint",
            where={"file": display_name(file)},
        )
    state = read_json_object(file)
    problem = trainer_state_problem(state)
    if problem is not None:
        field, why = problem
        raise CheckpointIntegrityError(
            f"{display_name(folder.name)}/{TRAINER_STATE} is malformed: {why} "
            "(corrupted, or not written by the Trainer)",
            where={"file": display_name(file), "field": field},
        )
    return state


def on_main_then_share(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` on the main process only, then give its result, or its error, to every rank.

    Every rank must call it at the same point (it is a collective under a process group). A decision taken from
    files on rank 0 thus reaches every rank: all of them return the same value or raise the same error, so no rank
    is left waiting in a later collective. Without a process group it is ``fn(*args)``.
    """
    payload: tuple[str, Any] = ("ok", None)
    local_error: BaseException | None = None
    if distributed.is_main_process():
        try:
            payload = ("ok", fn(*args))
        except Exception as err:
            local_error = err
            # trainguard's errors pickle with all their fields; others travel as text (they may not pickle)
            sent = err if isinstance(err, TrainGuardError) else RuntimeError(f"on rank 0: {type(err).__name__}: {err}")
            payload = ("error", sent)
    shared = distributed.broadcast_object(payload)
    if shared[0] == "error":
        raise local_error if local_error is not None else shared[1]
    return shared[1]
