"""Configuration without code: TRAINGUARD_* variables, trainguard.toml, precedence, the kill switch, bad values."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import trainguard
from trainguard.config import ConfigError, build_guards, mapping_layer

from _rig import make_lm_dataset, make_tiny_llama, run_trainer


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No TRAINGUARD_* variable from the outer environment, and a working directory without trainguard.toml."""
    import os

    for name in list(os.environ):
        if name.startswith("TRAINGUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def by_key(guards: list[Any]) -> dict[str, Any]:
    return {g.guard_name: g for g in guards}


def nan_action(guards: list[Any]) -> str:
    return by_key(guards)["nan_guard"].action


def test_named_variables_set_the_options_users_change_most(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINGUARD_NAN_ACTION", "Stop")
    monkeypatch.setenv("TRAINGUARD_HANG_TIMEOUT", "120")
    monkeypatch.setenv("TRAINGUARD_HANG_ACTION", "abort")
    monkeypatch.setenv("TRAINGUARD_GUARDS_OFF", "run_lock, data_guard")
    guards = by_key(trainguard.all_guards())
    assert guards["nan_guard"].action == "stop"
    assert guards["hang_watchdog"].watchdog.settings.timeout == 120.0
    assert guards["hang_watchdog"].watchdog.settings.action == "abort"
    assert "run_lock" not in guards and "data_guard" not in guards and "crash_loop_guard" in guards


def test_any_guard_option_has_a_generic_variable_read_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINGUARD_NAN_GUARD__PATIENCE", "2")
    monkeypatch.setenv("TRAINGUARD_NAN_GUARD__CHECK_EVAL", "false")
    monkeypatch.setenv("TRAINGUARD_HANG_WATCHDOG__WARMUP_STEPS", "7")
    monkeypatch.setenv("TRAINGUARD_RUN_LOCK__ENABLED", "false")
    guards = by_key(trainguard.all_guards())
    assert guards["nan_guard"].patience == 2
    assert guards["nan_guard"].check_eval is False
    assert guards["hang_watchdog"].watchdog.settings.warmup_steps == 7
    assert "run_lock" not in guards


def test_trainguard_toml_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / "trainguard.toml").write_text(
        'run_lock = false\n\n[nan_guard]\naction = "warn"\npatience = 1\n\n[data_guard]\nenabled = false\n'
    )
    guards = by_key(trainguard.all_guards())
    assert guards["nan_guard"].action == "warn" and guards["nan_guard"].patience == 1
    assert "run_lock" not in guards and "data_guard" not in guards


def test_trainguard_config_variable_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    elsewhere = tmp_path / "conf" / "guards.toml"
    elsewhere.parent.mkdir()
    elsewhere.write_text('[nan_guard]\naction = "stop"\n')
    (tmp_path / "trainguard.toml").write_text('[nan_guard]\naction = "warn"\n')
    monkeypatch.setenv("TRAINGUARD_CONFIG", str(elsewhere))
    assert nan_action(trainguard.all_guards()) == "stop"


def test_precedence_is_explicit_then_environment_then_file_then_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert nan_action(trainguard.all_guards()) == "raise"  # default
    (tmp_path / "trainguard.toml").write_text('[nan_guard]\naction = "warn"\npatience = 1\n')
    assert nan_action(trainguard.all_guards()) == "warn"  # file over default
    monkeypatch.setenv("TRAINGUARD_NAN_ACTION", "stop")
    guard = by_key(trainguard.all_guards())["nan_guard"]
    assert guard.action == "stop" and guard.patience == 1  # environment over file, per option
    guard = by_key(trainguard.all_guards(nan_guard={"action": "raise"}))["nan_guard"]
    assert guard.action == "raise" and guard.patience == 1  # explicit over environment, per option


def test_a_tool_yaml_layer_sits_between_the_environment_and_trainguard_toml(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from trainguard.callbacks import _GUARDS

    (tmp_path / "trainguard.toml").write_text('[nan_guard]\naction = "warn"\npatience = 3\n')
    yaml_layer = mapping_layer({"nan_guard": {"action": "stop"}}, name="axolotl YAML", table=_GUARDS)
    guard = by_key(build_guards(_GUARDS, {}, tool_layer=yaml_layer))["nan_guard"]
    assert guard.action == "stop" and guard.patience == 3
    monkeypatch.setenv("TRAINGUARD_NAN_ACTION", "raise")
    assert nan_action(build_guards(_GUARDS, {}, tool_layer=yaml_layer)) == "raise"


def test_explicit_settings_turn_a_guard_back_on_that_the_environment_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRAINGUARD_GUARDS_OFF", "nan_guard")
    assert "nan_guard" not in by_key(trainguard.all_guards())
    assert "nan_guard" in by_key(trainguard.all_guards(nan_guard={}))
    monkeypatch.setenv("TRAINGUARD_RUN_LOCK__ENABLED", "1")
    (Path.cwd() / "trainguard.toml").write_text("run_lock = false\n")
    assert "run_lock" in by_key(trainguard.all_guards())  # environment over file for on/off too


def test_kill_switch_returns_no_guards_with_one_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TRAINGUARD_DISABLE", "1")
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        assert trainguard.all_guards() == []
        assert trainguard.all_guards(nan_guard={"action": "stop"}) == []
    lines = [r.getMessage() for r in caplog.records if "disabled" in r.getMessage()]
    assert len(lines) == 2 and "TRAINGUARD_DISABLE" in lines[0]


def test_kill_switch_in_the_file_yields_to_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "trainguard.toml").write_text("disable = true\n")
    assert trainguard.all_guards() == []
    monkeypatch.setenv("TRAINGUARD_DISABLE", "0")
    assert len(trainguard.all_guards()) >= 10


def test_kill_switch_leaves_a_real_trainer_run_unguarded_but_keeps_guards_built_in_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import torch

    monkeypatch.setenv("TRAINGUARD_DISABLE", "1")
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    callbacks = [*trainguard.all_guards(), trainguard.NanGuard(action="stop")]
    assert len(callbacks) == 1  # the kill switch added none; the guard built in code is there
    trainer, _ = run_trainer(tmp_path / "run", model=model, train_dataset=make_lm_dataset(), callbacks=callbacks)
    assert callbacks[0].stopped and trainer.state.global_step <= 1


def test_spike_guard_policy_is_accepted_before_the_guard_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainguard.callbacks import _GUARDS
    from trainguard.config import env_layer

    monkeypatch.setenv("TRAINGUARD_SPIKE_POLICY", "Rollback")
    assert env_layer(_GUARDS).guards["spike_guard"]["policy"][0] == "rollback"
    trainguard.all_guards()  # accepted even where all_guards() has no spike_guard yet
    monkeypatch.setenv("TRAINGUARD_SPIKE_POLICY", "ignore")
    with pytest.raises(ConfigError, match="alert, skip, rollback") as err:
        trainguard.all_guards()
    assert err.value.where == {"variable": "TRAINGUARD_SPIKE_POLICY"}


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("TRAINGUARD_NAN_ACTION", "explode", "raise, stop, warn"),
        ("TRAINGUARD_HANG_TIMEOUT", "soon", "seconds above 0"),
        ("TRAINGUARD_HANG_TIMEOUT", "-5", "seconds above 0"),
        ("TRAINGUARD_DISABLE", "maybe", "yes/no"),
        ("TRAINGUARD_GUARDS_OFF", "nan_gaurd", "not a trainguard guard"),
        ("TRAINGUARD_NAN_GAURD__ACTION", "stop", "not a trainguard guard"),
        ("TRAINGUARD_NAN_GUARD__PATIENCEE", "2", "has no option 'patiencee'"),
        ("TRAINGUARD_CONFIG", "/nonexistent/trainguard.toml", "not a file"),
    ],
)
def test_a_bad_variable_is_refused_naming_it_and_what_to_do(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, said: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=said) as err:
        trainguard.all_guards()
    assert err.value.where["variable"] == name
    assert isinstance(err.value, trainguard.TrainGuardError) and isinstance(err.value, ValueError)
    assert err.value.next_step


def test_a_value_the_guard_refuses_names_its_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINGUARD_NAN_GUARD__PATIENCE", "-1")
    with pytest.raises(ConfigError, match="NanGuard refused") as err:
        trainguard.all_guards()
    assert err.value.where == {"variable": "TRAINGUARD_NAN_GUARD__PATIENCE"}


@pytest.mark.parametrize(
    ("text", "line", "said"),
    [
        ('[nan_guard]\naction = "stop"\npatince = 2\n', 3, "has no option 'patince'"),
        ('[nan_guard]\naction = "stop"\n\n[nan_gaurd]\naction = "stop"\n', 4, "neither a trainguard guard"),
        ("\n[nan_guard]\naction = stop\n", 3, "not valid TOML"),
        ("run_lock = 3\n", 1, "table of options or true/false"),
        ('[nan_guard]\naction = "stop"\npatience = -4\n', None, "NanGuard refused"),
    ],
)
def test_a_bad_file_is_refused_naming_file_line_and_key(tmp_path: Path, text: str, line: int | None, said: str) -> None:
    (tmp_path / "trainguard.toml").write_text(text)
    with pytest.raises(ConfigError, match=said) as err:
        trainguard.all_guards()
    rendered = str(err.value)
    assert "trainguard.toml" in rendered
    if line is not None:
        assert err.value.where["line"] == line


def test_explicit_mistakes_keep_their_python_errors() -> None:
    with pytest.raises(TypeError, match="unknown guard keyword"):
        trainguard.all_guards(nan_gaurd={})
    with pytest.raises(TypeError):
        trainguard.all_guards(nan_guard={"patiencee": 1})


# ------------------------------------------------------------------------------------ numbers (issue #25, item 7)
@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("TRAINGUARD_HANG_TIMEOUT", "1e308", "1e+308"),  # accepted, then OverflowError in faulthandler at step 1
        ("TRAINGUARD_HANG_TIMEOUT", "Infinity", "inf"),
        ("TRAINGUARD_HANG_WATCHDOG__TIMEOUT", "Infinity", "inf"),
        ("TRAINGUARD_HANG_WATCHDOG__SAVE_TIMEOUT", "1e999", "inf"),
        ("TRAINGUARD_HANG_WATCHDOG__FLOOR", "31536001", "31536001"),  # a second over a year
        ("TRAINGUARD_GRACEFUL_STOP__SAVE_ON_ERROR_WAIT", "1e308", "1e+308"),
        ("TRAINGUARD_NAN_GUARD__SPIKE_FACTOR", "Infinity", "inf"),
        ("TRAINGUARD_SPIKE_GUARD__THRESHOLD", "1e300", "1e+300"),
        ("TRAINGUARD_PREFLIGHT_GUARD__DISK_MARGIN", "Infinity", "inf"),
        ("TRAINGUARD_SPIKE_GUARD__LOOKUP_ROWS", "-1", "-1"),
    ],
)
def test_a_number_out_of_its_sane_range_is_refused_naming_variable_value_and_range(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, shown: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        trainguard.all_guards()
    assert err.value.where == {"variable": name}
    assert f"not {shown}" in err.value.what
    assert re.search(r"(from|above) -?[\d,]+ (to|and at most) [\d,]+", err.value.what), err.value.what


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ("[hang_watchdog]\nwarmup_steps = 3\ntimeout = inf\n", 3, "hang_watchdog.timeout"),
        ("[hang_watchdog]\nabort_grace = nan\n", 2, "hang_watchdog.abort_grace"),
        ("[graceful_stop]\nsave_on_error_wait = 1e308\n", 2, "graceful_stop.save_on_error_wait"),
        ("hang_watchdog.eval_timeout = 400000000\n", 1, "hang_watchdog.eval_timeout"),  # a dotted key at the top
    ],
)
def test_a_number_out_of_range_in_the_file_is_refused_naming_file_line_and_key(
    tmp_path: Path, text: str, line: int, field: str
) -> None:
    (tmp_path / "trainguard.toml").write_text(text)
    with pytest.raises(ConfigError) as err:
        trainguard.all_guards()
    assert err.value.where == {"field": field, "file": str(tmp_path / "trainguard.toml"), "line": line}
    assert "31,536,000" in err.value.what


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TRAINGUARD_SPIKE_GUARD__SKIP_BATCHES", "1.5"),  # was truncated to 1, silently
        ("TRAINGUARD_GRACEFUL_STOP__SYNC_EVERY", "2.5"),
        ("TRAINGUARD_NAN_GUARD__PATIENCE", "true"),  # True is not the number 1
        ("TRAINGUARD_SPIKE_GUARD__MAX_ROLLBACKS", "0.5"),
        ("TRAINGUARD_CRASH_LOOP_GUARD__MAX_REPEATS", "true"),
    ],
)
def test_a_count_refuses_a_fraction_or_a_boolean_instead_of_truncating(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="must be a whole number") as err:
        trainguard.all_guards()
    assert err.value.where == {"variable": name}


@pytest.mark.parametrize(
    ("guard", "kwargs"),
    [
        ("HangWatchdog", {"timeout": 1e308}),
        ("HangWatchdog", {"timeout": float("inf")}),
        ("HangWatchdog", {"multiplier": float("inf")}),
        ("HangWatchdog", {"check_interval": 1e308}),
        ("SpikeGuard", {"skip_batches": 1.5}),
        ("SpikeGuard", {"window": 100.5}),
        ("SpikeGuard", {"max_rollbacks": True}),
        ("NanGuard", {"patience": True}),
        ("NanGuard", {"spike_factor": float("inf")}),
        ("NanGuard", {"max_skipped_steps": float("inf")}),  # was a raw OverflowError
        ("GracefulStop", {"save_on_error_wait": float("inf")}),
        ("GracefulStop", {"sync_every": 1.5}),
        ("CrashLoopGuard", {"max_repeats": True}),
        ("AdapterGuard", {"check_step": 2.5}),
        ("DataGuard", {"max_positions": 1.5}),
        ("PreflightGuard", {"disk_margin": float("inf")}),
        ("PreflightGuard", {"min_available_memory": True}),
        ("CheckpointVerifier", {"workers": 0}),
    ],
)
def test_a_guard_built_in_code_refuses_a_number_out_of_range_naming_option_value_and_range(
    guard: str, kwargs: dict[str, Any]
) -> None:
    [(option, value)] = kwargs.items()
    with pytest.raises(ConfigError) as err:
        getattr(trainguard, guard)(**kwargs)
    assert isinstance(err.value, ValueError)  # code that caught ValueError still does
    assert f"({option}=...)" in err.value.what and f"not {value!r}" in err.value.what
    assert err.value.evidence["option"] == option and err.value.evidence["allowed"]


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('[graceful_stop]\nsave_on_error = "false"\n', "true or false"),  # bool("false") was True
        ("[nan_guard]\ncheck_eval = inf\n", "true or false"),
        ("[nan_guard]\nwebhook_url = 5\n", "URL string"),
        ('[nan_guard]\nalert_sinks = ["logger"]\n', "alert_sinks only in code"),
    ],
)
def test_a_switch_or_object_option_refuses_what_a_file_cannot_mean(tmp_path: Path, text: str, said: str) -> None:
    (tmp_path / "trainguard.toml").write_text(text)
    with pytest.raises(ConfigError, match=said) as err:
        trainguard.all_guards()
    assert "trainguard.toml" in str(err.value)


def test_a_hang_budget_of_a_year_is_accepted_and_a_whole_float_count_is_not_truncated() -> None:
    # The bounds are documented ones, not a smaller guess: a year is still a budget, and 2.0 batches is 2.
    assert trainguard.HangWatchdog(timeout=365 * 24 * 3600).watchdog.settings.timeout == 365 * 24 * 3600
    assert trainguard.SpikeGuard(skip_batches=2.0).skip_batches == 2


# ------------------------------------------------------------------------------------------------- the parser
def test_deeply_nested_json_in_a_generic_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINGUARD_GRACEFUL_STOP__SIGNALS", "[" * 20_000 + "]" * 20_000)  # was a RecursionError
    with pytest.raises(ConfigError, match="nested deeper") as err:
        trainguard.all_guards()
    assert err.value.where == {"variable": "TRAINGUARD_GRACEFUL_STOP__SIGNALS"}


def test_a_3000_deep_toml_array_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "trainguard.toml").write_text("[graceful_stop]\nsignals = " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match="deeper than") as err:  # was a RecursionError
        trainguard.all_guards()
    assert err.value.where["file"] == str(tmp_path / "trainguard.toml")


def test_a_toml_that_is_not_utf8_is_a_config_error_naming_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "trainguard.toml").write_bytes(b'[nan_guard]\n\naction = "st\xffop"\n')
    with pytest.raises(ConfigError, match="not UTF-8") as err:  # was a UnicodeDecodeError naming no file
        trainguard.all_guards()
    assert err.value.where == {"file": str(tmp_path / "trainguard.toml"), "line": 3}


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ('[nan_guard]\naction = "stop"\n"patiénce" = 2\n', 3, "nan_guard.patiénce"),
        ('run_lock = false\n"nän_guard" = false\n', 2, "nän_guard"),
        ('["nän_guard"]\naction = "stop"\n', 1, "nän_guard"),
        ("[nan_guard]\n'naïve' = 1\n", 2, "nan_guard.naïve"),
    ],
)
def test_a_non_ascii_key_is_reported_with_its_line(tmp_path: Path, text: str, line: int, field: str) -> None:
    (tmp_path / "trainguard.toml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        trainguard.all_guards()
    assert err.value.where["field"] == field and err.value.where["line"] == line


def _all_guards_within(seconds: float) -> Any:
    """all_guards() on a thread: its result or its exception, failing the test if it has not returned in time."""
    import threading

    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["guards"] = trainguard.all_guards()
        except Exception as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        with contextlib.suppress(OSError):  # unblock a reader stuck on a FIFO, so the thread can end
            os.close(os.open("trainguard.toml", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"all_guards() blocked for more than {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["guards"]


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_fifo_or_folder_at_trainguard_toml_is_refused_by_name_without_blocking(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "trainguard.toml"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with pytest.raises(ConfigError, match="not a regular file") as err:  # was ignored silently
        _all_guards_within(30)
    assert err.value.where == {"file": str(path)}
    monkeypatch.setenv("TRAINGUARD_DISABLE", "1")  # the kill switch never opens it
    assert _all_guards_within(30) == []


def test_a_huge_toml_is_refused_by_its_size(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Valid TOML of 2 MiB (comments): read whole and obeyed before; refused by size now (the bound is 1 MiB).
    padding = "# " + "x" * 97 + "\n"
    (tmp_path / "trainguard.toml").write_text('[nan_guard]\naction = "stop"\n' + padding * (2 * 2**20 // 100))
    with pytest.raises(ConfigError, match="larger than the 1,048,576 bytes") as err:
        trainguard.all_guards()
    assert err.value.where == {"file": str(tmp_path / "trainguard.toml")}
    monkeypatch.setenv("TRAINGUARD_DISABLE", "1")
    assert trainguard.all_guards() == []


def test_trainguard_toml_is_opened_once(tmp_path: Path) -> None:
    # Read twice, a file swapped between the reads gave the settings of one and the line numbers of the other.
    (tmp_path / "trainguard.toml").write_text('[nan_guard]\naction = "stop"\npatince = 2\n')
    script = (
        "import sys, trainguard\n"
        "opens = []\n"
        "sys.addaudithook(lambda event, args: opens.append(args[0]) if event == 'open' and "
        "str(args[0]).endswith('trainguard.toml') else None)\n"
        "try:\n    trainguard.all_guards()\nexcept trainguard.ConfigError as err:\n    print(err.where['line'])\n"
        "print(len(opens))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINGUARD_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(trainguard.__file__).parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "1"]


# ---------------------------------------------------------------------------------------------- the kill switch
@pytest.mark.parametrize(
    ("variables", "toml"),
    [
        ({"TRAINGUARD_NAN_ACTION": "explode"}, None),
        ({"TRAINGUARD_NAN_GAURD__ACTION": "stop"}, None),
        ({"TRAINGUARD_GRACEFUL_STOP__SIGNALS": "[" * 20_000 + "]" * 20_000}, None),
        ({"TRAINGUARD_CONFIG": "/nonexistent/trainguard.toml"}, None),
        ({}, b"[nan_guard\naction = stop\n"),
        ({}, b'[nan_guard]\naction = "\xff"\n'),
        ({}, b"[graceful_stop]\nsignals = " + b"[" * 3000 + b"]" * 3000 + b"\n"),
        ({}, b"[nan_gaurd]\naction = 'stop'\n"),
    ],
    ids=[
        "bad-value",
        "unknown-guard",
        "deep-json",
        "missing-file",
        "toml-syntax",
        "non-utf8",
        "deep-toml",
        "toml-unknown-guard",
    ],
)
def test_kill_switch_wins_over_any_broken_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variables: dict[str, str], toml: bytes | None
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    if toml is not None:
        (tmp_path / "trainguard.toml").write_bytes(toml)
    monkeypatch.setenv("TRAINGUARD_DISABLE", "1")
    assert trainguard.all_guards() == []


def test_disable_in_the_file_wins_over_the_files_other_mistakes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "trainguard.toml").write_text('disable = true\n\n[nan_gaurd]\naction = "stop"\n')
    monkeypatch.setenv("TRAINGUARD_NAN_ACTION", "explode")  # a broken variable does not block it either
    assert trainguard.all_guards() == []
    monkeypatch.setenv("TRAINGUARD_DISABLE", "0")  # the environment still beats the file
    with pytest.raises(ConfigError, match="raise, stop, warn"):
        trainguard.all_guards()
