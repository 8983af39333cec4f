"""Report trainguard's alerts, stops and key figures to the experiment trackers a run already uses.

Everything goes through each tracker's own API, never through ``trainer.log``: that would append to the user's
``state.log_history``, fire ``on_log`` events the plain Trainer never sends and print to the console (rule 0 of the
design: on a healthy run the guards change nothing a user can see).

- :class:`TrackerCounterSink` and :func:`log_numbers`: numbers (alert counters ``trainguard/<guard>/<level>``,
  ``trainguard/alerts``, numeric key figures) as W&B history (``train/trainguard/...`` with ``train/global_step``,
  the step key ``WandbCallback`` defines), MLflow metrics of the training's run (``trainguard/...``, at the
  Trainer's step) and TensorBoard scalars (``train/trainguard/...``) through ``TensorBoardCallback``'s writer.
- :class:`WandbAlertSink`: each alert of ``warning`` level and above becomes ``run.alert(...)`` on the active W&B
  run (e-mail/Slack as the user set up in W&B), rate-limited per guard and level.
- :func:`report_stop`: when a guard stops the run (a :class:`~trainguard.errors.TrainGuardError` leaves
  ``trainer.train()``), the W&B run is finished with exit code 1 (state *failed*) and the MLflow run is marked
  ``FAILED``, both with the guard's name and message, also when ``MLflowCallback`` had already ended the run as
  ``FINISHED`` (at ``on_train_end``) or MLflow's ``atexit`` handler would (a crash looks like success there).
- :func:`publish_start` / :func:`publish_end`: the guards' key figures (dataset fingerprint, lineage id, step budget
  of the hang watchdog, manifests written, each guard's one-line summary) as W&B config and summary, MLflow tags and
  TensorBoard text, and the numeric ones through :func:`log_numbers`.

Nothing here imports ``wandb`` or ``mlflow``: a tracker is used only when the user's process already imported it
(``sys.modules``) and has a run. Every failure is logged once on the ``trainguard`` logger and never breaks
training. ``TRAINGUARD_REPORTING=0`` turns all of it off.

Example::

    # not run here: starts a W&B run (wandb installed, logged in or WANDB_MODE=offline)
    from trainguard.callbacks.run_reporter import RunReporter
    trainer = Trainer(..., report_to=["wandb"], callbacks=[trainguard.NanGuard(), RunReporter()])
    trainer.train()  # warnings -> W&B alerts; a NaN stop -> run failed, trainguard/stopped_by = nan_guard
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .. import distributed
from .._util import CONTEXT_ATTR
from ..alerts import LEVELS, Alert, CounterSink, get_logger
from ..redact import redact_text
from ._tracker_compat import mlflow_callback_started, wandb_run_finished

__all__ = [
    "REPORTING_ENV",
    "STOP_KEYS",
    "TrackerCounterSink",
    "WandbAlertSink",
    "key_figures",
    "log_numbers",
    "publish_end",
    "publish_start",
    "published_to",
    "report_stop",
    "reporting_enabled",
]

#: ``0``/``false``/``off``/``no`` turns every tracker report of this module off (alerts, stops, key figures).
REPORTING_ENV = "TRAINGUARD_REPORTING"

#: Keys (W&B summary, MLflow tags) that say a guard stopped the run.
STOP_KEYS = ("trainguard/stopped_by", "trainguard/stop_reason", "trainguard/error")

# MLflow's tag values hold 8000 characters (MAX_TAG_VAL_LENGTH); keep clear of it.
_MAX_TEXT = 5000
# W&B alert titles must be shorter than 64 characters.
_MAX_TITLE = 63
_RUNS_ATTR = "_trainguard_tracker_runs"
_PUBLISHED_ATTR = "_trainguard_published_to"

_warned: set[str] = set()
_warned_lock = threading.Lock()


def reporting_enabled() -> bool:
    """False when ``TRAINGUARD_REPORTING`` is ``0``, ``false``, ``off`` or ``no``."""
    return os.environ.get(REPORTING_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def warn_once(what: str, exc: BaseException) -> None:
    """Log once per ``what`` that a report failed and training goes on (the exception's text redacted)."""
    with _warned_lock:
        if what in _warned:
            return
        _warned.add(what)
    get_logger().warning(
        "trainguard could not %s (%s: %s); training continues, the other reports are unaffected",
        what,
        type(exc).__name__,
        redact_text(str(exc)),
    )


def _wandb_run() -> Any:
    """The active W&B run, without importing wandb when the process has not."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    return run if run is not None and not wandb_run_finished(run) else None


def _mlflow() -> Any:
    return sys.modules.get("mlflow")


def _clip(text: str, limit: int = _MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------------------------ W&B alerts
class WandbAlertSink:
    """Sends each alert at or above ``min_level`` to the active W&B run as ``run.alert(...)``.

    Without ``wandb`` imported by the process or without an active run (other ranks, ``report_to`` without W&B) it
    does nothing. A flood is held back: per guard and level at most one alert per ``min_interval`` seconds (the
    next one says how many were held back), and at most ``max_alerts`` in all, then one last alert saying that the
    rest are only in the other sinks (``trainguard-events.jsonl``, the log).

    Args:
        min_level: The lowest level sent (default ``"warning"``).
        min_interval: Seconds between two W&B alerts of the same guard and level; also W&B's own
            ``wait_duration`` for the title.
        max_alerts: Alerts sent to W&B per sink (one per Trainer) at most.
        clock: Monotonic seconds (tests pass their own).

    Raises:
        ValueError: An unknown ``min_level``, or a negative ``min_interval`` or ``max_alerts``.

    Example::

        from trainguard.alerts import Alerter, LoggerSink
        alerter = Alerter([LoggerSink(), WandbAlertSink(min_interval=60)])
        alerter.emit(Alert("nan_guard", "warning", "loss spiked", step=3))  # to W&B only while a run is active
    """

    def __init__(
        self,
        *,
        min_level: str = "warning",
        min_interval: float = 300.0,
        max_alerts: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_level not in LEVELS:
            raise ValueError(f"min_level must be one of {LEVELS}, not {min_level!r}")
        if min_interval < 0 or max_alerts < 0:
            raise ValueError("min_interval and max_alerts must not be negative")
        self.min_level = min_level
        self.min_interval = float(min_interval)
        self.max_alerts = max_alerts
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}
        self._held: Counter[tuple[str, str]] = Counter()
        self._capped = False
        #: Alerts handed to W&B, and alerts held back by the limits.
        self.sent = 0
        self.held_back = 0

    def send(self, alert: Alert) -> None:
        if LEVELS.index(alert.level) < LEVELS.index(self.min_level) or not reporting_enabled():
            return
        run = _wandb_run()
        if run is None:
            return
        key = (alert.guard, alert.level)
        with self._lock:
            now = self._clock()
            if self.sent >= self.max_alerts:
                self.held_back += 1
                if self._capped:
                    return
                self._capped = True
                title, text, level = (
                    "trainguard: alert limit reached",
                    f"{self.max_alerts} trainguard alerts were sent to W&B; later ones are only in the trainguard log "
                    "and output_dir/trainguard-events.jsonl.",
                    "WARN",
                )
            else:
                last = self._last.get(key)
                if last is not None and now - last < self.min_interval:
                    self._held[key] += 1
                    self.held_back += 1
                    return
                self._last[key] = now
                held = self._held.pop(key, 0)
                self.sent += 1
                title = _clip(f"trainguard {alert.guard}: {alert.level}", _MAX_TITLE)
                text = alert.format()
                if alert.evidence:
                    text += "\n" + json.dumps(alert.to_dict()["evidence"], ensure_ascii=False, sort_keys=True)
                if held:
                    text += f"\n({held} more {alert.level} alert(s) of {alert.guard} held back since the last one)"
                level = "WARN" if alert.level == "warning" else "ERROR"
        run.alert(title=title, text=_clip(text), level=level, wait_duration=max(self.min_interval, 1.0))


# ------------------------------------------------------------------------------------------------ key figures
def key_figures(trainer: Any) -> dict[str, Any]:
    """The attached guards' key figures as ``{"trainguard/<guard>/<figure>": str | int | float}`` (read-only): each
    guard's ``key_figures()``, gathered by the Trainer's guard context."""
    gather = getattr(getattr(trainer, CONTEXT_ATTR, None), "key_figures", None)  # the GuardContext, if guards made one
    return dict(gather()) if callable(gather) else {}


def _numeric(figures: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _tensorboard_writer(trainer: Any) -> Any:
    handler = getattr(trainer, "callback_handler", None)
    for cb in getattr(handler, "callbacks", []):
        if any(cls.__name__ == "TensorBoardCallback" for cls in type(cb).__mro__):
            return getattr(cb, "tb_writer", None)
    return None


def _mlflow_run_id(trainer: Any) -> str | None:
    """The MLflow run of this training: recorded at train begin, else the active one, else the one that
    ``MLflowCallback`` on this trainer started and already ended."""
    mlflow = _mlflow()
    if mlflow is None:
        return None
    recorded = getattr(trainer, _RUNS_ATTR, {}).get("mlflow")
    if recorded:
        return str(recorded)
    active = mlflow.active_run()
    if active is not None:
        return str(active.info.run_id)
    handler = getattr(trainer, "callback_handler", None)
    started = any(mlflow_callback_started(cb) for cb in getattr(handler, "callbacks", []))
    last = mlflow.last_active_run() if started else None
    return str(last.info.run_id) if last is not None else None


def _mlflow_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, _clip(str(value)))


def _step(trainer: Any) -> int:
    return int(getattr(getattr(trainer, "state", None), "global_step", 0) or 0)


def log_numbers(trainer: Any, numbers: Mapping[str, float]) -> list[str]:
    """Log ``{"trainguard/...": number}`` at the Trainer's current step to the trackers this training reports to,
    each through its own API, never through ``trainer.log`` (``state.log_history``, ``on_log`` and the console stay
    the plain run's). Returns the trackers reached (``"wandb"``, ``"mlflow"``, ``"tensorboard"``).

    - W&B (an active run): ``run.log`` of ``train/<key>`` with ``train/global_step``, the step metric
      ``WandbCallback`` defines, so the numbers line up with the loss.
    - MLflow (this training's run, also after ``MLflowCallback`` ended it): ``log_metric(<key>, step=global_step)``
      on that run id, so a number after the end never starts a new, empty run.
    - TensorBoard (while ``TensorBoardCallback``'s writer is open: train begin to train end): ``add_scalar`` of
      ``train/<key>`` at the step.

    Main process only (the trackers' runs live there); off with ``TRAINGUARD_REPORTING=0``. A failure is logged once
    and never raised.

    Example::

        log_numbers(trainer, {"trainguard/nan_guard/error": 1.0})  # [] when the run reports nowhere
    """
    if not numbers or not reporting_enabled() or not distributed.is_main_process():
        return []
    step = _step(trainer)
    reached: list[str] = []
    run = _wandb_run()
    if run is not None:
        try:
            run.log({**{f"train/{key}": value for key, value in numbers.items()}, "train/global_step": step})
            reached.append("wandb")
        except Exception as exc:
            warn_once("log trainguard's numbers to W&B", exc)
    try:
        run_id = _mlflow_run_id(trainer)
        if run_id is not None:
            from mlflow.entities import Metric  # mlflow is already imported here (_mlflow_run_id found a run)

            now = int(time.time() * 1000)
            metrics = [Metric(key, float(value), now, step) for key, value in numbers.items()]
            _mlflow().MlflowClient().log_batch(run_id, metrics=metrics)  # one request, not one per key
            reached.append("mlflow")
    except Exception as exc:
        warn_once("log trainguard's numbers to MLflow", exc)
    try:
        writer = _tensorboard_writer(trainer)
        if writer is not None:
            for key, value in numbers.items():
                writer.add_scalar(f"train/{key}", float(value), step)
            writer.flush()
            reached.append("tensorboard")
    except Exception as exc:
        warn_once("log trainguard's numbers to TensorBoard", exc)
    return reached


class TrackerCounterSink(CounterSink):
    """The alert counters (``trainguard/<guard>/<level>``, ``trainguard/alerts``) in W&B, MLflow and TensorBoard,
    through :func:`log_numbers`: beside the loss in every tracker, never in ``state.log_history`` or ``on_log``.

    One per Trainer, in the alerter every guard shares (off with ``TRAINGUARD_REPORTING=0``). Counters of alerts
    from other threads are delivered on the training thread (see :class:`~trainguard.alerts.CounterSink`).

    Example::

        from trainguard import NanGuard
        from trainguard.alerts import LoggerSink
        guard = NanGuard(alert_sinks=[LoggerSink(), TrackerCounterSink(trainer)])  # the default, explicitly
    """

    def deliver(self, trainer: Any, counters: dict[str, float]) -> None:
        log_numbers(trainer, counters)


def publish_start(trainer: Any) -> dict[str, Any]:
    """At ``on_train_begin`` (after the trackers' own): the key figures as W&B config, MLflow tags and TensorBoard
    text, the numeric ones through :func:`log_numbers` (never ``trainer.log``). Returns the figures.

    Every tracker is optional; a failure is logged once and never raised.
    """
    if not reporting_enabled():
        return {}
    figures = key_figures(trainer)
    runs: dict[str, str] = {}
    reached: set[str] = set()
    if distributed.is_main_process():
        run = _wandb_run()
        if run is not None:
            try:
                run.config.update(figures, allow_val_change=True)
                runs["wandb"] = str(run.id)
                reached.add("wandb")
            except Exception as exc:
                warn_once("put trainguard's key figures into the W&B config", exc)
        try:
            run_id = _mlflow_run_id(trainer)
            if run_id is not None:
                runs["mlflow"] = run_id
                _mlflow_tags(run_id, figures)
                reached.add("mlflow")
        except Exception as exc:
            warn_once("put trainguard's key figures into MLflow tags", exc)
        try:
            writer = _tensorboard_writer(trainer)
            if writer is not None:
                step = _step(trainer)
                for key, value in figures.items():
                    writer.add_text(key, str(value), step)
                writer.flush()
                reached.add("tensorboard")
        except Exception as exc:
            warn_once("put trainguard's key figures into TensorBoard", exc)
    setattr(trainer, _RUNS_ATTR, runs)
    reached.update(log_numbers(trainer, _numeric(figures)))  # never raises
    setattr(trainer, _PUBLISHED_ATTR, sorted(reached))
    return figures


def published_to(trainer: Any) -> list[str]:
    """The trackers :func:`publish_start` put this training's key figures into (``"mlflow"``, ``"tensorboard"``,
    ``"wandb"``): empty before it ran, with reporting off, and when the run reports to no tracker."""
    return list(getattr(trainer, _PUBLISHED_ATTR, []))


def publish_end(trainer: Any, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """At the end of training (or when a guard stops it): the final key figures (and ``extra``) into the W&B
    summary and the MLflow run's tags (also after ``MLflowCallback`` ended it). Returns what was published."""
    if not reporting_enabled() or not distributed.is_main_process():
        return {}
    figures = {**key_figures(trainer), **dict(extra or {})}
    run = _wandb_run()
    if run is not None:
        try:
            run.summary.update(figures)
        except Exception as exc:
            warn_once("put trainguard's key figures into the W&B summary", exc)
    try:
        run_id = _mlflow_run_id(trainer)
        if run_id is not None:
            _mlflow_tags(run_id, figures)
    except Exception as exc:
        warn_once("put trainguard's key figures into MLflow tags", exc)
    return figures


# ------------------------------------------------------------------------------------------------ stops
def _stop_cause(trainer: Any, exc: BaseException) -> tuple[str, str]:
    """(guard, message): the guard that raised, from the newest error-level alert on the trainer's shared alerter
    (guards alert when they stop a run), else the error's class; the message is the error's ``what``."""
    guard = getattr(exc, "guard", None)
    if not isinstance(guard, str):
        alerter = getattr(getattr(trainer, CONTEXT_ATTR, None), "alerter", None)  # the GuardContext's, if any
        history: Iterable[Alert] = getattr(alerter, "history", [])
        stops = [a for a in history if a.level in ("error", "critical")]
        guard = stops[-1].guard if stops else type(exc).__name__
    message = str(getattr(exc, "what", None) or exc).strip()
    return guard, message


def report_stop(trainer: Any, exc: BaseException) -> dict[str, str]:
    """Mark this training's W&B and MLflow runs failed because a guard stopped it (``exc`` left ``train()``).

    W&B: summary keys ``trainguard/stopped_by``, ``trainguard/stop_reason``, ``trainguard/error``, then
    ``run.finish(exit_code=1)`` (the run shows as *failed*; a later ``wandb.log`` needs a new ``wandb.init``).
    MLflow: the same keys as tags, then status ``FAILED``: the active run is ended with it, a run that
    ``MLflowCallback`` already ended as ``FINISHED`` is set to it. Returns the stop keys; never raises.
    """
    if not reporting_enabled():
        return {}
    try:
        guard, message = _stop_cause(trainer, exc)
    except Exception as err:
        warn_once("name the guard that stopped the run", err)
        guard, message = type(exc).__name__, str(exc)
    stop = dict(zip(STOP_KEYS, (guard, _clip(message), type(exc).__name__), strict=True))
    try:
        publish_end(trainer, stop)
    except Exception as err:
        warn_once("publish trainguard's final key figures", err)
    run = _wandb_run()
    if run is not None:
        try:
            run.summary.update(stop)
            run.finish(exit_code=1)
        except Exception as err:
            warn_once("mark the W&B run failed", err)
    mlflow = _mlflow()
    if mlflow is not None:
        try:
            run_id = _mlflow_run_id(trainer)
            active = mlflow.active_run()
            if run_id is not None:
                _mlflow_tags(run_id, stop)
                if active is not None and active.info.run_id == run_id:
                    mlflow.end_run(status="FAILED")
                else:
                    mlflow.MlflowClient().set_terminated(run_id, status="FAILED")
        except Exception as err:
            warn_once("mark the MLflow run FAILED", err)
    return stop
