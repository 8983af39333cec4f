"""Guard alerts, guard stops and key figures reach W&B, MLflow and TensorBoard, read back from their own files.

Each run is a real child process (a real Trainer with ``report_to=[...]``) so that the trackers' exit handlers run as
they do for users: W&B in offline mode under ``tmp_path``, MLflow with a local file store, TensorBoard event files.
Nothing reaches the network. Each tracker's test skips, naming the package, where it is not installed.
"""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import trainguard

from _probes import EventRecorder
from _rig import make_trainer, run_python

CHILD = r'''
import json, sys
from pathlib import Path

import trainguard
from trainguard.callbacks._base import GuardCallback
from trainguard.callbacks.run_reporter import RunReporter
from trainguard.errors import PreflightError
from transformers import TrainerCallback
from _rig import make_tiny_llama, make_trainer

tracker, out, stop, handling = sys.argv[1:5]
NAN = float("nan")


class LossWatch(GuardCallback):
    """A guard that sees something worth a warning at step 2, twenty times over (a flood)."""

    guard_name = "loss_watch"

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            for i in range(20):
                self.alert("warning", f"loss plateau seen at step 2 ({i})", step=2, evidence={"loss": 1.5})


class StopAfterTrain(GuardCallback):
    """Stops the run from after_train, as PreflightGuard does, once every on_train_end (MLflow's too) has run."""

    guard_name = "disk_watch"

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            self.alert("error", "the disk filled up during the run", step=5)
            control.should_training_stop = True

    def after_train(self, trainer, output):
        raise PreflightError("the disk filled up during the run", where={"step": trainer.state.global_step})


class DeleteTrackerRun(TrainerCallback):
    """Someone deletes the MLflow run while it trains (a cleanup script, the UI): every later write to it fails."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            import mlflow

            mlflow.MlflowClient().delete_run(mlflow.active_run().info.run_id)


model = make_tiny_llama()
if stop.startswith("nan"):
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1
        return output * NAN if module.training and calls[0] == 4 else output

    model.lm_head.register_forward_hook(hook)
dataset_guard = trainguard.DatasetGuard()
guards = [dataset_guard, trainguard.CheckpointVerifier(), trainguard.NanGuard(), trainguard.HangWatchdog(), LossWatch()]
if stop == "after_train":
    guards.append(StopAfterTrain())
if stop == "nan-run-deleted":
    guards.insert(0, DeleteTrackerRun())
reporter = RunReporter()
trainer = make_trainer(out, model=model, callbacks=[*guards, reporter], max_steps=6, report_to=[tracker])
result = {"error": None}
try:
    trainer.train()
except trainguard.TrainGuardError as err:
    result["error"] = type(err).__name__
    if handling == "raise":
        raise
result["fingerprint"] = dataset_guard.run_identity["train"]["fingerprint"]
result["log_history_keys"] = sorted({key for entry in trainer.state.log_history for key in entry})
result["imported"] = sorted(m for m in ("wandb", "mlflow") if m in sys.modules)
result["reporter"] = reporter.summary()
print("RESULT " + json.dumps(result))
'''


def _run(
    tmp_path: Path, tracker: str, stop: str, handling: str, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    script = tmp_path / "train_child.py"
    script.write_text(CHILD)
    proc = run_python(
        str(script), tracker, str(tmp_path / "run"), stop, handling, timeout=300, env={"DO_NOT_TRACK": "true", **env}
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if handling == "catch" or lines:
        assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    else:
        assert "TrainGuardError" in proc.stderr or "Error" in proc.stderr, proc.stderr[-5000:]
    return proc, (json.loads(lines[-1][len("RESULT ") :]) if lines else {})


# ------------------------------------------------------------------------------------------------------- W&B
def _wandb_env(tmp_path: Path) -> dict[str, str]:
    return {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_PROJECT": "trainguard-test",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_X_DISABLE_STATS": "true",
    }


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B transaction log (``run-*.wandb``), parsed with wandb's own protobuf schema.

    The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of chunks, each
    with a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last) holding one serialized ``Record``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk, pos = data[pos : pos + length], pos + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_run_log(tmp_path: Path) -> list[Any]:
    logs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    return list(wandb_records(logs[0]))


def _items(records: list[Any], kind: str) -> dict[str, Any]:
    """Every key set by records of ``kind`` (config, summary, history), last value wins; nested keys joined by /."""
    out: dict[str, Any] = {}
    for record in records:
        if record.WhichOneof("record_type") != kind:
            continue
        body = getattr(record, kind)
        for item in body.item if kind == "history" else body.update:
            out["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return out


def test_wandb_offline_run_holds_the_guard_warning_as_one_alert_and_the_guard_stop_as_a_failed_exit(
    tmp_path: Path,
) -> None:
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'trainguard[wandb]')")
    # The script catches the guard's error and ends normally, as a script that saves notes would: wandb's own
    # exit hook then sees no exception, so only trainguard can say the run failed.
    _proc, result = _run(tmp_path, "wandb", "nan", "catch", _wandb_env(tmp_path))
    assert result["error"] == "NonFiniteError"
    records = _wandb_run_log(tmp_path)

    alerts = [r.alert for r in records if r.WhichOneof("record_type") == "alert"]
    warnings = [a for a in alerts if a.title == "trainguard loss_watch: warning"]
    assert len(warnings) == 1 and warnings[0].level == "WARN"  # 20 warnings in one step: one W&B alert
    assert "loss plateau seen at step 2 (0)" in warnings[0].text and "step 2" in warnings[0].text
    events = (tmp_path / "run" / "trainguard-events.jsonl").read_text().splitlines()
    assert sum('"loss_watch"' in line for line in events) == 20  # the other sinks still got every one
    nan_alerts = [a for a in alerts if a.title.startswith("trainguard nan_guard")]
    assert nan_alerts and nan_alerts[0].level == "ERROR"

    exits = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert [e.exit_code for e in exits] == [1]  # W&B shows the run as failed
    summary = _items(records, "summary")
    assert summary["trainguard/stopped_by"] == "nan_guard"
    assert summary["trainguard/error"] == "NonFiniteError"
    assert "step 4" in summary["trainguard/stop_reason"] or "loss" in summary["trainguard/stop_reason"]

    config = _items(records, "config")
    assert config["trainguard/dataset_guard/train_fingerprint"] == result["fingerprint"]
    assert config["trainguard/checkpoint_verifier/lineage"]
    history = _items(records, "history")
    assert history["train/trainguard/hang_watchdog/step_budget_s"] > 0  # numbers went through W&B's own run.log
    assert history["train/trainguard/loss_watch/warning"] == 20.0
    assert not [k for k in result["log_history_keys"] if k.startswith("trainguard/")]  # not through trainer.log


# ---------------------------------------------------------------------------------------------------- MLflow
def _mlflow_env(tmp_path: Path) -> dict[str, str]:
    return {
        "DISABLE_MLFLOW_INTEGRATION": "FALSE",
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        # MLflow 3 refuses the file store unless asked; a local folder is what these tests need (no sqlalchemy).
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def _mlflow_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    for key, value in _mlflow_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiments = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(experiments))


@pytest.mark.parametrize(
    ("stop", "handling", "guard", "error"),
    [
        # Raised inside train(): the run is still active; MLflow's atexit handler would end it FINISHED.
        ("nan", "raise", "nan_guard", "NonFiniteError"),
        # Raised from after_train: MLflowCallback already ended the run FINISHED at on_train_end.
        ("after_train", "catch", "disk_watch", "PreflightError"),
    ],
    ids=["stop-inside-train-uncaught", "stop-after-train-caught"],
)
def test_mlflow_run_stopped_by_a_guard_is_failed_with_the_guard_and_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str, handling: str, guard: str, error: str
) -> None:
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'trainguard[mlflow]')")
    proc, _result = _run(tmp_path, "mlflow", stop, handling, _mlflow_env(tmp_path))
    assert (proc.returncode != 0) == (handling == "raise")
    runs = _mlflow_runs(tmp_path, monkeypatch)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FAILED"
    tags = run.data.tags
    assert tags["trainguard/stopped_by"] == guard and tags["trainguard/error"] == error
    assert tags["trainguard/stop_reason"]
    assert tags["trainguard/dataset_guard/train_fingerprint"]
    assert float(tags["trainguard/hang_watchdog/step_budget_s"]) > 0
    assert run.data.metrics["trainguard/loss_watch/warning"] == 20.0
    if _result:  # the uncaught stop prints no result
        assert not [k for k in _result["log_history_keys"] if k.startswith("trainguard/")]


# ----------------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_event_files_hold_the_guards_counters_and_key_figures(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'trainguard[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    _proc, result = _run(tmp_path, "tensorboard", "nan", "catch", {"TENSORBOARD_LOGGING_DIR": str(logdir)})
    # trainguard never imports a tracker (mlflow may be there all the same: deepspeed's autotuner imports it)
    assert "wandb" not in result["imported"]

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {"train/trainguard/loss_watch/warning", "train/trainguard/hang_watchdog/step_budget_s"} <= scalars
    assert accumulator.Scalars("train/trainguard/hang_watchdog/step_budget_s")[0].value > 0
    texts = {
        tag: accumulator.Tensors(tag)[0].tensor_proto.string_val[0].decode()
        for tag in accumulator.Tags()["tensors"]
        if tag.startswith("trainguard/")
    }
    assert texts["trainguard/dataset_guard/train_fingerprint/text_summary"] == result["fingerprint"]
    assert "step budget" in texts["trainguard/hang_watchdog/summary/text_summary"]
    assert result["reporter"] == "key figures published to TensorBoard"  # where they went, and only there
    # the scalars came from the TensorBoard callback's own writer, not from trainer.log
    assert not [k for k in result["log_history_keys"] if k.startswith("trainguard/")]


# ---------------------------------------------------------------------------------- the user's log stream untouched
# Keys whose values are wall-clock timings: the same keys in both runs, never the same values.
TIMINGS = {"train_runtime", "train_samples_per_second", "train_steps_per_second"}


def _comparable(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: ("<timing>" if k in TIMINGS else v) for k, v in entry.items()} for entry in history]


def _fresh_then_resume(output_dir: Path, guarded: bool) -> list[tuple[Any, EventRecorder]]:
    """A healthy 4-step run saving every 2 steps, then a new Trainer resuming from checkpoint-2 to step 6."""
    runs = []
    for max_steps, resume in ((4, None), (6, str(output_dir / "checkpoint-2"))):
        recorder = EventRecorder()
        guards = trainguard.all_guards() if guarded else []
        trainer = make_trainer(
            output_dir, callbacks=[*guards, recorder], max_steps=max_steps, save_strategy="steps", save_steps=2
        )
        trainer.train(resume_from_checkpoint=resume)
        runs.append((trainer, recorder))
    return runs


@pytest.fixture(scope="module")
def plain_and_guarded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[Any, EventRecorder]]]:
    base = tmp_path_factory.mktemp("log-stream")
    return {"plain": _fresh_then_resume(base / "plain", False), "guarded": _fresh_then_resume(base / "guarded", True)}


def test_all_guards_leave_log_history_exactly_the_plain_runs_also_after_a_resume(
    plain_and_guarded: dict[str, list[tuple[Any, EventRecorder]]],
) -> None:
    for (plain, _), (guarded, _) in zip(plain_and_guarded["plain"], plain_and_guarded["guarded"], strict=True):
        assert _comparable(guarded.state.log_history) == _comparable(plain.state.log_history)
    resumed = plain_and_guarded["guarded"][1][0]
    assert resumed.state.global_step == 6
    assert resumed.state.log_history[-1]["train_loss"] > 0  # the train summary is still the last entry


def test_a_users_callback_sees_the_same_events_and_logs_with_all_guards_as_without(
    plain_and_guarded: dict[str, list[tuple[Any, EventRecorder]]],
) -> None:
    for (_, plain), (_, guarded) in zip(plain_and_guarded["plain"], plain_and_guarded["guarded"], strict=True):
        assert guarded.events == plain.events
        assert _comparable(guarded.logs) == _comparable(plain.logs)
    assert ("on_log", 0) not in plain_and_guarded["guarded"][0][1].events  # no key-figure log before step 1


# ------------------------------------------------------------------------------------------------ switches
def test_guards_on_a_trainer_send_warnings_to_wandb_unless_reporting_is_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainguard import NanGuard
    from trainguard.integrations.reporting import WandbAlertSink

    from _rig import make_trainer

    def sinks() -> list[str]:
        guard = NanGuard()
        make_trainer(tmp_path / "run", callbacks=[guard])
        return [type(s).__name__ for s in guard.alerter.sinks]

    assert WandbAlertSink.__name__ in sinks()
    monkeypatch.setenv("TRAINGUARD_REPORTING", "0")
    assert WandbAlertSink.__name__ not in sinks()


def test_a_tracker_that_fails_is_reported_once_and_the_guards_error_still_reaches_the_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'trainguard[mlflow]')")
    proc, _result = _run(tmp_path, "mlflow", "nan-run-deleted", "raise", _mlflow_env(tmp_path))
    assert proc.returncode != 0
    raised = [line for line in proc.stderr.splitlines() if line.startswith("trainguard.errors.")]
    assert raised and raised[-1].startswith("trainguard.errors.NonFiniteError: ")  # the guard's error, unchanged
    failures = [line for line in proc.stderr.splitlines() if "trainguard could not mark the MLflow run FAILED" in line]
    assert len(failures) == 1, proc.stderr[-5000:]
    runs = _mlflow_runs(tmp_path, monkeypatch)
    assert all("trainguard/stopped_by" not in run.data.tags for run in runs)


FLOOD = r"""
import wandb
from trainguard.alerts import Alert
from trainguard.integrations.reporting import WandbAlertSink

now = [0.0]
sink = WandbAlertSink(min_interval=300, max_alerts=3, clock=lambda: now[0])
sink.send(Alert("spike_guard", "info", "not for W&B"))
run = wandb.init()
for t in (0, 1, 2):  # one guard, one level, within the interval: one alert, two held back
    now[0] = t
    sink.send(Alert("spike_guard", "warning", f"spike at t={t}"))
now[0] = 400  # the interval has passed: sent, saying how many were held back
sink.send(Alert("spike_guard", "warning", "spike at t=400"))
sink.send(Alert("nan_guard", "error", "loss is NaN"))  # the third and last
for _ in range(3):
    sink.send(Alert("nan_guard", "critical", "still NaN"))  # over the limit: one notice, then nothing
run.finish()
print("RESULT", sink.sent, sink.held_back)
"""


def test_a_flood_of_alerts_reaches_wandb_as_a_few_with_the_count_held_back(tmp_path: Path) -> None:
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'trainguard[wandb]')")
    proc = run_python(FLOOD, timeout=120, env=_wandb_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-5000:]
    alerts = [r.alert for r in _wandb_run_log(tmp_path) if r.WhichOneof("record_type") == "alert"]
    assert [(a.title, a.level) for a in alerts] == [
        ("trainguard spike_guard: warning", "WARN"),
        ("trainguard spike_guard: warning", "WARN"),
        ("trainguard nan_guard: error", "ERROR"),
        ("trainguard: alert limit reached", "WARN"),
    ]
    assert "spike at t=0" in alerts[0].text and "held back" not in alerts[0].text
    assert "spike at t=400" in alerts[1].text and "2 more warning alert(s) of spike_guard held back" in alerts[1].text
    assert "RESULT 3 5" in proc.stdout
