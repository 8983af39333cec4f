"""Which checkpoint a ``Trainer.train(resume_from_checkpoint=...)`` call would load, and what it holds.

Shared by the guards that must act before the Trainer loads anything (DatasetGuard, LoraConfigGuard). Reads files
only; imports neither torch nor transformers.

Example::

    ckpt = resolve_resume_checkpoint("out", True)      # like transformers' get_last_checkpoint("out")
    state = read_trainer_state(ckpt) if ckpt else None
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import distributed
from ..errors import CheckpointIntegrityError, TrainGuardError
from ._layout import CHECKPOINT_RE, TRAINER_STATE, checkpoint_step

__all__ = [
    "TRAINER_STATE",
    "checkpoint_dirs",
    "checkpoint_step",
    "on_main_then_share",
    "read_json_object",
    "read_trainer_state",
    "resolve_resume_checkpoint",
]


def checkpoint_dirs(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The ``checkpoint-N`` folders directly in ``output_dir``, oldest (lowest N) first; [] when there are none."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


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
    """Read a JSON file that must hold an object.

    Raises:
        CheckpointIntegrityError: The file is unreadable, is not valid JSON (the line is named), or is not an object.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointIntegrityError(f"cannot read {file.name}: {err}", where={"file": str(file)}) from err
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointIntegrityError(
            f"{file.name} is not valid JSON ({err.msg})",
            where={"file": str(file), "line": err.lineno},
        ) from err
    if not isinstance(value, dict):
        raise CheckpointIntegrityError(
            f"{file.name} holds a JSON {type(value).__name__}, not an object", where={"file": str(file)}
        )
    return value


def read_trainer_state(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``trainer_state.json`` of a checkpoint folder.

    Raises:
        CheckpointIntegrityError: The folder or the file is missing, or the file is not a JSON object.
    """
    folder = Path(checkpoint)
    file = folder / TRAINER_STATE
    if not folder.is_dir():
        raise CheckpointIntegrityError(
            f"the checkpoint to resume from does not exist: {folder}", where={"file": str(folder)}
        )
    if not file.is_file():
        raise CheckpointIntegrityError(
            f"{folder.name} has no {TRAINER_STATE}: it is incomplete (killed mid-save?) or not a Trainer checkpoint",
            where={"file": str(file)},
        )
    return read_json_object(file)


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
