"""The trainguard error hierarchy.

Every error trainguard raises is a :class:`TrainGuardError`. Each carries three structured parts that are also
rendered into its message, so a log line alone is enough to act on:

- ``what``: what was found ("checkpoint-50/model.safetensors changed since it was saved").
- ``where``: an ordered mapping of locations (``file``, ``line``, ``field``, ``step``, ``rank``, ...).
- ``next_step``: what the user can do now. Each subclass has a default; a raise site may give a sharper one.

Example::

    from trainguard.errors import CheckpointIntegrityError
    raise CheckpointIntegrityError(                     # raises: CheckpointIntegrityError
        "model.safetensors is truncated",
        where={"file": "out/checkpoint-50/model.safetensors"},
        next_step="Resume from an older verified checkpoint.",
    )
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from .display import printable

__all__ = [
    "AdapterError",
    "CheckpointIncompleteError",
    "CheckpointIntegrityError",
    "CheckpointNotFoundError",
    "ConfigError",
    "DataValidationError",
    "DatasetMismatchError",
    "HangError",
    "LineageError",
    "LoraConfigMismatchError",
    "LossSpikeError",
    "MalformedFileError",
    "NonFiniteError",
    "PreflightError",
    "RestoreRefusedError",
    "ResumeAttestationError",
    "RunLockedError",
    "SaveAuditError",
    "TokenizerMismatchError",
    "TrainGuardError",
    "UnsafeFileError",
    "WebhookConfigError",
]

# Keys rendered first and in this order; any other key follows in insertion order.
_WHERE_ORDER = ("file", "folder", "line", "field", "step", "rank", "host", "pid")


class TrainGuardError(Exception):
    """Base class of every error trainguard raises.

    Args:
        what: What was found, in one sentence.
        where: Where it was found: ``file``, ``line``, ``field``, ``step``, ``rank`` or any other named location.
        next_step: What the user can do next. Defaults to the subclass's ``default_next_step``.
        evidence: Extra machine-readable facts (both fingerprints, both values, ...), shown in ``to_dict``.

    Example::

        try:
            trainguard.verify_checkpoint("out/checkpoint-50")
        except trainguard.TrainGuardError as err:
            print(err.what, err.where, err.next_step)
    """

    default_next_step: ClassVar[str] = "See the trainguard documentation for this error."

    def __init__(
        self,
        what: str,
        *,
        where: Mapping[str, Any] | None = None,
        next_step: str | None = None,
        evidence: Mapping[str, Any] | None = None,
    ) -> None:
        self.what = what
        self.where: dict[str, Any] = dict(where or {})
        self.next_step = next_step if next_step is not None else self.default_next_step
        self.evidence: dict[str, Any] = dict(evidence or {})
        super().__init__(self._render())

    def _render(self) -> str:
        # The message reaches terminals (the CLI, a traceback, a log): each part is one printable line, so a file
        # name holding ESC or a newline cannot drive the terminal or forge a line. The fields keep the exact text.
        lines = [printable(self.what)]
        if self.where:
            keys = [k for k in _WHERE_ORDER if k in self.where]
            keys += [k for k in self.where if k not in _WHERE_ORDER]
            lines.append("  where: " + ", ".join(printable(f"{k}={self.where[k]}") for k in keys))
        if self.next_step:
            lines.append("  next: " + printable(self.next_step))
        return "\n".join(lines)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields must survive pickling (multiprocessing, torch.distributed object collectives).
        return (_rebuild, (type(self), self.what, self.where, self.next_step, self.evidence))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form: ``{"error": class name, "what", "where", "next_step", "evidence"}``."""
        return {
            "error": type(self).__name__,
            "what": self.what,
            "where": {k: _jsonable(v) for k, v in self.where.items()},
            "next_step": self.next_step,
            "evidence": {k: _jsonable(v) for k, v in self.evidence.items()},
        }


_E = TypeVar("_E", bound=BaseException)


def at_call_site(err: _E) -> _E:
    """``err`` with its traceback cut, to re-raise at the boundary of what the user called (``trainer.train()``,
    ``all_guards()``, ``Trainer(...)``): ``raise at_call_site(err)`` inside ``except ... as err``.

    A refusal is a message, not a crash: its text says what, where and what next, and the dozen frames inside
    trainguard and the Trainer that led to it only bury that. The full traceback goes to the ``trainguard`` logger
    at DEBUG, for whoever debugs trainguard itself. The error's own cause and context (the ``OSError`` behind it)
    are kept: re-raising the object being handled does not chain it to itself.
    """
    log = logging.getLogger("trainguard")
    if log.isEnabledFor(logging.DEBUG):
        log.debug("trainguard: where %s was raised", type(err).__name__, exc_info=err)
    return err.with_traceback(None)


def _rebuild(
    cls: type[TrainGuardError],
    what: str,
    where: dict[str, Any],
    next_step: str,
    evidence: dict[str, Any],
) -> TrainGuardError:
    return cls(what, where=where, next_step=next_step, evidence=evidence)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v) for v in items]
    return str(value)


class RunLockedError(TrainGuardError):
    """Another live process holds the run lock on this ``output_dir``."""

    default_next_step = (
        "Wait for the other run to finish, stop it, or give this run another output_dir. "
        "The lock is released by the kernel when its holder exits, so it is never stale."
    )


class PreflightError(TrainGuardError):
    """A resource check before training failed (disk space, memory, a repeating crash)."""

    default_next_step = "Free the resource named above, or lower what the run needs, then start again."


class DatasetMismatchError(TrainGuardError):
    """The run resumes from a checkpoint that was trained on other data (or another global batch)."""

    default_next_step = (
        "Resume with the dataset the checkpoint was trained on, or start fresh (old checkpoints are archived, "
        "never deleted), or continue from the checkpoint's weights with the step counter reset."
    )


class LoraConfigMismatchError(TrainGuardError):
    """The LoRA configuration differs from the one the checkpoint was trained with."""

    default_next_step = (
        "Use the checkpoint's LoRA settings to resume, or start a new run in another output_dir for the new settings."
    )


class CheckpointIntegrityError(TrainGuardError):
    """A checkpoint is missing files, truncated, or its content changed since it was saved."""

    default_next_step = (
        "Resume from an older verified checkpoint (`trainguard verify OUTPUT_DIR` lists them); "
        "the damaged folder can be set aside, it is never deleted."
    )


class CheckpointNotFoundError(CheckpointIntegrityError, ValueError):
    """The checkpoint to resume from is not there: the path does not exist, or is not a folder. Also a
    ``ValueError``, as the plain Trainer raises for the same path ("Can't find a valid checkpoint at ..."), so code
    that catches that keeps working with the guards attached.

    Example::

        try:
            trainer.train(resume_from_checkpoint="out/chekpoint-50")
        except ValueError as err:  # the plain Trainer's error, and this one
            print(err)
    """

    default_next_step = (
        "Check the path for a typo: `ls OUTPUT_DIR` lists the checkpoint-N folders there, and "
        "train(resume_from_checkpoint=True) resumes from the newest one that verifies."
    )


class CheckpointIncompleteError(CheckpointIntegrityError, ValueError):
    """The checkpoint folder holds no model weights the Trainer could load: an empty folder, or a save that never
    wrote them. Also a ``ValueError``, as the plain Trainer raises for that folder ("Can't find a valid checkpoint
    at ..."), so code that catches that keeps working with the guards attached.

    Example::

        try:
            trainer.train(resume_from_checkpoint="out/checkpoint-50")  # an empty folder
        except ValueError as err:  # the plain Trainer's error, and this one
            print(err)
    """

    default_next_step = (
        "Resume from an older checkpoint that verifies (`trainguard verify OUTPUT_DIR` lists them), or "
        "train(resume_from_checkpoint=True) with CheckpointVerifier, which picks it; nothing is deleted."
    )


class SaveAuditError(CheckpointIntegrityError):
    """A save completed but does not hold what the run had: an empty or missing tensor, a tensor of another shape or
    dtype, missing optimizer/scheduler/RNG state; or, before step 1, the run's saves could not succeed at all."""

    default_next_step = (
        "Nothing was committed from this save, and the run stopped at it so no further steps are lost on top of a "
        "hollow checkpoint. Fix the cause named above (a ZeRO-3 save without a 16-bit gather, an FSDP state-dict "
        "type, shared tensors the model does not declare), then resume from the newest verified checkpoint."
    )


class ResumeAttestationError(TrainGuardError):
    """A resume does not continue the saved run exactly: its optimizer, learning-rate schedule, batch geometry, data
    position or random state differ from what the run had at that save, or it would train no step."""

    default_next_step = (
        "Resume with the saved run's settings (the fields above), or start a new run on purpose; "
        "CheckpointVerifier(attest_resume='alert') reports this without stopping."
    )


class LineageError(TrainGuardError):
    """The run would mix with another run's checkpoints: a fresh start into an output_dir that holds them, or a
    resume that would land on them."""

    default_next_step = (
        "Resume the checkpoints that are there, archive them with trainguard.start_fresh (moved, never deleted), or "
        "give this run another output_dir."
    )


class NonFiniteError(TrainGuardError):
    """A loss, gradient norm, metric or parameter became NaN or infinite."""

    default_next_step = (
        "Resume from the newest good checkpoint with a lower learning rate, gradient clipping, "
        "or bf16 instead of fp16; inspect the batch at the step named above."
    )


class HangError(TrainGuardError):
    """No training progress was seen within the watchdog's budget."""

    default_next_step = "Read the stack dump named above: the frames of the main thread show where the step stalled."


class DataValidationError(TrainGuardError):
    """The training data failed validation (unreadable, malformed, or over a threshold)."""

    default_next_step = "Fix the records named above, or relax the threshold if the data is as intended."


class UnsafeFileError(TrainGuardError):
    """A path trainguard reads or writes is not a regular file it may use: a FIFO, a device, a socket, or a link
    where trainguard never follows one (someone else's file on shared storage, or a planted one)."""

    default_next_step = (
        "Remove or rename the path named above (trainguard did not create it), or point output_dir elsewhere; "
        "see docs/security.md."
    )


class MalformedFileError(TrainGuardError):
    """A file trainguard reads cannot be parsed within its bounds: not UTF-8, not JSON, too large, too deeply
    nested, or holding numbers that are not finite. The file is left as it is."""

    default_next_step = (
        "The file is corrupted or was not written by the tool that owns its name; restore it from a copy or move it "
        "aside, then run again."
    )


class WebhookConfigError(TrainGuardError, ValueError):
    """A webhook URL trainguard cannot POST to (no ``http://`` or ``https://`` scheme, no host). The message shows
    the URL with its credentials redacted. Also a ``ValueError``, which this used to be."""

    default_next_step = (
        "Give a full http:// or https:// URL (webhook_url= or the TRAINGUARD_WEBHOOK_URL environment variable), "
        "or unset it to alert without a webhook."
    )


class AdapterError(TrainGuardError):
    """A LoRA/PEFT adapter is not training: its parameters receive no gradient, or its ``lora_B`` matrices are still
    all zero after the steps that should have moved them."""

    default_next_step = (
        "Check that the adapter's parameters require grad and receive gradients: with gradient checkpointing call "
        "model.enable_input_require_grads() (or pass {'use_reentrant': False} as activation_checkpointing_kwargs, "
        "gradient_checkpointing_kwargs before transformers 5.23); check target_modules against the model's module "
        "names."
    )


class TokenizerMismatchError(TrainGuardError):
    """The tokenizer of this run (or of a merge) is not the one the checkpoint was trained with: vocabulary,
    special tokens, EOS/PAD/BOS, chat template or padding side changed."""

    default_next_step = (
        "Use the tokenizer the checkpoint was trained with (the checkpoint folder holds it when the Trainer saved "
        "its processing_class), or start a fresh run if the change is intended."
    )


class LossSpikeError(TrainGuardError):
    """The loss or gradient norm kept spiking: SpikeGuard rolled back as many times as it was allowed to (or found
    no verified checkpoint to roll back to) and stopped the run instead of training on."""

    default_next_step = (
        "Read the spike records in trainguard-spikes.jsonl in the output_dir (steps, z-scores, the batches' samples): "
        "check those samples, lower the learning rate or raise warmup, then resume from the checkpoint it names."
    )


class ConfigError(TrainGuardError, ValueError):
    """A ``TRAINGUARD_*`` environment variable, ``trainguard.toml`` or a tool's ``trainguard:`` YAML key holds a
    value trainguard cannot use: an unknown guard or option, a value of the wrong kind, a file that is not TOML.
    Also a ``ValueError``. ``where`` names the variable, or the file, line and key."""

    default_next_step = (
        "Fix or unset the setting named above; docs/integrations.md lists every variable and key, and the guard's "
        "own page lists its options."
    )


class RestoreRefusedError(CheckpointIntegrityError):
    """``trainguard restore`` would not bring a set-aside checkpoint back: the path is not one trainguard set aside,
    its ``checkpoint-N`` name is taken in the output_dir, or its damage needs the user's explicit say
    (``--accept-inexact`` for missing RNG state, ``--force`` for anything else). Nothing was moved."""

    default_next_step = (
        "`trainguard clean OUTPUT_DIR` lists what is set aside and `trainguard verify` what is wrong with it; "
        "docs/checkpoint-integrity.md, 'Bringing a set-aside checkpoint back', explains the choices."
    )
