"""DatasetGuard: refuse a resume on other data, with another global batch, or after which nothing would train."""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any

from transformers.trainer_callback import ExportableState

from .. import distributed
from ..checks._resume import on_main_then_share, read_trainer_state, resolve_resume_checkpoint
from ..checks.fingerprint import RECORD_SCHEME, check_run_identity, describe_dataset, plan_resume
from ..errors import DatasetMismatchError, TrainGuardError
from ._base import GuardCallback, find_trainer

__all__ = ["DatasetGuard"]

_LOG = logging.getLogger("trainguard")
# The run-identity record computed by before_train, per Trainer. With restore_callback_states_from_checkpoint the
# Trainer replaces the user's guard by a new instance built from the checkpoint's args; that instance finds the
# current record here instead of hashing the data a second time.
_CURRENT: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_CHECK_EVAL = ("warn", "raise", "off")


def _stored_record(trainer_state: dict[str, Any], name: str) -> dict[str, Any] | None:
    callbacks = trainer_state.get("stateful_callbacks") or {}
    entry = callbacks.get(name) if isinstance(callbacks, dict) else None
    if entry is None and name != "DatasetGuard" and isinstance(callbacks, dict):
        entry = callbacks.get("DatasetGuard")
    if isinstance(entry, list):  # several instances of one class: transformers appends (see trainer_internals §4)
        entry = entry[-1] if entry else None
    if not isinstance(entry, dict):
        return None
    record = (entry.get("attributes") or {}).get("run_identity")
    return record if isinstance(record, dict) else None


def _identity(data: Any) -> dict[str, Any]:
    try:
        return describe_dataset(data).to_dict()
    except ValueError as err:
        try:
            rows: int | None = len(data)
        except TypeError:
            rows = None
        return {"fingerprint": None, "num_rows": rows, "kind": type(data).__name__, "unavailable": str(err)}


def _steps_per_epoch(trainer: Any) -> int | None:
    """Optimizer steps per epoch as ``Trainer.set_initial_training_values`` computes them: from the length of the
    (per-rank) train dataloader the Trainer will build, and gradient accumulation."""
    try:
        n = len(trainer.get_train_dataloader())
    except (TypeError, ValueError, NotImplementedError):
        return None
    accumulation = max(int(trainer.args.gradient_accumulation_steps), 1)
    return max(n // accumulation + int(n % accumulation > 0), 1)


class DatasetGuard(GuardCallback, ExportableState):
    """Records the run's identity in every checkpoint, and refuses a resume that would silently go wrong.

    Recorded (inside ``trainer_state.json``, under ``stateful_callbacks["DatasetGuard"]``): the train and eval
    content fingerprints and row counts, steps per epoch, and the global batch (world size × per-device batch ×
    gradient accumulation). On resume, before the Trainer loads anything, it refuses with
    :class:`~trainguard.DatasetMismatchError` when the data differs, the global batch changed, or no step would run,
    and says what plain Trainer would have done and the ways forward (:func:`trainguard.start_fresh`,
    :func:`trainguard.continue_on_new_data`). It checks again at ``on_train_begin``.

    Args:
        train_source: What to fingerprint instead of ``trainer.train_dataset``: the files a streaming dataset reads
            (a path or glob), or any input :func:`trainguard.dataset_fingerprint` accepts.
        eval_source: The same for the eval data.
        check_eval: A changed eval set: ``"warn"`` (default: it does not break a resume, but metrics before and
            after are not comparable), ``"raise"``, or ``"off"``.
        refuse_empty_resume: Refuse a resume after which no step would run (default True: plain Trainer reports
            success having trained nothing).
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
        alert_sinks: Any = None,
        webhook_url: str | None = None,
    ) -> None:
        super().__init__(alert_sinks=alert_sinks, webhook_url=webhook_url)
        if check_eval not in _CHECK_EVAL:
            raise ValueError(f"check_eval must be one of {_CHECK_EVAL}, not {check_eval!r}")
        self.train_source = train_source
        self.eval_source = eval_source
        self.check_eval = check_eval
        self.refuse_empty_resume = bool(refuse_empty_resume)
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
            },
            "attributes": {"run_identity": self.run_identity},
        }

    # ---------------------------------------------------------------------------------------------- the record
    def _current_record(self, trainer: Any, steps_per_epoch: int | None) -> dict[str, Any]:
        args = trainer.args
        train = _identity(self.train_source if self.train_source is not None else trainer.train_dataset)
        eval_data = self.eval_source if self.eval_source is not None else getattr(trainer, "eval_dataset", None)
        evals: dict[str, Any] | None = None
        if self.check_eval != "off" and eval_data is not None:
            if isinstance(eval_data, dict):
                evals = {str(name): _identity(ds) for name, ds in eval_data.items()}
            else:
                evals = {"eval": _identity(eval_data)}
        world = int(args.world_size)
        per_device = int(args.per_device_train_batch_size)
        accumulation = int(args.gradient_accumulation_steps)
        return {
            "scheme": RECORD_SCHEME,
            "train": train,
            "eval": evals,
            "world_size": world,
            "per_device_train_batch_size": per_device,
            "gradient_accumulation_steps": accumulation,
            "global_batch": world * per_device * accumulation,
            "steps_per_epoch": steps_per_epoch,
        }

    def _check(self, trainer: Any, resume_from_checkpoint: Any, steps_per_epoch: int | None) -> dict[str, Any]:
        args = trainer.args
        current = self._current_record(trainer, steps_per_epoch)
        checkpoint = resolve_resume_checkpoint(args.output_dir, resume_from_checkpoint)
        warnings: list[str] = []
        if current["train"].get("fingerprint") is None:
            warnings.append(
                "cannot fingerprint the training data ("
                + str(current["train"].get("unavailable"))
                + "); resumes are checked for batch and step counts only"
            )
        if checkpoint is not None:
            trainer_state = read_trainer_state(checkpoint)
            try:
                global_step = int(trainer_state.get("global_step") or 0)
            except (TypeError, ValueError):
                global_step = 0
            plan = plan_resume(
                global_step, steps_per_epoch, max_steps=int(args.max_steps), num_train_epochs=args.num_train_epochs
            )
            warnings += check_run_identity(
                _stored_record(trainer_state, type(self).__name__),
                current,
                checkpoint=checkpoint,
                plan=plan,
                refuse_empty_resume=self.refuse_empty_resume,
                check_eval=self.check_eval,
            )
        return {"record": current, "warnings": warnings, "checkpoint": str(checkpoint) if checkpoint else None}

    # ------------------------------------------------------------------------------------------------- events
    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> Any:
        steps_per_epoch = _steps_per_epoch(trainer)  # every rank: building the dataloader is the Trainer's own code
        try:
            outcome = on_main_then_share(self._check, trainer, resume_from_checkpoint, steps_per_epoch)
        except DatasetMismatchError as err:
            self._summary = f"refused the resume: {err.what}"
            if distributed.is_main_process():
                self.alert("error", err.what, evidence=err.evidence)
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
        self._summary += f"; resumed from {Path(resumed).name}: same data and batch" if resumed else "; no resume"
        return resume_from_checkpoint

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        name = type(self).__name__
        if self._trainer_ref is None:  # a guard rebuilt by restore_callback_states_from_checkpoint
            self._attach(args)
        trainer = self.trainer or find_trainer()
        stored = _stored_record({"stateful_callbacks": state.stateful_callbacks}, name)
        current = _CURRENT.get(trainer) if trainer is not None else None
        if current is None and trainer is not None:
            # train() was not wrapped (a Trainer subclass calling the inner loop itself): compute it here.
            current = on_main_then_share(self._current_record, trainer, _steps_per_epoch(trainer))
        if current is not None:
            self.run_identity = current
        # transformers' KeyError bug: a stateful callback new to a resumed run has no entry in the loaded state.
        state.stateful_callbacks.setdefault(name, self.state())
        if state.global_step <= 0 or current is None:
            return control
        error: TrainGuardError | None = None
        try:
            plan = plan_resume(
                int(state.global_step),
                current.get("steps_per_epoch"),
                max_steps=int(args.max_steps),
                num_train_epochs=args.num_train_epochs,
            )
            check_run_identity(
                stored,
                current,
                checkpoint=f"{args.output_dir}/checkpoint-{state.global_step}",
                plan=plan,
                refuse_empty_resume=self.refuse_empty_resume,
                check_eval=self.check_eval,
            )
        except DatasetMismatchError as err:
            error = err
        if distributed.any_rank(error is not None):
            if error is None:
                error = DatasetMismatchError("another rank refused this resume", where={"rank": distributed.rank()})
            self._summary = f"refused the resume: {error.what}"
            raise error
        return control

    def summary(self) -> str:
        return self._summary
