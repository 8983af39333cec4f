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
    AdapterError,
    CheckpointIncompleteError,
    CheckpointIntegrityError,
    CheckpointNotFoundError,
    ConfigError,
    DatasetMismatchError,
    DataValidationError,
    HangError,
    LineageError,
    LoraConfigMismatchError,
    LossSpikeError,
    MalformedFileError,
    NonFiniteError,
    PreflightError,
    RestoreRefusedError,
    ResumeAttestationError,
    RunLockedError,
    SaveAuditError,
    TokenizerMismatchError,
    TrainGuardError,
    UnsafeFileError,
    WebhookConfigError,
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
    "RunLock": "trainguard.callbacks.run_lock",
    "GracefulStop": "trainguard.callbacks.graceful_stop",
    "CrashLoopGuard": "trainguard.callbacks.crash_loop_guard",
    "acquire_run_lock": "trainguard.checks.run_lock",
    "check_crash_loop": "trainguard.checks.crash_loop",
    "dataset_fingerprint": "trainguard.checks.dataset",
    "start_fresh": "trainguard.checks.fresh_start",
    "continue_on_new_data": "trainguard.recovery",
    "check_lora_config": "trainguard.checks.lora",
    "tokenizer_fingerprint": "trainguard.checks.tokenizer",
    "compare_tokenizers": "trainguard.checks.tokenizer",
    "DatasetGuard": "trainguard.callbacks.dataset_guard",
    "LoraConfigGuard": "trainguard.callbacks.lora_config_guard",
    "AdapterGuard": "trainguard.callbacks.adapter_guard",
    "check_disk_space": "trainguard.checks.preflight",
    "check_memory": "trainguard.checks.preflight",
    "safe_merge": "trainguard.checks.merge",
    "PreflightGuard": "trainguard.callbacks.preflight_guard",
    "validate_data": "trainguard.checks.data",
    "DataReport": "trainguard.checks.data",
    "DataGuard": "trainguard.callbacks.data_guard",
    "CheckpointVerifier": "trainguard.callbacks.checkpoint_verifier",
    "write_manifest": "trainguard.checks.checkpoint",
    "verify_checkpoint": "trainguard.checks.checkpoint",
    "latest_verified_checkpoint": "trainguard.checks.checkpoint",
    "resolve_verified_resume": "trainguard.checks.checkpoint",
    "CheckpointReport": "trainguard.checks.checkpoint",
    "HangWatchdog": "trainguard.callbacks.hang_watchdog",
    "Watchdog": "trainguard.checks.watchdog",
    "NanGuard": "trainguard.callbacks.nan_guard",
    "SpikeGuard": "trainguard.callbacks.spike_guard",
    "RunReporter": "trainguard.callbacks.run_reporter",
}

__all__ = [  # noqa: RUF022 - grouped: errors, then lazily loaded names
    "AdapterError",
    "CheckpointIntegrityError",
    "CheckpointIncompleteError",
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
    "ResumeAttestationError",
    "RestoreRefusedError",
    "RunLockedError",
    "SaveAuditError",
    "TokenizerMismatchError",
    "TrainGuardError",
    "UnsafeFileError",
    "WebhookConfigError",
    "__version__",
    "Alert",
    "Alerter",
    "JsonlSink",
    "LoggerSink",
    "TrainerLogSink",
    "WebhookSink",
    "all_guards",
    "GuardCallback",
    "RunLock",
    "GracefulStop",
    "CrashLoopGuard",
    "acquire_run_lock",
    "check_crash_loop",
    "dataset_fingerprint",
    "start_fresh",
    "continue_on_new_data",
    "check_lora_config",
    "tokenizer_fingerprint",
    "compare_tokenizers",
    "DatasetGuard",
    "LoraConfigGuard",
    "AdapterGuard",
    "check_disk_space",
    "check_memory",
    "safe_merge",
    "PreflightGuard",
    "validate_data",
    "DataReport",
    "DataGuard",
    "CheckpointVerifier",
    "write_manifest",
    "verify_checkpoint",
    "latest_verified_checkpoint",
    "resolve_verified_resume",
    "CheckpointReport",
    "HangWatchdog",
    "Watchdog",
    "NanGuard",
    "SpikeGuard",
    "RunReporter",
]

if TYPE_CHECKING:
    from .alerts import Alert, Alerter, JsonlSink, LoggerSink, TrainerLogSink, WebhookSink
    from .callbacks import all_guards
    from .callbacks._base import GuardCallback
    from .callbacks.adapter_guard import AdapterGuard
    from .callbacks.checkpoint_verifier import CheckpointVerifier
    from .callbacks.crash_loop_guard import CrashLoopGuard
    from .callbacks.data_guard import DataGuard
    from .callbacks.dataset_guard import DatasetGuard
    from .callbacks.graceful_stop import GracefulStop
    from .callbacks.hang_watchdog import HangWatchdog
    from .callbacks.lora_config_guard import LoraConfigGuard
    from .callbacks.nan_guard import NanGuard
    from .callbacks.preflight_guard import PreflightGuard
    from .callbacks.run_lock import RunLock
    from .callbacks.run_reporter import RunReporter
    from .callbacks.spike_guard import SpikeGuard
    from .checks.checkpoint import (
        CheckpointReport,
        latest_verified_checkpoint,
        resolve_verified_resume,
        verify_checkpoint,
        write_manifest,
    )
    from .checks.crash_loop import check_crash_loop
    from .checks.data import DataReport, validate_data
    from .checks.dataset import dataset_fingerprint
    from .checks.fresh_start import start_fresh
    from .checks.lora import check_lora_config
    from .checks.merge import safe_merge
    from .checks.preflight import check_disk_space, check_memory
    from .checks.run_lock import acquire_run_lock
    from .checks.tokenizer import compare_tokenizers, tokenizer_fingerprint
    from .checks.watchdog import Watchdog
    from .recovery import continue_on_new_data


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trainguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
