"""The ways forward when a resume is refused: start fresh, or continue on the new data from the old weights.

Both are pre-flights the user calls before ``trainer.train()``. Neither deletes anything: the old ``checkpoint-*``
folders are moved (renamed, same filesystem) into ``output_dir/trainguard-archive/<UTC time>-<fingerprint>/``, where
the Trainer's resume and rotation logic never look (both only see top-level ``checkpoint-<N>`` folders).

- :func:`start_fresh`: archive the checkpoints; the next ``trainer.train()`` starts at step 0 from the model as it
  is now (the base model).
- :func:`trainguard.continue_on_new_data` (in :mod:`trainguard.recovery`, since it drives a Trainer): load the
  weights of the newest verified checkpoint into ``trainer.model`` and confirm they arrived (:func:`compare_loaded`),
  then archive the checkpoints; the next ``trainer.train()`` starts at step 0 from those weights.

Example::

    trainguard.start_fresh("out")     # the checkpoints move into out/trainguard-archive/<UTC time>-<fingerprint>/
    trainer.train()
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from .._util import utc_stamp
from ..errors import TrainGuardError
from ..safe_fs import ensure_dir
from ._layout import ARCHIVE_DIR
from ._resume import TRAINER_STATE, checkpoint_dirs, on_main_then_share, read_json_object

__all__ = [
    "ARCHIVE_DIR",
    "archive_checkpoints",
    "compare_loaded",
    "newest_verified",
    "start_fresh",
    "verify_if_possible",
]
_LOG = logging.getLogger("trainguard")


def _output_dir_of(output_dir_or_trainer: Any) -> Path:
    args = getattr(output_dir_or_trainer, "args", None)
    if args is not None and getattr(args, "output_dir", None) is not None:
        return Path(args.output_dir)
    if isinstance(output_dir_or_trainer, (str, os.PathLike)):
        return Path(output_dir_or_trainer)
    raise TypeError(f"expected a Trainer or an output_dir path, not {type(output_dir_or_trainer).__name__}")


def _stored_fingerprint(checkpoint: Path) -> str:
    """The short train fingerprint DatasetGuard recorded in ``checkpoint`` ("unknown" when there is none)."""
    try:
        state = read_json_object(checkpoint / TRAINER_STATE)
    except TrainGuardError:
        return "unknown"
    # every level checked for its type: a damaged state names no fingerprint, it never stops the archiving
    callbacks = state.get("stateful_callbacks")
    entry = callbacks.get("DatasetGuard") if isinstance(callbacks, dict) else None
    if isinstance(entry, list) and entry:
        entry = entry[-1]
    attributes = entry.get("attributes") if isinstance(entry, dict) else None
    record = attributes.get("run_identity") if isinstance(attributes, dict) else None
    train = record.get("train") if isinstance(record, dict) else None
    fingerprint = train.get("fingerprint") if isinstance(train, dict) else None
    return str(fingerprint)[:12] if isinstance(fingerprint, str) and fingerprint else "unknown"


def archive_checkpoints(output_dir: Path) -> Path | None:
    """Move every ``checkpoint-N`` of ``output_dir`` into one new folder of ``trainguard-archive/`` (main process
    only; :func:`start_fresh` is the all-ranks form). Returns that folder, or None when there was nothing to move."""
    checkpoints = checkpoint_dirs(output_dir)
    if not checkpoints:
        return None
    stamp = utc_stamp()
    label = re.sub(r"[^0-9A-Za-z]", "", _stored_fingerprint(checkpoints[-1]))
    if label == "unknown":
        from .lineage import checkpoint_origin

        recorded = checkpoint_origin(checkpoints[-1]).lineage
        label = f"lineage-{recorded.rsplit('-', 1)[-1]}" if recorded else label
    # a real folder inside output_dir (UnsafeFileError otherwise): a planted link would carry the checkpoints away
    base = ensure_dir(output_dir / ARCHIVE_DIR, inside=output_dir) / f"{stamp}-{label}"
    target, n = base, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    target.mkdir(parents=True)
    for checkpoint in checkpoints:
        os.rename(checkpoint, target / checkpoint.name)
    _LOG.warning(
        "trainguard: moved %d checkpoint(s) (%s) from %s into %s; nothing was deleted",
        len(checkpoints),
        ", ".join(c.name for c in checkpoints),
        output_dir,
        target,
    )
    return target


def start_fresh(output_dir_or_trainer: Any) -> Path | None:
    """Move every ``checkpoint-*`` folder of the run into ``output_dir/trainguard-archive/<UTC time>-<fingerprint>/``
    so that the next ``trainer.train()`` starts at step 0. Nothing is deleted.

    Call it on every rank of a distributed run (the main process moves, the others wait for it), then call
    ``trainer.train()`` without ``resume_from_checkpoint``.

    Args:
        output_dir_or_trainer: The Trainer (its ``args.output_dir``) or the output folder.

    Returns:
        The archive folder that now holds the checkpoints, or None when there was no checkpoint to move.

    Raises:
        OSError: A checkpoint could not be moved (those already moved stay in the archive, named in the log).
        UnsafeFileError: ``trainguard-archive`` in ``output_dir`` is a link or a file, or leads outside it;
            nothing is moved.

    Example::

        archive = trainguard.start_fresh(trainer)   # out/trainguard-archive/20250101T120000Z-9f3a.../
        trainer.train()
    """
    output_dir = _output_dir_of(output_dir_or_trainer)
    result: Path | None = on_main_then_share(archive_checkpoints, output_dir)
    return result


def newest_verified(output_dir: Path) -> Path | None:
    """The newest checkpoint of ``output_dir`` that verifies (the newest by number without checkpoint checks)."""
    try:
        from .checkpoint import latest_verified_checkpoint
    except ImportError:
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    verified = latest_verified_checkpoint(output_dir)
    return Path(verified) if verified is not None else None


def verify_if_possible(checkpoint: Path) -> None:
    """``verify_checkpoint`` where the checkpoint module is installed."""
    try:
        from .checkpoint import verify_checkpoint
    except ImportError:
        return
    verify_checkpoint(checkpoint)


def compare_loaded(model: Any, checkpoint: Path) -> list[str]:
    """Names of tensors whose values in ``model`` differ from the checkpoint's files (empty: all arrived)."""
    import torch
    from safetensors.torch import load_file

    problems: list[str] = []
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        from .lora import compare_adapter_weights

        return compare_adapter_weights(model, checkpoint)
    files = sorted(checkpoint.glob("model*.safetensors"))
    params = dict(model.state_dict())
    for file in files:
        for name, tensor in load_file(str(file)).items():
            current = params.get(name)
            if current is None:
                continue  # tied or renamed weights are resolved by the loader itself
            if current.shape != tensor.shape or not torch.equal(current.detach().cpu(), tensor):
                problems.append(name)
    return problems
