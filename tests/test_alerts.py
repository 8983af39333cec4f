"""Alerts reach every sink; a failing or slow sink never breaks or stalls training."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from trainguard.alerts import (
    EVENTS_FILE,
    Alert,
    Alerter,
    JsonlSink,
    LoggerSink,
    TrainerLogSink,
    WebhookSink,
)
from trainguard.atomic import read_jsonl
from trainguard.callbacks import GuardCallback

from _probes import EventRecorder
from _rig import free_port, run_trainer


class _Hook:
    def __init__(self, delay: float = 0.0, status: int = 200) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.delay = delay
        self.status = status
        self.received = threading.Event()


@pytest.fixture
def webhook() -> Iterator[tuple[str, _Hook]]:
    """A real HTTP server on 127.0.0.1 recording JSON POSTs."""
    hook = _Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            time.sleep(hook.delay)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            hook.bodies.append(json.loads(body))
            hook.headers.append(dict(self.headers))
            self.send_response(hook.status)
            self.end_headers()
            hook.received.set()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", hook
    finally:
        server.shutdown()
        server.server_close()


def test_alert_records_guard_level_step_rank_evidence_and_utc_time():
    alert = Alert("nan_guard", "error", "loss is nan", step=7, rank=1, evidence={"value": "nan"})
    doc = alert.to_dict()
    assert doc["guard"] == "nan_guard" and doc["level"] == "error" and doc["step"] == 7 and doc["rank"] == 1
    assert doc["evidence"] == {"value": "nan"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"])
    assert alert.format() == "[nan_guard] error at step 7 on rank 1: loss is nan"
    with pytest.raises(ValueError, match="level"):
        Alert("g", "fatal", "x")


def test_logger_sink_logs_on_the_trainguard_logger_at_the_alert_level(caplog):
    with caplog.at_level(logging.INFO, logger="trainguard"):
        Alerter([LoggerSink()]).emit(Alert("hang_watchdog", "critical", "no progress", step=10, rank=0))
    [record] = [r for r in caplog.records if r.name == "trainguard"]
    assert record.levelno == logging.CRITICAL
    assert "[hang_watchdog] critical at step 10 on rank 0: no progress" in record.getMessage()


def test_an_alert_naming_a_hostile_file_is_escaped_on_the_terminal_and_exact_in_the_events_file(tmp_path: Path):
    import io

    from trainguard.alerts import get_logger

    terminal = io.StringIO()
    handler = logging.StreamHandler(terminal)  # what a user's logging.basicConfig() puts on stderr
    logger = get_logger()
    logger.addHandler(handler)
    hostile = "checkpoint-9/\x1b]0;pwned\x07ok\r\x1b[2J\nfake line.bin"
    try:
        alerter = Alerter([LoggerSink(), JsonlSink(tmp_path / EVENTS_FILE)])
        alerter.emit(Alert("checkpoint_verifier", "error", f"set aside: {hostile} changed", step=9, rank=0))
        logger.warning("trainguard: set aside %s -> %s (%s)", Path(hostile), "quarantine", "multi\nline reason")
    finally:
        logger.removeHandler(handler)
    shown = terminal.getvalue()
    assert [ch for ch in shown if ch != "\n" and not ch.isprintable()] == [] and shown.count("\n") == 2, shown
    assert "checkpoint-9/\\x1b]0;pwned\\x07ok\\r\\x1b[2J\\nfake line.bin" in shown
    assert "multi\\nline reason" in shown
    [event] = read_jsonl(tmp_path / EVENTS_FILE)
    assert event["message"] == f"set aside: {hostile} changed"  # the events file keeps the exact text


def test_jsonl_sink_appends_one_event_per_line_creating_the_folder(tmp_path: Path):
    path = tmp_path / "not-yet" / EVENTS_FILE
    alerter = Alerter([JsonlSink(path)])
    alerter.emit(Alert("a", "warning", "first", step=1, rank=0))
    alerter.emit(Alert("b", "error", "second", step=2, rank=0))
    events = read_jsonl(path)
    assert [(e["guard"], e["message"], e["step"]) for e in events] == [("a", "first", 1), ("b", "second", 2)]


def test_webhook_posts_alert_json_with_slack_text(webhook):
    url, hook = webhook
    sink = WebhookSink(url, headers={"Authorization": "Bearer t"})
    Alerter([sink]).emit(Alert("nan_guard", "error", "loss is nan", step=7, rank=1))
    sink.close(timeout=10)
    [body] = hook.bodies
    assert body["guard"] == "nan_guard" and body["step"] == 7 and body["rank"] == 1
    assert body["text"] == "[nan_guard] error at step 7 on rank 1: loss is nan"
    assert hook.headers[0]["Authorization"] == "Bearer t"
    assert sink.sent == 1


def test_webhook_skips_alerts_below_its_min_level(webhook):
    url, hook = webhook
    sink = WebhookSink(url)  # default min_level: warning
    Alerter([sink]).emit(Alert("g", "info", "chatty", rank=0))
    sink.close(timeout=5)
    assert hook.bodies == []


def test_slow_webhook_does_not_stall_the_caller(webhook):
    url, hook = webhook
    hook.delay = 1.5
    sink = WebhookSink(url)
    started = time.monotonic()
    Alerter([sink]).emit(Alert("g", "error", "x", rank=0))
    assert time.monotonic() - started < 0.5  # the POST happens on a background thread
    assert hook.received.wait(10)
    sink.close(timeout=10)


def test_unreachable_webhook_warns_once_and_other_sinks_still_get_alerts(tmp_path: Path, caplog):
    dead = f"http://127.0.0.1:{free_port()}/nobody-listens"
    sink = WebhookSink(dead, timeout=2)
    alerter = Alerter([sink, JsonlSink(tmp_path / "e.jsonl")])
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        for i in range(3):
            alerter.emit(Alert("g", "error", f"alert {i}", rank=0))
        sink.close(timeout=10)
    assert sink.failed == 3
    assert len([r for r in caplog.records if "webhook" in r.getMessage()]) == 1
    assert len(read_jsonl(tmp_path / "e.jsonl")) == 3


def test_a_sink_that_raises_is_reported_once_and_never_breaks_the_caller(caplog):
    class Broken:
        def send(self, alert: Alert) -> None:
            raise OSError("disk full")

    received: list[Alert] = []

    class Good:
        def send(self, alert: Alert) -> None:
            received.append(alert)

    alerter = Alerter([Broken(), Good()])
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        alerter.emit(Alert("g", "error", "one", rank=0))
        alerter.emit(Alert("g", "error", "two", rank=0))
    assert [a.message for a in received] == ["one", "two"]
    warnings = [r.getMessage() for r in caplog.records if "Broken" in r.getMessage()]
    assert len(warnings) == 1 and "disk full" in warnings[0] and "training continues" in warnings[0]


class _AlertAtStep(GuardCallback):
    """A minimal guard: one warning at step 2, one from a background thread at step 3."""

    guard_name = "probe_guard"

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == 2:
            self.alert("warning", "something odd", step=2, evidence={"value": 1.5})
        if state.global_step == 3:
            worker = threading.Thread(target=self.alert, args=("error", "from a worker"), kwargs={"step": 3})
            worker.start()
            worker.join()
        self.alerter.flush()
        return control


def _tensorboard_scalars(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every ``train/trainguard/...`` scalar the run's TensorBoard files hold."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [logdir] = {p.parent for p in (output_dir / "runs").rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
        if tag.startswith("train/trainguard/")
    }


def test_guard_alerts_reach_jsonl_logger_and_tracker_counters_but_never_log_history_or_on_log(output_dir: Path, caplog):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'trainguard[tensorboard]')")
    recorder = EventRecorder()
    with caplog.at_level(logging.INFO, logger="trainguard"):
        trainer, _ = run_trainer(output_dir, max_steps=5, callbacks=[recorder, _AlertAtStep()], report_to="tensorboard")
    # the user's log stream is the plain run's: one on_log per step and the train summary, nothing of trainguard
    history = trainer.state.log_history
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4, 5] and "train_loss" in history[-1]
    assert len(history) == 6 and [e for e in recorder.events if e[0] == "on_log"] == [
        ("on_log", step) for step in (1, 2, 3, 4, 5, 5)
    ]
    assert not [key for entry in [*history, *recorder.logs] for key in entry if key.startswith("trainguard")]
    # the counters reached the tracker through its own writer, at the alert's step
    scalars = _tensorboard_scalars(output_dir)
    assert scalars["train/trainguard/alerts"] == [(2, 1.0), (3, 2.0)]
    assert scalars["train/trainguard/probe_guard/warning"][0] == (2, 1.0)
    assert scalars["train/trainguard/probe_guard/error"] == [(3, 1.0)]  # the worker's alert, delivered on-thread
    events = read_jsonl(output_dir / EVENTS_FILE)
    assert [(e["guard"], e["level"], e["step"]) for e in events] == [
        ("probe_guard", "warning", 2),
        ("probe_guard", "error", 3),
    ]
    assert events[0]["evidence"] == {"value": 1.5}
    assert any("[probe_guard] warning at step 2 on rank 0" in r.getMessage() for r in caplog.records)


class _AlertAtLastSave(GuardCallback):
    """A guard that warns in on_save of the last step: after the Trainer's last loss log, before its summary."""

    guard_name = "late_guard"

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == state.max_steps:
            self.alert("warning", "something odd at the last save", step=state.global_step)
        return control


def test_an_alert_at_the_last_save_reaches_the_events_file_and_logger_but_not_log_history(output_dir: Path, caplog):
    recorder = EventRecorder()
    with caplog.at_level(logging.INFO, logger="trainguard"):
        trainer, _ = run_trainer(
            output_dir, max_steps=4, save_strategy="steps", save_steps=2, callbacks=[_AlertAtLastSave(), recorder]
        )
    [event] = read_jsonl(output_dir / EVENTS_FILE)
    assert (event["guard"], event["level"], event["step"]) == ("late_guard", "warning", 4)
    assert any("[late_guard] warning at step 4 on rank 0: something odd" in r.getMessage() for r in caplog.records)
    history = trainer.state.log_history
    assert history[-1]["train_loss"] > 0  # the train summary is still the last entry
    assert [e["step"] for e in history] == [1, 2, 3, 4, 4]
    assert [step for name, step in recorder.events if name == "on_log"] == [1, 2, 3, 4, 4]


def test_a_trainer_log_sink_chosen_explicitly_logs_counters_and_keeps_the_scheduled_logging(output_dir: Path):
    guard = _AlertAtStep(alert_sinks=[TrainerLogSink()])  # opt-in: the counters in log_history, on purpose
    trainer, _ = run_trainer(output_dir, max_steps=5, callbacks=[guard])
    history = trainer.state.log_history
    alert_entries = [e for e in history if "trainguard/alerts" in e]
    assert [e["step"] for e in alert_entries] == [2, 3]
    assert alert_entries[1]["trainguard/probe_guard/error"] == 1.0  # the worker's alert, delivered on-thread
    # an alert raised before a scheduled log does not cancel that log: every step still logs its loss
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4, 5]


def test_trainer_log_sink_without_a_trainer_drops_alerts_quietly():
    sink = TrainerLogSink()
    sink.send(Alert("g", "error", "x", rank=0))
    sink.flush()  # nothing to deliver to, and no error

    class FakeTrainer:
        control = None

        def __init__(self) -> None:
            self.logged: list[dict[str, float]] = []

        def log(self, payload: dict[str, float]) -> None:
            self.logged.append(payload)

    trainer = FakeTrainer()
    sink.bind(trainer)
    sink.flush()
    assert trainer.logged == []  # the alert sent before a trainer was bound was not held back for it
    sink.send(Alert("g", "error", "y", rank=0))
    assert trainer.logged == [{"trainguard/g/error": 1.0, "trainguard/alerts": 1.0}]


class _OtherGuard(GuardCallback):
    guard_name = "other_guard"

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == 4:
            self.alert("warning", "another odd thing", step=4)
        return control


def test_guards_on_one_trainer_share_one_alerter_and_the_reported_count_is_the_runs(output_dir: Path, webhook):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'trainguard[tensorboard]')")
    url, hook = webhook
    first, second, own = _AlertAtStep(), _OtherGuard(), _OtherGuard(webhook_url=url)
    own.guard_name = "own_webhook_guard"
    run_trainer(output_dir, max_steps=5, callbacks=[first, second, own], report_to="tensorboard")
    assert first.alerter is second.alerter  # one event-file writer, one tracker counter, one webhook queue
    scalars = _tensorboard_scalars(output_dir)
    assert scalars["train/trainguard/alerts"][-1] == (4, 4.0)  # every guard's alerts, not one guard's
    assert scalars["train/trainguard/other_guard/warning"][-1] == (4, 1.0)
    events = read_jsonl(output_dir / EVENTS_FILE)
    assert sorted(e["guard"] for e in events) == ["other_guard", "own_webhook_guard", "probe_guard", "probe_guard"]
    assert hook.received.wait(5)
    own.alerter.close()
    assert [b["guard"] for b in hook.bodies] == ["own_webhook_guard"]  # its own webhook gets its own alerts only
    assert first.summary() == "2 alert(s)" and second.summary() == "1 alert(s)"
