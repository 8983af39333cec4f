"""Recovery steps that drive a Trainer: an adapter, like the callbacks, over the checks in
:mod:`trainguard.checks.fresh_start`.

Example::

    trainguard.continue_on_new_data(trainer)     # weights of the newest verified checkpoint, step reset
    trainer.train()
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from .callbacks import _trainer_compat
from .checks._resume import on_main_then_share
from .checks.fresh_start import compare_loaded, newest_verified, start_fresh, verify_if_possible
from .errors import CheckpointIntegrityError

__all__ = ["continue_on_new_data"]

_LOG = logging.getLogger("trainguard")


def continue_on_new_data(trainer: Any, checkpoint: str | os.PathLike[str] | None = None) -> Path:
    """Load a checkpoint's weights into ``trainer.model``, then archive the run's checkpoints, so that the next
    ``trainer.train()`` learns on the Trainer's (new) data from those weights with the step counter, optimizer and
    learning-rate schedule reset. Nothing is deleted.

    The weights are loaded the way ``Trainer`` itself loads them on resume (for a PEFT model: the adapter weights
    only), then compared tensor by tensor with the checkpoint's files. Call it on every rank of a distributed run.

    Args:
        trainer: The Trainer, already holding the new data.
        checkpoint: The checkpoint to take the weights from. Default: the newest checkpoint in ``output_dir`` that
            passes ``verify_checkpoint``.

    Returns:
        Where the loaded checkpoint now is (inside the archive folder).

    Raises:
        CheckpointIntegrityError: There is no (verified) checkpoint, it fails verification, or its weights did not
            arrive in the model.

    Example::

        trainguard.continue_on_new_data(trainer)
        trainer.train()                      # step 0, new optimizer and schedule, the checkpoint's weights
    """
    output_dir = Path(trainer.args.output_dir)
    if checkpoint is None:
        source = on_main_then_share(newest_verified, output_dir)
        if source is None:
            raise CheckpointIntegrityError(
                "no verified checkpoint to continue from",
                where={"file": str(output_dir)},
                next_step="Pass checkpoint=PATH, or use trainguard.start_fresh(trainer) to train from the base model.",
            )
    else:
        source = Path(checkpoint)
        on_main_then_share(verify_if_possible, source)
    if not source.is_dir():
        raise CheckpointIntegrityError("the checkpoint does not exist", where={"file": str(source)})
    peft_config = getattr(trainer.model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        from .checks.lora import check_lora_config

        check_lora_config(source, peft_config)  # a clear refusal instead of a size-mismatch dump
    try:
        _trainer_compat.load_checkpoint_weights(trainer, source)
    except NotImplementedError as err:
        raise CheckpointIntegrityError(
            str(err),
            where={"file": str(source)},
            next_step="Load the weights yourself (model.load_state_dict / load_adapter), then call start_fresh.",
        ) from err
    except (ValueError, RuntimeError, OSError) as err:
        raise CheckpointIntegrityError(
            f"could not load the checkpoint's weights: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
            where={"file": str(source)},
            next_step="Check that the model has the checkpoint's architecture; nothing was moved.",
        ) from err
    mismatched = compare_loaded(trainer.model, source)
    if mismatched:
        shown = ", ".join(mismatched[:5]) + (f" and {len(mismatched) - 5} more" if len(mismatched) > 5 else "")
        raise CheckpointIntegrityError(
            f"the checkpoint's weights did not arrive in the model: {len(mismatched)} tensor(s) differ ({shown})",
            where={"file": str(source)},
            next_step="Check that the model has the checkpoint's architecture and adapter names; nothing was moved.",
            evidence={"tensors": mismatched},
        )
    archive = start_fresh(output_dir)
    moved = archive / source.name if archive is not None and source.parent.resolve() == output_dir.resolve() else source
    with contextlib.suppress(Exception):
        trainer.state.global_step = 0
    _LOG.warning("trainguard: loaded the weights of %s; the next train() starts at step 0 from them", source)
    return moved
