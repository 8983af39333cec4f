"""``RunReporter``: the guards' key figures in W&B, MLflow and TensorBoard, beside the loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..integrations import reporting
from ._base import GuardCallback

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["RunReporter"]


class RunReporter(GuardCallback):
    """Publish what the attached guards established to the experiment trackers the run already reports to.

    At ``on_train_begin`` (user callbacks run after the Trainer's reporting integrations, so their runs exist by
    then): the dataset fingerprint, the lineage id, the hang watchdog's step budget and each guard's one-line
    summary go into the W&B config, the MLflow run's tags and TensorBoard text; the numeric ones also become
    ``trainguard/<guard>/<figure>`` numbers in W&B history, MLflow metrics and TensorBoard scalars, each through the
    tracker's own API (never ``trainer.log``: ``state.log_history``, ``on_log`` and the console stay the plain run's).
    At ``on_train_end``: the final figures into the W&B summary and the MLflow tags. Put it after the other
    guards so it reads what they found (``all_guards()`` does).

    A guard's stop (failed run in W&B and MLflow) and the W&B alerts do not need this callback: every guard's train
    hook and default sinks do them (see :mod:`trainguard.integrations.reporting`). Trackers are used only when the
    process already imported them and has a run; ``TRAINGUARD_REPORTING=0`` turns all of it off. A failure is
    logged once and never breaks training.

    Example::

        # not run here: starts a W&B run (wandb installed, logged in or WANDB_MODE=offline)
        trainer = Trainer(..., report_to=["wandb"], callbacks=[trainguard.NanGuard(), RunReporter()])
    """

    guard_name = "run_reporter"
    reports_figures = False  # it publishes the others' figures; its own line reads what it published

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        if self.trainer is not None:
            reporting.publish_start(self.trainer)
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        if self.trainer is not None:
            reporting.publish_end(self.trainer)
        return super().on_train_end(args, state, control, **kwargs)

    def summary(self) -> str:
        # Only what happened: with report_to="none" (or TRAINGUARD_REPORTING=0) nothing was published, and a line
        # saying it was would be false; nothing to tell is "".
        reached = reporting.published_to(self.trainer) if self.trainer is not None else []
        names = {"mlflow": "MLflow", "tensorboard": "TensorBoard", "wandb": "W&B"}
        return f"key figures published to {', '.join(names.get(r, r) for r in reached)}" if reached else ""
