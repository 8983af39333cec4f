"""Alerts: one small record, and the sinks every guard sends it to.

An :class:`Alert` says which guard saw what, at which step, on which rank, with the evidence and the UTC time.
An :class:`Alerter` hands it to each of its sinks; a sink that fails is reported once on the ``trainguard``
logger and never breaks training.

Sinks:

- :class:`LoggerSink`: the ``trainguard`` logger (the default everywhere).
- :class:`TrainerLogSink`: opt-in only, ``trainguard/<guard>/<level>`` counters through ``trainer.log`` (into
  ``state.log_history`` and every callback's ``on_log``). The default counters go to W&B, MLflow and TensorBoard
  through their own APIs instead (:class:`trainguard.integrations.reporting.TrackerCounterSink`), so a guarded
  run's ``log_history``, ``on_log`` events and console stay exactly the plain run's.
- :class:`JsonlSink`: one JSON object a line in ``output_dir/trainguard-events.jsonl``.
- :class:`WebhookSink`: a JSON POST to a URL (Slack-compatible ``text`` field included), sent from a background
  thread so a slow endpoint never stalls a step.

Guards attached to a Trainer use the logger and the JSONL file by default, plus a webhook when ``webhook_url=`` or
the ``TRAINGUARD_WEBHOOK_URL`` environment variable is set (and the trackers' sinks, added by the callbacks).

An :class:`Alert` is redacted when it is made (:mod:`trainguard.redact`: token shapes, secret flags and keys, URL
credentials, the values of secret environment variables), message and evidence alike, so every sink, including one
a user registers, only ever receives redacted text; no guard has to remember.

Example::

    from trainguard.alerts import Alert, Alerter, JsonlSink, LoggerSink
    alerter = Alerter([LoggerSink(), JsonlSink("out/trainguard-events.jsonl")])
    alerter.emit(Alert("nan_guard", "error", "loss is NaN", step=7))
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import urllib.error
import urllib.request
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from . import distributed
from ._util import utc_now
from .atomic import append_line
from .display import printable
from .errors import UnsafeFileError, WebhookConfigError, _jsonable
from .redact import redact_json, redact_text, redact_url

__all__ = [
    "EVENTS_FILE",
    "LEVELS",
    "WEBHOOK_ENV",
    "Alert",
    "AlertSink",
    "Alerter",
    "CounterSink",
    "JsonlSink",
    "LoggerSink",
    "TrainerLogSink",
    "WebhookConfigError",
    "WebhookRedirectError",
    "WebhookSink",
    "check_webhook_url",
    "get_logger",
]

LEVELS = ("info", "warning", "error", "critical")
EVENTS_FILE = "trainguard-events.jsonl"
WEBHOOK_ENV = "TRAINGUARD_WEBHOOK_URL"

_LOG_LEVELS = {
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def get_logger() -> logging.Logger:
    """The ``trainguard`` logger. It propagates to the root logger; configure it like any other."""
    return logging.getLogger("trainguard")


def _utc_now() -> str:
    return utc_now("milliseconds")


@dataclass(frozen=True)
class Alert:
    """What a guard saw.

    The one choke point for secrets on every alert path: ``message`` and ``evidence`` are redacted here
    (:func:`trainguard.redact.redact_text` / :func:`~trainguard.redact.redact_json`), before any sink can see
    them; ``evidence`` is kept as a JSON-ready copy (paths and other objects as strings), so the caller's dict and
    what the sinks get can never differ.

    Args:
        guard: The guard's name, ``snake_case`` (``"nan_guard"``).
        level: One of ``"info"``, ``"warning"``, ``"error"``, ``"critical"``.
        message: One or two sentences a person can act on.
        step: The optimizer step (``state.global_step``), when there is one.
        rank: The global rank that saw it; defaults to this process's rank.
        evidence: JSON-able facts behind the alert (values, paths, fingerprints).
        time: UTC time in ISO 8601; defaults to now.
        raised: The guard raises this alert's finding as its error next (a refusal): the error is what the user
            reads, so the logger keeps the alert at DEBUG and the console says it once; every other sink (events
            file, webhook, trackers) gets it as usual.

    Example::

        Alert("graceful_stop", "warning", "training raised RuntimeError: Bearer hf_abc...").message
        # 'training raised RuntimeError: Bearer ***'
    """

    guard: str
    level: str
    message: str
    step: int | None = None
    rank: int = field(default_factory=distributed.rank)
    evidence: Mapping[str, Any] = field(default_factory=dict)
    time: str = field(default_factory=_utc_now)
    raised: bool = False

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"Alert level must be one of {LEVELS}, not {self.level!r}")
        # frozen: set through object.__setattr__, once, before anyone holds the alert
        object.__setattr__(self, "message", redact_text(str(self.message)))
        object.__setattr__(self, "evidence", redact_json(_jsonable(dict(self.evidence or {}))))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with every field."""
        return {
            "time": self.time,
            "guard": self.guard,
            "level": self.level,
            "step": self.step,
            "rank": self.rank,
            "message": self.message,
            "evidence": _jsonable(dict(self.evidence)),
        }

    def format(self) -> str:
        """One printable line for logs and terminals: ``[nan_guard] error at step 7 on rank 1: loss is NaN``.

        A control character or newline in the message (a file name it quotes) is shown escaped
        (:func:`~trainguard.display.printable`); :meth:`to_dict` (the JSONL events file, webhooks) keeps it exact."""
        where = []
        if self.step is not None:
            where.append(f"step {self.step}")
        where.append(f"rank {self.rank}")
        return printable(f"[{self.guard}] {self.level} at {' on '.join(where)}: {self.message}")


@runtime_checkable
class AlertSink(Protocol):
    """Anything with ``send(alert)``; ``close(timeout)`` is optional. ``send`` only ever receives a redacted
    :class:`Alert` (it is redacted when made), so a sink needs no redaction of its own."""

    def send(self, alert: Alert) -> None: ...


def _level_index(level: str) -> int:
    return LEVELS.index(level)


class LoggerSink:
    """Logs every alert on the ``trainguard`` logger at the matching level; an alert the guard also raises
    (``Alert.raised``) at DEBUG, because the error that follows says the same, with where and what next."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or get_logger()

    def send(self, alert: Alert) -> None:
        self.logger.log(logging.DEBUG if alert.raised else _LOG_LEVELS[alert.level], alert.format())


class JsonlSink:
    """Appends each alert as one JSON line to ``path`` (created with its folder when missing).

    Each line is one ``O_APPEND`` write, so several ranks can share the file on a local filesystem. A FIFO, device,
    socket or symbolic link at ``path`` is never written to or through (it would block the training thread, or
    write outside ``output_dir``): the sink warns once on the ``trainguard`` logger, naming the path and what it
    is, and skips itself for the rest of the run (:attr:`skipped` says why); the other sinks go on.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        #: Why this sink stopped writing (the path is not a regular file), or None while it writes.
        self.skipped: str | None = None

    def send(self, alert: Alert) -> None:
        if self.skipped is not None:
            return
        line = json.dumps(alert.to_dict(), ensure_ascii=False, allow_nan=False)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_line(self.path, line)
        except UnsafeFileError as exc:
            self.skipped = exc.what
            get_logger().warning(
                "trainguard events file skipped: %s. Alerts still go to the other sinks; %s",
                exc.what,
                exc.next_step,
            )


class CounterSink:
    """Counts alerts per guard and level and hands the counters to :meth:`deliver` on the thread that bound the
    trainer: ``trainguard/<guard>/<level>`` (that guard's alerts of that level so far) and ``trainguard/alerts``
    (all alerts so far), as floats. Subclasses say where the counters go.

    Alerts sent from another thread (a hashing worker, a watchdog) are held and delivered at the next alert or
    :meth:`flush` on the bound thread, so a subclass never has to be thread-safe.

    Example::

        class PrintCounters(CounterSink):
            def deliver(self, trainer, counters):
                print(trainer.state.global_step, counters)
    """

    def __init__(self, trainer: Any = None) -> None:
        self._trainer: weakref.ReferenceType[Any] | None = None
        self._thread: int | None = None
        self._counts: Counter[str] = Counter()
        self._pending: list[Alert] = []
        self._lock = threading.Lock()
        self._active = False
        if trainer is not None:
            self.bind(trainer)

    def bind(self, trainer: Any) -> None:
        """Attach to a Trainer; call it from the training thread."""
        self._trainer = weakref.ref(trainer)
        self._thread = threading.get_ident()

    @property
    def trainer(self) -> Any:
        return self._trainer() if self._trainer is not None else None

    def send(self, alert: Alert) -> None:
        if self._trainer is None:
            return  # not attached to a Trainer: there is nowhere to deliver counters
        with self._lock:
            self._pending.append(alert)
        if threading.get_ident() == self._thread:
            self.flush()

    def flush(self) -> None:
        """Deliver held alerts; a no-op off the training thread, without a trainer, or inside a delivery."""
        trainer = self.trainer
        if trainer is None or self._active or threading.get_ident() != self._thread:
            return
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        for alert in pending:
            self._counts[f"trainguard/{alert.guard}/{alert.level}"] += 1
            self._counts["trainguard/alerts"] += 1
        self._active = True
        try:
            self.deliver(trainer, {k: float(v) for k, v in self._counts.items()})
        finally:
            self._active = False

    def deliver(self, trainer: Any, counters: dict[str, float]) -> None:
        """Put ``counters`` somewhere (called on the bound thread). The base class drops them."""


class TrainerLogSink(CounterSink):
    """Opt-in: puts the alert counters into the Trainer's log stream (``trainer.log``).

    **Not a default sink**, because ``trainer.log`` appends to ``state.log_history``, fires an ``on_log`` every
    callback sees and prints to the console: a guarded run would no longer look like the plain one (and an alert at
    the last save would land after the train summary, so ``log_history[-1]["train_loss"]`` would be gone). The
    default counters reach W&B, MLflow and TensorBoard through their own APIs
    (:class:`trainguard.integrations.reporting.TrackerCounterSink`). Pass this sink yourself only if you want the
    counters in ``log_history``: ``NanGuard(alert_sinks=[LoggerSink(), TrainerLogSink()])``.

    The Trainer's scheduled logging is untouched: ``control.should_log``, which ``on_log`` clears, is restored.
    """

    def deliver(self, trainer: Any, counters: dict[str, float]) -> None:
        control = getattr(trainer, "control", None)
        # CallbackHandler.on_log clears should_log; an alert raised before a scheduled log must not cancel it.
        saved = getattr(control, "should_log", None)
        try:
            trainer.log(counters)
        finally:
            new_control = getattr(trainer, "control", None)
            if saved is not None and new_control is not None:
                new_control.should_log = saved


def check_webhook_url(url: str, *, source: str = "webhook_url") -> str:
    """``url`` when it is an ``http://`` or ``https://`` URL with a host; else :class:`WebhookConfigError` naming
    ``source`` and showing the URL redacted."""
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        ok = parts is not None and parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:
        shown = redact_url(url) if isinstance(url, str) else type(url).__name__
        raise WebhookConfigError(
            f"{source} is not an http:// or https:// URL with a host: {shown!r}",
            where={"field": source},
        )
    return url


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(scheme)


class WebhookRedirectError(urllib.error.URLError):
    """A webhook answered with a redirect to another origin (scheme, host or port): not followed, so the request's
    headers (an ``Authorization`` token) never reach a host the user did not name."""


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        try:
            same = _origin(newurl) == _origin(req.full_url)
        except ValueError:
            same = False
        if not same:
            fp.close()
            raise WebhookRedirectError(
                f"HTTP {code} redirect to another host ({redact_url(newurl)}) not followed; "
                "the webhook's headers were not sent there"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class WebhookSink:
    """POSTs each alert at or above ``min_level`` as JSON to ``url`` from a background thread.

    The body is the alert's fields plus ``text`` (the one-line form), so Slack and Mattermost incoming webhooks
    show it as is. A failed POST is logged once on the ``trainguard`` logger; training never waits for the network
    except in :meth:`close`, which waits at most ``timeout`` seconds for queued alerts.

    The URL and headers are credentials: logs show the URL redacted (:func:`trainguard.redact.redact_url`), and a
    redirect to another origin (scheme, host or port) is not followed, so the headers never reach a host the user
    did not name (it counts as a failed POST and is logged).

    Args:
        url: An ``http://`` or ``https://`` endpoint.
        min_level: The lowest level sent (default ``"warning"``: info alerts stay local).
        timeout: Seconds per request.
        headers: Extra HTTP headers (an auth token, for example).

    Raises:
        WebhookConfigError: ``url`` is not an ``http://`` or ``https://`` URL with a host.
    """

    def __init__(
        self,
        url: str,
        *,
        min_level: str = "warning",
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        check_webhook_url(url)
        if min_level not in LEVELS:
            raise ValueError(f"min_level must be one of {LEVELS}, not {min_level!r}")
        self.url = url
        self.min_level = min_level
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **dict(headers or {})}
        self._queue: queue.Queue[Alert | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._warned = False
        self._opener = urllib.request.build_opener(_SameOriginRedirects())
        self.sent = 0
        self.failed = 0

    def send(self, alert: Alert) -> None:
        if _level_index(alert.level) < _level_index(self.min_level):
            return
        self._ensure_worker()
        self._queue.put(alert)

    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="trainguard-webhook", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            alert = self._queue.get()
            try:
                if alert is None:
                    return
                self._post(alert)
            finally:
                self._queue.task_done()

    def _post(self, alert: Alert) -> None:
        body = {**alert.to_dict(), "text": alert.format()}
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode("utf-8"), headers=self.headers, method="POST"
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read()
            self.sent += 1
        except Exception as exc:
            self.failed += 1
            if not self._warned:
                self._warned = True
                get_logger().warning(
                    "trainguard webhook %s failed (%s: %s); alerts still go to the other sinks",
                    redact_url(self.url),
                    type(exc).__name__,
                    redact_text(str(exc)),
                )

    def __repr__(self) -> str:
        return f"WebhookSink({redact_url(self.url)!r}, min_level={self.min_level!r})"

    def close(self, timeout: float = 10.0) -> None:
        """Wait up to ``timeout`` seconds for queued alerts to be sent."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._queue.put(None)
        self._thread.join(timeout)


class Alerter:
    """Sends each alert to every sink; a failing sink is reported once and skipped, never raised.

    Args:
        sinks: The sinks. Defaults to ``[LoggerSink()]``.

    Example::

        alerter = Alerter([LoggerSink(), WebhookSink("http://127.0.0.1:9000/hook")])
        alerter.emit(Alert("hang_watchdog", "critical", "no progress for 600 s", step=10))
    """

    def __init__(self, sinks: Iterable[AlertSink] | None = None) -> None:
        self.sinks: list[AlertSink] = list(sinks) if sinks is not None else [LoggerSink()]
        self._broken: set[int] = set()
        self.history: list[Alert] = []

    def emit(self, alert: Alert) -> Alert:
        """Send ``alert`` to every sink and return it."""
        self.history.append(alert)
        for sink in self.sinks:
            try:
                sink.send(alert)
            except Exception as exc:
                if id(sink) not in self._broken:
                    self._broken.add(id(sink))
                    get_logger().warning(
                        "trainguard alert sink %s failed (%s: %s); training continues, other sinks still get alerts",
                        type(sink).__name__,
                        type(exc).__name__,
                        redact_text(str(exc)),
                    )
        return alert

    def flush(self) -> None:
        """Deliver alerts that sinks hold for the training thread (see :class:`CounterSink`)."""
        for sink in self.sinks:
            flush = getattr(sink, "flush", None)
            if callable(flush):
                try:
                    flush()
                except Exception as exc:
                    get_logger().warning(
                        "trainguard alert sink %s failed to flush: %s", type(sink).__name__, redact_text(str(exc))
                    )

    def close(self, timeout: float = 10.0) -> None:
        """Flush, then let sinks with background work finish (bounded by ``timeout`` per sink)."""
        self.flush()
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if callable(close):
                try:
                    close(timeout)
                except Exception as exc:
                    get_logger().warning(
                        "trainguard alert sink %s failed to close: %s", type(sink).__name__, redact_text(str(exc))
                    )


def default_sinks(
    output_dir: str | os.PathLike[str] | None = None,
    *,
    webhook_url: str | None = None,
) -> list[AlertSink]:
    """The sinks a guard uses by default: logger, JSONL in ``output_dir``, and a webhook when ``webhook_url`` or
    ``TRAINGUARD_WEBHOOK_URL`` is set. Never the Trainer's log stream (see :class:`TrainerLogSink`); the callbacks
    add the trackers' sinks.

    Raises:
        WebhookConfigError: The webhook URL (naming where it came from) is not an http:// or https:// URL.
    """
    sinks: list[AlertSink] = [LoggerSink()]
    if output_dir is not None:
        sinks.append(JsonlSink(Path(output_dir) / EVENTS_FILE))
    url = webhook_url or os.environ.get(WEBHOOK_ENV)
    if url:
        check_webhook_url(url, source="webhook_url" if webhook_url else WEBHOOK_ENV)
        sinks.append(WebhookSink(url))
    return sinks
