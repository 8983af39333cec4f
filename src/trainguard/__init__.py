"""trainguard: safeguards for Hugging Face ``Trainer`` runs.

Add the guards to the Trainer you already have::

    import trainguard
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=trainguard.all_guards())

``import trainguard`` is cheap: torch and transformers are imported only when a callback or a check that needs
them is first used, so the ``trainguard`` command and the pure validators start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    CheckpointIntegrityError,
    DatasetMismatchError,
    DataValidationError,
    HangError,
    LoraConfigMismatchError,
    NonFiniteError,
    PreflightError,
    RunLockedError,
    TrainGuardError,
)

# Public name -> module that defines it. Resolved on first access (PEP 562), then cached in globals().
_LAZY: dict[str, str] = {
    "Alert": "trainguard.alerts",
    "Alerter": "trainguard.alerts",
    "LoggerSink": "trainguard.alerts",
    "JsonlSink": "trainguard.alerts",
    "TrainerLogSink": "trainguard.alerts",
    "WebhookSink": "trainguard.alerts",
    "all_guards": "trainguard.callbacks",
    "GuardCallback": "trainguard.callbacks._base",
}

__all__ = [  # noqa: RUF022 - grouped: errors, then lazily loaded names
    "CheckpointIntegrityError",
    "DataValidationError",
    "DatasetMismatchError",
    "HangError",
    "LoraConfigMismatchError",
    "NonFiniteError",
    "PreflightError",
    "RunLockedError",
    "TrainGuardError",
    "__version__",
    "Alert",
    "Alerter",
    "JsonlSink",
    "LoggerSink",
    "TrainerLogSink",
    "WebhookSink",
    "all_guards",
    "GuardCallback",
]

if TYPE_CHECKING:
    from .alerts import Alert, Alerter, JsonlSink, LoggerSink, TrainerLogSink, WebhookSink
    from .callbacks import all_guards
    from .callbacks._base import GuardCallback


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trainguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
