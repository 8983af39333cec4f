"""Secrets never leave the process: not in the lock's holder record, its error, ``trainguard inspect``, crash
records, nor a webhook's failure log, error or redirect."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

import trainguard
from trainguard.alerts import EVENTS_FILE, WEBHOOK_ENV, Alert, Alerter, WebhookConfigError, WebhookSink, default_sinks
from trainguard.callbacks import GuardCallback
from trainguard.checks import crash_loop as cl
from trainguard.checks import run_lock as rl
from trainguard.redact import (
    MARK,
    redact_argv,
    redact_command,
    redact_json,
    redact_text,
    redact_url,
    secret_env_values,
)

from _rig import free_port, holding_run_lock, make_trainer, run_python

HF = "hf_" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb"
OPENAI = "sk-proj-" + "a1B2c3D4e5F6g7H8i9J0"
GITHUB = "ghp_" + "0123456789abcdefABCDEFghij"
SLACK = "xoxb-" + "123456789012-abcdefABCDEF"
AWS = "AKIA" + "ABCDEFGHIJKLMNOP"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlLXNpZw"
SECRETS = (HF, OPENAI, GITHUB, SLACK, AWS, JWT, "hunter2pass", "wandb0secret", "envsecret9")

SECRET_ARGS = (
    "--hub_token",
    HF,
    "--password=hunter2pass",
    "--wandb_api_key",
    "wandb0secret",
    "WANDB_API_KEY=envsecret9",
    "--report_to",
    f"https://user:{OPENAI}@example.com/hook?sig={GITHUB}",
    "--max_new_tokens",
    "64",
)

INSPECT = "import sys\nfrom trainguard.cli import main\nraise SystemExit(main(sys.argv[1:]))\n"


def _assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret} leaked"


# ------------------------------------------------------------------------------------------------ redact
def test_redact_argv_hides_values_of_secret_flags_env_style_args_and_token_shaped_words():
    argv = [
        "train.py",
        "--hub_token",
        HF,
        "--api-key=abc123",
        "--apiKey",
        "camel",
        "--token",
        "--next_flag",  # a flag right after a secret flag is not its value
        "HF_TOKEN=xyz",
        "trainer.hub_token=nested",
        "--model",
        OPENAI,
        GITHUB,
        SLACK,
        AWS,
        JWT,
        "--max_new_tokens",
        "64",
        "--tokenizer_name",
        "gpt2",
        "--lr",
        "-1e-4",
    ]
    assert redact_argv(argv) == [
        "train.py",
        "--hub_token",
        MARK,
        f"--api-key={MARK}",
        "--apiKey",
        MARK,
        "--token",
        "--next_flag",
        f"HF_TOKEN={MARK}",
        f"trainer.hub_token={MARK}",
        "--model",
        MARK,
        MARK,
        MARK,
        MARK,
        MARK,
        "--max_new_tokens",
        "64",
        "--tokenizer_name",
        "gpt2",
        "--lr",
        "-1e-4",
    ]


def test_redact_url_keeps_scheme_host_port_and_path_but_not_user_info_query_values_or_key_like_segments():
    assert redact_url("https://bob:pw@hooks.example.com:8443/hook?token=abc&channel=x#frag") == (
        f"https://{MARK}@hooks.example.com:8443/hook?token={MARK}&channel={MARK}#{MARK}"
    )
    slack = "https://hooks.slack.com/services/T0ABC/B0DEF/Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2"
    assert redact_url(slack) == f"https://hooks.slack.com/services/T0ABC/B0DEF/{MARK}"
    assert redact_url("http://127.0.0.1:9000/hook") == "http://127.0.0.1:9000/hook"


def test_redact_text_hides_urls_credentials_and_token_shaped_words_in_free_text_and_keeps_the_rest():
    text = (
        f"401 Client Error for url: https://huggingface.co/api/x?token=abc (Authorization: Bearer {HF}); "
        f'api_key={OPENAI} "password": "hunter2pass" KeyError: \'labels\' --hub_token {GITHUB}'
    )
    out = redact_text(text)
    _assert_no_secret(out)
    assert "abc" not in out.split("token=")[1][:5]
    assert "https://huggingface.co/api/x" in out and "KeyError: 'labels'" in out and "--hub_token ***" in out
    assert redact_text(out) == out  # idempotent
    assert redact_command(f"python train.py --hub_token {HF} --lr 1") == "python train.py --hub_token '***' --lr 1"


# ------------------------------------------------------------------------------------------- the run lock
@pytest.fixture
def secret_holder(output_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """Another live process holding the run lock, started with credentials on its command line."""
    with holding_run_lock(output_dir, *SECRET_ARGS) as proc:
        yield proc


def test_a_hub_token_on_the_holders_command_line_never_reaches_the_record_the_error_or_inspect(
    output_dir: Path, secret_holder: Any
):
    record_file = output_dir / rl.INFO_NAME
    raw = record_file.read_text()
    _assert_no_secret(raw)
    assert "--hub_token ***" in json.loads(raw)["command"]  # the flag stays: the command is still recognisable
    assert stat.S_IMODE(record_file.stat().st_mode) & 0o077 == 0  # not group- or world-readable

    with pytest.raises(trainguard.RunLockedError) as info:
        rl.acquire_run_lock(output_dir)
    _assert_no_secret(str(info.value))
    _assert_no_secret(json.dumps(info.value.to_dict()))
    assert f"PID {secret_holder.pid}" in str(info.value) and "--hub_token ***" in str(info.value)

    text = run_python(INSPECT, "inspect", str(output_dir), "--no-verify", timeout=120)
    as_json = run_python(INSPECT, "inspect", str(output_dir), "--no-verify", "--json", timeout=120)
    assert text.returncode == 0 and as_json.returncode == 0
    _assert_no_secret(text.stdout + text.stderr + as_json.stdout + as_json.stderr)
    assert f"HELD by PID {secret_holder.pid}" in text.stdout and "--hub_token ***" in text.stdout


def test_an_older_holder_record_holding_a_token_is_redacted_when_read_and_shown(tmp_path: Path):
    (tmp_path / rl.LOCK_NAME).write_text("")
    command = f"python train.py --hub_token {HF} --password hunter2pass --report_to https://x.io/?k={GITHUB}"
    (tmp_path / rl.INFO_NAME).write_text(
        json.dumps({"pid": 12345, "host": "n1", "started_utc": "2026-01-01T00:00:00Z", "command": command})
    )
    holder = rl.read_holder(tmp_path / rl.INFO_NAME)
    assert holder is not None and holder["pid"] == 12345
    _assert_no_secret(json.dumps(holder))
    result = run_python(INSPECT, "inspect", str(tmp_path), "--no-verify", timeout=120)
    assert result.returncode == 0 and "last held by PID 12345 on n1" in result.stdout
    _assert_no_secret(result.stdout)


# ----------------------------------------------------------------------------------------- crash records
def test_an_exception_carrying_a_token_is_recorded_redacted_in_a_private_crash_log(tmp_path: Path):
    exc = RuntimeError(f"401 Unauthorized for https://huggingface.co/api/models?token={HF}: Bearer {GITHUB}")
    cl.record_start(tmp_path, run_id="r1", step=0, extra={"hub_token": HF})
    cl.record_failure(tmp_path, run_id="r1", step=3, exc=exc)
    log = tmp_path / cl.CRASH_LOG
    _assert_no_secret(log.read_text())
    assert "https://huggingface.co/api/models" in log.read_text()
    assert stat.S_IMODE(log.stat().st_mode) & 0o077 == 0
    # an older log written before redaction is redacted when read and shown
    old = {"event": "failure", "run_id": "r0", "step": 1, "exception": "OSError", "message": f"token={OPENAI}"}
    log.write_text(json.dumps(old) + "\n" + log.read_text())
    [old_run, _] = cl.load_runs(tmp_path)
    _assert_no_secret(json.dumps(old_run.to_dict()))
    result = run_python(INSPECT, "inspect", str(tmp_path), "--no-verify", timeout=120)
    assert result.returncode == 0 and "crash      step 1: OSError: token=***" in result.stdout
    _assert_no_secret(result.stdout)


# ------------------------------------------------------------------------------------------------ webhooks
def test_a_failing_webhook_logs_its_url_redacted(caplog):
    url = f"http://127.0.0.1:{free_port()}/services/T0ABC/B0DEF/Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2?token=wandb0secret"
    sink = WebhookSink(url, timeout=2, headers={"Authorization": f"Bearer {HF}"})
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        Alerter([sink]).emit(Alert("g", "error", "x", rank=0))
        sink.close(timeout=10)
    assert sink.failed == 1
    [message] = [r.getMessage() for r in caplog.records if "webhook" in r.getMessage()]
    assert "http://127.0.0.1:" in message and "/services/T0ABC/B0DEF/***?token=***" in message
    _assert_no_secret(message + repr(sink))


def test_a_webhook_url_without_a_scheme_is_a_trainguard_error_that_shows_it_redacted(output_dir: Path, monkeypatch):
    monkeypatch.setenv(WEBHOOK_ENV, f"hooks.example.com/hook?token={HF}")
    with pytest.raises(WebhookConfigError) as info:
        default_sinks(output_dir)
    err = info.value
    assert isinstance(err, trainguard.TrainGuardError) and isinstance(err, ValueError)
    assert err.where == {"field": WEBHOOK_ENV} and "hooks.example.com/***" in err.what  # the value: host only
    _assert_no_secret(str(err))
    # the same when a real Trainer sets up its guards' alerts: a clear error at construction, no raw ValueError
    with pytest.raises(WebhookConfigError) as info:
        make_trainer(output_dir, callbacks=[trainguard.RunLock()], max_steps=1)
    _assert_no_secret(str(info.value))
    with pytest.raises(WebhookConfigError, match="webhook_url"):
        WebhookSink(f"ftp://user:{OPENAI}@example.com/x")


class _Server:
    """A real HTTP server on 127.0.0.1 that records every request's method and headers (and body, in ``bodies``)."""

    def __init__(self, redirect_to: str | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.bodies: list[bytes] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                server.bodies.append(self.rfile.read(length))
                server.requests.append((self.command, dict(self.headers)))
                if redirect_to is not None and self.path.startswith("/hook"):
                    self.send_response(302)
                    self.send_header("Location", redirect_to)
                else:
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.timeout(60)
def test_a_webhook_redirect_to_another_host_never_receives_the_authorization_header(caplog):
    other = _Server()  # another origin: same address, another port
    hook = _Server(redirect_to=f"http://127.0.0.1:{other.port}/collect?sig=wandb0secret")
    try:
        sink = WebhookSink(f"http://127.0.0.1:{hook.port}/hook", timeout=5, headers={"Authorization": f"Bearer {HF}"})
        with caplog.at_level(logging.WARNING, logger="trainguard"):
            Alerter([sink]).emit(Alert("g", "error", "x", rank=0))
            sink.close(timeout=20)
        [(method, headers)] = hook.requests
        assert method == "POST" and headers["Authorization"] == f"Bearer {HF}"  # the named host gets it
        assert not any("Authorization" in h for _, h in other.requests)
        assert other.requests == []  # not followed at all: the alert would arrive as an empty GET anyway
        assert sink.failed == 1 and sink.sent == 0
        [message] = [r.getMessage() for r in caplog.records if "webhook" in r.getMessage()]
        assert "redirect to another host" in message and f"127.0.0.1:{other.port}/collect?sig=***" in message
        _assert_no_secret(message)
    finally:
        hook.close()
        other.close()


@pytest.mark.timeout(60)
def test_a_same_origin_redirect_is_still_followed():
    same = _Server(redirect_to="/final")  # relative: the same scheme, host and port
    try:
        sink = WebhookSink(f"http://127.0.0.1:{same.port}/hook", timeout=5, headers={"Authorization": "Bearer t"})
        Alerter([sink]).emit(Alert("g", "error", "x", rank=0))
        sink.close(timeout=20)
        assert [m for m, _ in same.requests] == ["POST", "GET"] and sink.sent == 1
    finally:
        same.close()


def test_the_holder_record_is_private_even_under_a_permissive_umask(output_dir: Path):
    code = (
        "import os, sys\n"
        "os.umask(0)\n"
        "from trainguard.checks.run_lock import acquire_run_lock\n"
        "acquire_run_lock(sys.argv[1])\n"
    )
    result = run_python(code, str(output_dir), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert stat.S_IMODE(os.stat(output_dir / rl.INFO_NAME).st_mode) == 0o600


# ------------------------------------------------------------------ one choke point for alerts; environment values
ENV_SECRET = "correcthorsebatterystaple9"  # no prefix, no secret-looking flag: only the environment says it is one
WANDB_KEY = "a1b2c3d4e5f6" + "0718293a4b5c6d7e8f90" + "12345678"  # a W&B API key: 40 hex digits
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"  # AWS's documented example secret access key
GIT_SHA = "c3327cb" + "0" * 33  # a git commit: also 40 hex digits
SLACK_KEY = "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2"
SLACK_HOOK = f"https://hooks.slack.com/services/T0ABC/B0DEF/{SLACK_KEY}"
_HEAD = f"upload failed: Authorization: Bearer {HF} while posting to {SLACK_HOOK} with key {WANDB_KEY}; context "
# The environment secret straddles the 300th character of "RuntimeError: <message>": a guard that cuts the text
# before redacting it would leave a prefix no exact match finds.
ISSUE_ERROR = _HEAD + "." * (290 - len("RuntimeError: ") - len(_HEAD)) + f" {ENV_SECRET}"
RUN_SECRETS = (HF, SLACK_KEY, WANDB_KEY, ENV_SECRET[:8], AWS_SECRET)


def _assert_none_of(secrets: tuple[str, ...], text: str) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret} leaked"


class _UserCallbackBug(TrainerCallback):
    """A user's callback that raises the issue's error at the start of step 3 (after two completed steps)."""

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 2:
            raise RuntimeError(ISSUE_ERROR)


class _WandbRunStandIn:
    """Stands in for the active W&B run: records what ``run.alert(...)`` was given."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []

    def alert(self, **kwargs: Any) -> None:
        self.alerts.append(kwargs)


@pytest.mark.timeout(300)
def test_a_callbacks_exception_carrying_credentials_reaches_no_alert_sink_raw(
    output_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    from trainguard.integrations import reporting

    run = _WandbRunStandIn()
    monkeypatch.setattr(reporting, "_wandb_run", lambda: run)
    monkeypatch.setenv("HF_TOKEN", ENV_SECRET)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    hook = _Server()
    try:
        monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:{hook.port}/hook")
        stop = trainguard.GracefulStop()
        trainer = make_trainer(
            output_dir,
            callbacks=[trainguard.CrashLoopGuard(), stop, _UserCallbackBug()],
            max_steps=6,
            save_strategy="steps",
            save_steps=100,
        )
        with caplog.at_level(logging.INFO, logger="trainguard"), pytest.raises(RuntimeError) as info:
            trainer.train()
        stop.alerter.close(timeout=30)  # the webhook queue: train() raised, so on_train_end never closed it
    finally:
        hook.close()
    assert str(info.value) == ISSUE_ERROR  # the user's own exception propagates unchanged
    assert stop.saved_on_error is not None  # GracefulStop saved and alerted, with the error in its message

    events = [json.loads(line) for line in (output_dir / EVENTS_FILE).read_text().splitlines()]
    [alert] = [e for e in events if e["guard"] == "graceful_stop" and "training raised" in e["message"]]
    assert "Authorization: Bearer ***" in alert["message"] and "https://hooks.slack.com/" in alert["message"]
    _assert_none_of(RUN_SECRETS, json.dumps(events))

    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("trainguard"))
    assert "training raised RuntimeError: upload failed" in logged
    _assert_none_of(RUN_SECRETS, logged)

    bodies = [body.decode("utf-8") for body in hook.bodies]
    assert any("training raised RuntimeError" in body for body in bodies)
    _assert_none_of(RUN_SECRETS, "\n".join(bodies))

    assert any("training raised RuntimeError" in a["text"] for a in run.alerts)
    _assert_none_of(RUN_SECRETS, json.dumps(run.alerts))

    _assert_none_of(RUN_SECRETS, (output_dir / cl.CRASH_LOG).read_text())  # the crash record, as before


def test_a_sink_registered_by_a_user_only_ever_sees_redacted_text(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", ENV_SECRET)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)  # 40 hex digits in free text: hidden as this run's W&B key
    seen: list[str] = []

    class UserSink:
        def send(self, alert: Alert) -> None:
            seen.append("\n".join([alert.message, alert.format(), json.dumps(alert.to_dict()), repr(alert.evidence)]))

    class UserGuard(GuardCallback):
        guard_name = "user_guard"

    evidence = {
        "argv": ["train.py", "--hub_token", HF, "--model", ENV_SECRET],
        "error": RuntimeError(f"401 for {SLACK_HOOK}: Bearer {GITHUB}"),
        "nested": [{"api_key": "plainvalue1", "path": Path(f"/data/{ENV_SECRET}/x")}],
    }
    message = f"sync failed: {ISSUE_ERROR}"
    alerter = Alerter([])
    alerter.sinks.append(UserSink())  # registered after the alerter was made
    alerter.emit(Alert("user_guard", "error", message, evidence=evidence))
    UserGuard(alert_sinks=[UserSink()]).alert("warning", message, step=3, evidence=evidence)
    UserSink().send(Alert("user_guard", "info", message, evidence=evidence))  # even handed to a sink by hand
    assert len(seen) == 3
    for text in seen:
        _assert_none_of((*RUN_SECRETS, GITHUB, "plainvalue1"), text)
        assert "sync failed: upload failed: Authorization: Bearer ***" in text and "--hub_token" in text
    assert evidence["argv"][2] == HF  # the caller's own objects are left as they were: the alert holds a copy


def test_values_of_secret_environment_variables_are_hidden_wherever_they_appear_and_short_switches_are_not(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv("HF_TOKEN", ENV_SECRET)  # set after trainguard was imported: read when redacting
    monkeypatch.setenv("SHORT_TOKEN", ENV_SECRET[:12])  # a prefix of it: the longer value must win
    monkeypatch.setenv("MY_TEAM_API_KEY", "teamkey-plain-1")  # any *_API_KEY, not only well-known names
    monkeypatch.setenv("SLACK_WEBHOOK_URL", "https://hooks.example.com/path/lowercasesecret")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")  # a switch, not a credential
    values = secret_env_values()
    assert values.index(ENV_SECRET) < values.index(ENV_SECRET[:12]) and "1" not in values  # longest first
    text = f"error {ENV_SECRET} (teamkey-plain-1) at https://hooks.example.com/path/lowercasesecret step 1"
    assert redact_text(text) == f"error {MARK} ({MARK}) at https://hooks.example.com/{MARK} step 1"
    assert redact_text(redact_text(text)) == redact_text(text)
    assert redact_argv(["train.py", "--model", ENV_SECRET, f"--note={ENV_SECRET}", "--lr", "1"]) == [
        "train.py",
        "--model",
        MARK,
        f"--note={MARK}",
        "--lr",
        "1",
    ]
    assert redact_json({"message": f"x {ENV_SECRET}", "steps": [1]}) == {"message": f"x {MARK}", "steps": [1]}
    assert ENV_SECRET not in redact_url(f"https://example.com/{ENV_SECRET}/x")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("SHORT_TOKEN")
    assert redact_text(ENV_SECRET) == ENV_SECRET  # only while it is a secret of this environment


def test_a_secret_environment_value_with_no_shape_never_reaches_the_lock_record_or_its_error(
    output_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("HF_TOKEN", ENV_SECRET)  # the holder (a child process) inherits it, as a real job would
    with holding_run_lock(output_dir, "--model_name", ENV_SECRET, f"--note={ENV_SECRET}", "--lr", "1e-4") as holder:
        raw = (output_dir / rl.INFO_NAME).read_text()
        with pytest.raises(trainguard.RunLockedError) as info:
            rl.acquire_run_lock(output_dir)
    assert ENV_SECRET not in raw and ENV_SECRET not in str(info.value)
    command = json.loads(raw)["command"]
    assert "--model_name '***'" in command and "--lr 1e-4" in command
    assert f"PID {holder.pid}" in str(info.value)


def test_a_bare_wandb_key_and_an_aws_secret_on_the_command_line_never_reach_the_lock_record(
    output_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    for name in ("WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)  # by shape alone, not because the environment names them
    argv = (WANDB_KEY, "--aws", AWS_SECRET, f"--wandb={WANDB_KEY}", f"KEY_FOR_WANDB={WANDB_KEY}", "--revision", GIT_SHA)
    with holding_run_lock(output_dir, *argv):
        raw = (output_dir / rl.INFO_NAME).read_text()
    command = json.loads(raw)["command"]
    _assert_none_of((WANDB_KEY, AWS_SECRET), raw)
    assert f"--revision {GIT_SHA}" in command  # a git commit after --revision is kept: the command says what ran
    assert "--aws '***'" in command
    # an older record holding the command as one string is redacted the same way when read
    assert redact_command(f"python t.py {WANDB_KEY} --x {AWS_SECRET}") == "python t.py '***' --x '***'"


def test_tokenizer_special_token_fields_are_not_mistaken_for_credentials():
    # the tokenizer check's evidence and message (an alert is redacted whole): "eos_token" names no secret
    evidence = {"eos_token": {"token": "</s>", "id": 2}, "pad_token_id": 0, "hub_token": "hub-1", "token": "abc"}
    assert redact_json(evidence) == {
        "eos_token": {"token": "</s>", "id": 2},
        "pad_token_id": 0,
        "hub_token": MARK,
        "token": MARK,
    }
    phrase = 'eos_token: checkpoint "</s>" (id 2), this one "<|endoftext|>" (id 0)'
    assert redact_text(phrase) == phrase
    assert Alert("dataset_guard", "error", phrase, evidence=evidence).evidence["eos_token"] == {
        "token": "</s>",
        "id": 2,
    }
