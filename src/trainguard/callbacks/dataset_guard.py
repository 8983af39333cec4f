"""DatasetGuard: refuse a resume on other data, with another global batch, with another tokenizer, or after which
nothing would train."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.trainer_callback import ExportableState

from .. import distributed
from ..alerts import get_logger
from ..bounds import yes_no
from ..checks._resume import on_main_then_share, resolve_resume_checkpoint
from ..checks.dataset import (
    CHECK_EVAL,
    check_checkpoint_resume,
    check_resume_identity,
    run_identity_record,
    stored_record,
)
from ..checks.tokenizer import CHECK_TOKENIZER, resolve_tokenizer, tokenizer_fingerprint
from ..errors import DatasetMismatchError, TokenizerMismatchError, TrainGuardError
from . import _trainer_compat
from ._base import GuardCallback, find_trainer

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["DatasetGuard"]

# The run-identity record computed by before_train, per Trainer. With restore_callback_states_from_checkpoint the
# Trainer replaces the user's guard by a new instance built from the checkpoint's args; that instance finds the
# current record here instead of hashing the data a second time.
_CURRENT: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def _steps_per_epoch(trainer: Any) -> int | None:
    """Optimizer steps per epoch as ``Trainer.set_initial_training_values`` computes them: from the length of the
    (per-rank) train dataloader the Trainer will build, and gradient accumulation."""
    try:
        n = len(trainer.get_train_dataloader())
    except (TypeError, ValueError, NotImplementedError):
        return None
    accumulation = max(int(trainer.args.gradient_accumulation_steps), 1)
    return max(n // accumulation + int(n % accumulation > 0), 1)


def _tokenizer_record(trainer: Any) -> dict[str, Any] | None:
    """The fingerprint of the Trainer's ``processing_class`` when it is a tokenizer or a processor holding one, else
    None (also, with a logged warning, when an unusual tokenizer cannot be fingerprinted: never a false refusal)."""
    processing_class = getattr(trainer, "processing_class", None)
    if resolve_tokenizer(processing_class) is None:
        return None
    try:
        return tokenizer_fingerprint(processing_class)
    except Exception as exc:  # a third-party tokenizer class with an attribute that raises
        get_logger().warning(
            "trainguard DatasetGuard: cannot fingerprint the tokenizer (%s: %s); it is not recorded or compared",
            type(exc).__name__,
            exc,
        )
        return None


class DatasetGuard(GuardCallback, ExportableState):
    """Records the run's identity in every checkpoint, and refuses a resume that would silently go wrong.

    Recorded (inside ``trainer_state.json``, under ``stateful_callbacks["DatasetGuard"]``): the train and eval
    content fingerprints and row counts, steps per epoch, and the global batch (world size × per-device batch ×
    gradient accumulation), and, when the Trainer has a ``processing_class`` that is a tokenizer (or a processor
    holding one), the tokenizer's fingerprint (:func:`trainguard.checks.tokenizer.tokenizer_fingerprint`). On
    resume, before the Trainer loads anything, it refuses with :class:`~trainguard.DatasetMismatchError` when the data
    differs, the global batch changed, or no step would run, and says what plain Trainer would have done and the ways
    forward (:func:`trainguard.start_fresh`, :func:`trainguard.continue_on_new_data`); and with
    :class:`~trainguard.TokenizerMismatchError` when the tokenizer differs (vocabulary, merges, special tokens,
    EOS/PAD/BOS, chat template, padding or truncation side), naming each changed field. It checks again at
    ``on_train_begin``.

    Args:
        train_source: What to fingerprint instead of ``trainer.train_dataset``: the files a streaming dataset reads
            (a path or glob), or any input :func:`trainguard.dataset_fingerprint` accepts.
        eval_source: The same for the eval data.
        check_eval: A changed eval set: ``"warn"`` (default: it does not break a resume, but metrics before and
            after are not comparable), ``"raise"``, or ``"off"``.
        refuse_empty_resume: Refuse a resume after which no step would run (default True: plain Trainer reports
            success having trained nothing).
        check_tokenizer: A changed tokenizer: ``"raise"`` (default, a changed ``padding_side`` included: it moves
            the positions of every padded row), ``"warn"``, or ``"off"`` (not recorded either). A checkpoint
            saved without a tokenizer record resumes with a note.
        alert_sinks: Replace the default alert sinks.
        webhook_url: Also POST alerts to this URL.

    Example::

        trainer = Trainer(..., callbacks=[trainguard.DatasetGuard()])
        trainer.train(resume_from_checkpoint=True)      # refused if the data changed
    """

    guard_name = "dataset_guard"

    def __init__(
        self,
        *,
        train_source: Any = None,
        eval_source: Any = None,
        check_eval: str = "warn",
        refuse_empty_resume: bool = True,
        check_tokenizer: str = "raise",
        alert_sinks: Any = None,
        webhook_url: str | None = None,
    ) -> None:
        super().__init__(alert_sinks=alert_sinks, webhook_url=webhook_url)
        if check_eval not in CHECK_EVAL:
            raise ValueError(f"check_eval must be one of {CHECK_EVAL}, not {check_eval!r}")
        if check_tokenizer not in CHECK_TOKENIZER:
            raise ValueError(f"check_tokenizer must be one of {CHECK_TOKENIZER}, not {check_tokenizer!r}")
        self.check_tokenizer = check_tokenizer
        self.train_source = train_source
        self.eval_source = eval_source
        self.check_eval = check_eval
        self.refuse_empty_resume = yes_no("refuse_empty_resume", refuse_empty_resume, owner="DatasetGuard")
        #: This run's identity record, saved into each checkpoint by ``state()``.
        self.run_identity: dict[str, Any] | None = None
        self._summary = "not run yet"

    # ------------------------------------------------------------------------------------------ ExportableState
    def state(self) -> dict[str, Any]:
        # Only options go in "args": with restore_callback_states_from_checkpoint the Trainer rebuilds this guard
        # from the checkpoint's args, so anything describing the *current* run there would be replaced by the old.
        def jsonable(source: Any) -> Any:
            return source if isinstance(source, str) else None

        return {
            "args": {
                "train_source": jsonable(self.train_source),
                "eval_source": jsonable(self.eval_source),
                "check_eval": self.check_eval,
                "refuse_empty_resume": self.refuse_empty_resume,
                "check_tokenizer": self.check_tokenizer,
            },
            "attributes": {"run_identity": self.run_identity},
        }

    # ---------------------------------------------------------------------------------------------- the record
    def _current_record(self, trainer: Any, steps_per_epoch: int | None) -> dict[str, Any]:
        args = trainer.args
        return run_identity_record(
            self.train_source if self.train_source is not None else trainer.train_dataset,
            self.eval_source if self.eval_source is not None else getattr(trainer, "eval_dataset", None),
            world_size=int(args.world_size),
            per_device_train_batch_size=int(args.per_device_train_batch_size),
            gradient_accumulation_steps=int(args.gradient_accumulation_steps),
            steps_per_epoch=steps_per_epoch,
            check_eval=self.check_eval,
            tokenizer=_tokenizer_record(trainer) if self.check_tokenizer != "off" else None,
        )

    def _check(self, trainer: Any, resume_from_checkpoint: Any, steps_per_epoch: int | None) -> dict[str, Any]:
        args = trainer.args
        current = self._current_record(trainer, steps_per_epoch)
        checkpoint = resolve_resume_checkpoint(args.output_dir, resume_from_checkpoint)
        warnings = check_checkpoint_resume(
            current,
            checkpoint,
            guard_name=type(self).__name__,
            max_steps=int(args.max_steps),
            num_train_epochs=args.num_train_epochs,
            refuse_empty_resume=self.refuse_empty_resume,
            check_eval=self.check_eval,
            check_tokenizer=self.check_tokenizer,
        )
        return {"record": current, "warnings": warnings, "checkpoint": str(checkpoint) if checkpoint else None}

    # ------------------------------------------------------------------------------------------------- events
    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> Any:
        steps_per_epoch = _steps_per_epoch(trainer)  # every rank: building the dataloader is the Trainer's own code
        try:
            outcome = on_main_then_share(self._check, trainer, resume_from_checkpoint, steps_per_epoch)
        except (DatasetMismatchError, TokenizerMismatchError) as err:
            self._summary = f"refused the resume: {err.what}"
            if distributed.is_main_process():
                self.alert("error", err.what, evidence=err.evidence, raised=True)
            raise
        self.run_identity = outcome["record"]
        _CURRENT[trainer] = outcome["record"]
        if distributed.is_main_process():
            for message in outcome["warnings"]:
                self.alert("warning", message)
        train = outcome["record"]["train"]
        fp = (train.get("fingerprint") or "none")[:12]
        resumed = outcome["checkpoint"]
        batch = outcome["record"]["global_batch"]
        self._summary = f"train data {fp} ({train.get('num_rows')} rows), global batch {batch}"
        tokenizer = outcome["record"].get("tokenizer")
        if tokenizer is not None:
            self._summary += f", tokenizer {tokenizer.get('class')}"
        self._summary += f"; resumed from {Path(resumed).name}: same data and batch" if resumed else "; no resume"
        return resume_from_checkpoint

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        name = type(self).__name__
        if self._trainer_ref is None:  # a guard rebuilt by restore_callback_states_from_checkpoint
            self._attach(args)
        trainer = self.trainer or find_trainer()
        stored = stored_record({"stateful_callbacks": state.stateful_callbacks}, name)
        current = _CURRENT.get(trainer) if trainer is not None else None
        if current is None and trainer is not None:
            # train() was not wrapped (a Trainer subclass calling the inner loop itself): compute it here.
            current = on_main_then_share(self._current_record, trainer, _steps_per_epoch(trainer))
        if current is not None:
            self.run_identity = current
        # transformers' KeyError bug: a stateful callback new to a resumed run has no entry in the loaded state.
        records: Any = state.stateful_callbacks  # a dict at runtime, whatever its annotation says
        records.setdefault(name, self.state())
        if state.global_step <= 0 or current is None:
            return control
        error: TrainGuardError | None = None
        try:
            check_resume_identity(
                stored,
                current,
                checkpoint=str(_trainer_compat.checkpoint_layout(self.trainer, args).folder_for(state.global_step)),
                global_step=int(state.global_step),
                max_steps=int(args.max_steps),
                num_train_epochs=args.num_train_epochs,
                refuse_empty_resume=self.refuse_empty_resume,
                check_eval=self.check_eval,
                check_tokenizer=self.check_tokenizer,
            )
        except (DatasetMismatchError, TokenizerMismatchError) as err:
            error = err
        if error is not None:
            self._summary = f"refused the resume: {error.what}"
        self.refuse_together(
            error,
            placeholder=lambda: DatasetMismatchError(
                "another rank refused this resume", where={"rank": distributed.rank()}
            ),
            alert_level=None,
        )
        return control

    def key_figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        identity = self.run_identity or {}
        train = identity.get("train")
        if isinstance(train, dict):
            if train.get("fingerprint"):
                out["train_fingerprint"] = str(train["fingerprint"])
            if isinstance(train.get("num_rows"), int):
                out["train_rows"] = train["num_rows"]
        if isinstance(identity.get("global_batch"), int):
            out["global_batch"] = identity["global_batch"]
        return {**out, **super().key_figures()}

    def summary(self) -> str:
        return self._summary
