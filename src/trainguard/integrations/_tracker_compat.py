"""The seam with tracker internals (W&B, MLflow): the only module that reads a private name of a tracker object.

Neither tracker publishes what reporting needs: whether ``wandb.run`` has finished (a finished run must not be
written to), and whether transformers' ``MLflowCallback`` started a run in this process (so the run it ended can be
found again). A release that renames the private name turns the feature off after one log line naming it
(:func:`trainguard._util.private_missing`), never a crash.

Example::

    from types import SimpleNamespace
    from trainguard.integrations._tracker_compat import wandb_run_finished
    run = SimpleNamespace(_is_finished=True)   # stands in for wandb.run
    wandb_run_finished(run)        # True once the run has finished
"""

from __future__ import annotations

from typing import Any

from .._util import private_missing

__all__ = ["mlflow_callback_started", "wandb_run_finished"]


def wandb_run_finished(run: Any) -> bool:
    """Whether W&B's ``run`` has finished (``Run._is_finished``). Unknown (this wandb has no such attribute, said
    once in the log) reads as not finished, as before the check existed."""
    if not hasattr(run, "_is_finished"):
        if type(run).__module__.startswith("wandb"):
            private_missing("wandb Run._is_finished", "skipping W&B reports to a finished run")
        return False
    return bool(run._is_finished)


def mlflow_callback_started(callback: Any) -> bool:
    """Whether ``callback`` is transformers' ``MLflowCallback`` (or a subclass) and has started its run
    (``MLflowCallback._initialized``); False when this transformers has no such attribute (said once in the log)."""
    if not any(c.__name__ == "MLflowCallback" for c in type(callback).__mro__):
        return False
    if not hasattr(callback, "_initialized"):
        private_missing("transformers MLflowCallback._initialized", "finding the MLflow run the Trainer ended")
        return False
    return bool(callback._initialized)
