"""Configuration without code: TRAINGUARD_* variables, trainguard.toml, precedence, the kill switch, bad values."""

from __future__ import annotations

import logging
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
    yaml_layer = mapping_layer({"nan_guard": {"action": "stop"}}, name="axolotl YAML")
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
    assert "TRAINGUARD_NAN_GUARD__PATIENCE" in err.value.where["patience"]


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
