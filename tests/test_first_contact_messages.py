"""What a new user meets in the first hour (issue #29 items 3, 5, 6): a refusal said once, with a short traceback;
summary lines that are true and tell something; configuration that is never applied without a word.

The refusals run as users meet them: a fresh Python process whose script calls ``trainer.train()`` (or
``all_guards()``, or ``Trainer(...)``), its stderr read whole.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import pytest

import trainguard
from trainguard.checks.checkpoint import latest_verified_checkpoint
from trainguard.checks.run_lock import lock_status
from trainguard.cli import main
from trainguard.errors import TrainGuardError

from _rig import holding_run_lock, run_python, run_trainer

SAVE = {"save_strategy": "steps", "save_steps": 2}

# The user's script: a tiny guarded run into argv[1], resuming from argv[2] when given ("true" for True).
SCRIPT = """
import sys
import trainguard
from _rig import make_trainer

resume = sys.argv[2] if len(sys.argv) > 2 else None
trainer = make_trainer(sys.argv[1], callbacks=trainguard.all_guards(), max_steps=4, save_strategy="steps", save_steps=2)
trainer.train(resume_from_checkpoint=True if resume == "true" else resume)
print("TRAINED")
"""

_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line \d+, in (?P<func>\S+)$', re.MULTILINE)


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another run's verified checkpoints (steps 2 and 4), as a finished earlier job leaves them."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    run_trainer(out, callbacks=[trainguard.CheckpointVerifier()], max_steps=4, **SAVE)
    return out


@pytest.fixture
def run(earlier_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(earlier_run, copy)
    return copy


def _trainguard_frames(stderr: str) -> list[str]:
    return [f"{m['file']}:{m['func']}" for m in _FRAME.finditer(stderr) if "/trainguard/" in m["file"]]


def _assert_said_once(stderr: str, error: str, what: str) -> None:
    """The refusal reaches the user as one error: its sentence, where and next appear once, and the traceback holds
    at most the one trainguard frame the user called into (the re-raise at the boundary)."""
    assert f"trainguard.errors.{error}: " in stderr, stderr[-3000:]
    assert stderr.count(what) == 1, stderr[-3000:]
    assert stderr.count("  next: ") == 1, stderr[-3000:]
    assert stderr.count("  where: ") == 1, stderr[-3000:]
    assert "{'trainguard/" not in stderr, "no trainguard log row on the console"
    inside = _trainguard_frames(stderr)
    assert len(inside) <= 1, inside
    assert "Traceback" in stderr and len(_FRAME.findall(stderr)) <= 6, stderr[-3000:]


# ------------------------------------------------------------------------------------ item 3: said once
def test_a_fresh_start_into_another_runs_checkpoints_is_refused_once_with_next_and_a_short_traceback(run: Path):
    result = run_python(SCRIPT, str(run), timeout=300)
    assert result.returncode == 1 and "TRAINED" not in result.stdout
    _assert_said_once(result.stderr, "LineageError", "which already holds 2 checkpoint(s) of another run")
    assert "{'trainguard/" not in result.stdout
    [inside] = _trainguard_frames(result.stderr)
    assert inside.endswith("callbacks/_base.py:train")  # the trainer.train() the user called, nothing below it


def test_a_resume_from_a_damaged_checkpoint_is_refused_once_with_next_and_a_short_traceback(run: Path):
    data = bytearray((run / "checkpoint-4" / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (run / "checkpoint-4" / "model.safetensors").write_bytes(bytes(data))
    result = run_python(SCRIPT, str(run), str(run / "checkpoint-4"), timeout=300)
    assert result.returncode == 1 and "TRAINED" not in result.stdout
    _assert_said_once(result.stderr, "CheckpointIntegrityError", "checkpoint-4 failed verification")


def test_a_bad_value_in_trainguard_toml_is_refused_once_naming_file_and_line(tmp_path: Path):
    (tmp_path / "trainguard.toml").write_text("[nan_guard]\npatience = -1\n")
    code = "import os, sys; os.chdir(sys.argv[1]); import trainguard; trainguard.all_guards()"
    result = run_python(code, str(tmp_path))
    assert result.returncode == 1
    _assert_said_once(result.stderr, "ConfigError", "NanGuard refused its configured patience")
    assert result.stderr.count("trainguard.toml") == 1  # in where:, not also repeated in the sentence
    assert "line=2" in result.stderr
    [inside] = _trainguard_frames(result.stderr)
    assert inside.endswith("callbacks/__init__.py:all_guards")


def test_a_locked_output_dir_is_refused_at_trainer_construction_with_one_trainguard_frame(tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    with holding_run_lock(out):
        result = run_python(SCRIPT, str(out), timeout=300)
    assert result.returncode == 1
    _assert_said_once(result.stderr, "RunLockedError", "is in use by another run")
    [inside] = _trainguard_frames(result.stderr)
    assert inside.endswith("callbacks/run_lock.py:on_init_end")


def test_a_refusal_alert_stays_off_the_console_but_reaches_the_events_file(run: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.DEBUG, logger="trainguard"), pytest.raises(TrainGuardError) as info:
        run_trainer(run, callbacks=[trainguard.CheckpointVerifier()], max_steps=4, **SAVE)
    logged = [r for r in caplog.records if "start refused" in r.getMessage()]
    assert [r.levelno for r in logged] == [logging.DEBUG]  # the error says it; the log line stays at DEBUG
    events = [json.loads(line) for line in (run / "trainguard-events.jsonl").read_text().splitlines()]
    assert [e["level"] for e in events if "start refused" in e["message"]] == ["error"]
    # the traceback starts at the train() wrapper; the full one went to the DEBUG log
    tb = info.value.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    assert not any("/trainguard/checks/" in f for f in frames), frames
    assert any(r.exc_info and r.exc_info[1] is info.value for r in caplog.records)


def test_errors_other_than_trainguards_leave_train_with_their_traceback_unchanged(tmp_path: Path):
    class Boom(trainguard.GracefulStop):
        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            raise RuntimeError("the user's own bug")

    with pytest.raises(RuntimeError) as info:
        run_trainer(tmp_path / "run", callbacks=[Boom()], max_steps=2)
    names = []
    tb = info.value.__traceback__
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert names[-1] == "on_step_begin" and "call_event" in names  # every frame down to the raise


def test_at_call_site_keeps_the_cause_of_an_error():
    from trainguard.errors import at_call_site

    try:
        try:
            raise OSError("disk gone")
        except OSError as cause:
            raise trainguard.PreflightError("cannot write", where={"file": "x"}) from cause
    except TrainGuardError as err:
        kept = at_call_site(err)
    assert kept.__traceback__ is None
    assert isinstance(kept.__cause__, OSError)


# ----------------------------------------------------------------------------- item 5: true summaries
@pytest.fixture
def guarded_run(tmp_path: Path):  # type: ignore[no-untyped-def]
    guards = trainguard.all_guards()
    trainer, _ = run_trainer(tmp_path / "run", callbacks=guards, max_steps=4, **SAVE)
    by_name = {g.guard_name: g for g in guards}
    yield trainer, by_name
    by_name["run_lock"].release()


def test_summary_lines_say_only_what_tells_something_and_what_is_true(guarded_run, tmp_path: Path):  # type: ignore[no-untyped-def]
    trainer, guards = guarded_run
    # report_to="none": nothing was published, so no line says it was
    assert guards["run_reporter"].summary() == ""
    assert guards["adapter_guard"].summary() == ""  # not a PEFT model: nothing to tell
    assert "stall" not in guards["hang_watchdog"].summary()
    assert "step(s) measured" in guards["hang_watchdog"].summary()
    # the run lock: true while held, and still true once released
    out = str((tmp_path / "run").resolve())
    assert lock_status(out)["held"] is True
    assert guards["run_lock"].summary() == f"{out} locked against other runs until this process exits"
    guards["run_lock"].release()
    assert lock_status(out)["held"] is False
    assert guards["run_lock"].summary() == f"{out} was locked against other runs; released"
    # a tracker row never carries an empty summary
    from trainguard.integrations.reporting import key_figures

    figures = key_figures(trainer)
    assert "trainguard/adapter_guard/summary" not in figures
    assert figures["trainguard/nan_guard/summary"] == "all values finite"


def test_a_set_aside_checkpoint_is_reported_once_on_resume(run: Path, caplog: pytest.LogCaptureFixture):
    data = bytearray((run / "checkpoint-4" / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (run / "checkpoint-4" / "optimizer.pt").write_bytes(bytes(data))
    verifier = trainguard.CheckpointVerifier()
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        run_trainer(run, callbacks=[verifier], max_steps=6, resume_from_checkpoint=True, **SAVE)
    said = [
        r.getMessage() for r in caplog.records if "checkpoint-4" in r.getMessage() and "set aside" in r.getMessage()
    ]
    assert len(said) == 1, said
    assert "optimizer.pt" in said[0]
    assert "set aside checkpoint-4" in verifier.summary()


def test_a_checkpoint_set_aside_by_the_plain_function_is_still_said_at_warning(
    run: Path, caplog: pytest.LogCaptureFixture
):
    data = bytearray((run / "checkpoint-4" / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (run / "checkpoint-4" / "optimizer.pt").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        assert latest_verified_checkpoint(run, set_aside=True) == run / "checkpoint-2"
    said = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert len(said) == 1 and "checkpoint-4" in said[0] and "optimizer.pt" in said[0]


# -------------------------------------------------------------------------- item 6: configuration said
def test_a_trainguard_toml_that_turns_guards_off_is_said_once_at_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    (tmp_path / "trainguard.toml").write_text(
        'data_guard = false\n\n[run_lock]\nenabled = false\n\n[nan_guard]\naction = "stop"\n'
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRAINGUARD_HANG_TIMEOUT", "600")
    with caplog.at_level(logging.INFO, logger="trainguard"):
        guards = trainguard.all_guards()
    names = [g.guard_name for g in guards]
    assert "run_lock" not in names and "data_guard" not in names
    said = [r for r in caplog.records if "applied guard settings" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    message = said[0].getMessage()
    assert f"{tmp_path / 'trainguard.toml'} (turned off run_lock, data_guard; set nan_guard.action)" in message
    assert "the environment (set hang_watchdog.timeout)" in message


def test_settings_overridden_in_code_are_not_reported_as_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    (tmp_path / "trainguard.toml").write_text("run_lock = false\n")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="trainguard"):
        guards = trainguard.all_guards(run_lock={})
    assert "run_lock" in [g.guard_name for g in guards]
    assert not [r for r in caplog.records if "applied guard settings" in r.getMessage()]


def _rows(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_validate_data_refuses_max_length_on_text_rows_without_a_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    rng = random.Random(0)
    text = _rows(tmp_path / "text.jsonl", [{"text": f"row {rng.random()} with several words"} for _ in range(8)])
    assert main(["validate-data", str(text), "--max-length", "4"]) == 2
    err = capsys.readouterr().err
    assert "--max-length 4 needs --tokenizer" in err and "text rows" in err
    assert main(["validate-data", str(text), "--max-length", "4", "--json"]) == 2
    assert "--tokenizer" in json.loads(capsys.readouterr().out)["what"]
    assert main(["validate-data", str(text)]) == 0  # without the limit, the check runs as before


def test_validate_data_applies_max_length_to_token_ids_without_a_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    ids = [{"input_ids": list(range(i, i + 8)), "labels": list(range(i, i + 8))} for i in range(8)]
    tokenized = _rows(tmp_path / "tok.jsonl", ids)
    assert main(["validate-data", str(tokenized), "--max-length", "4", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["stats"]["tokens"]["over_max_length"] == 8
