"""Fuzzing the configuration parser: random ``trainguard.toml`` bytes and random ``TRAINGUARD_*`` variables give a
``ConfigError`` or guards whose numbers are all finite, never another exception, in bounded time.

``build_guards`` is called as ``all_guards()`` calls it, with the environment passed in (so a value may hold what a
real environment cannot, such as a lone surrogate from a name that is not UTF-8) and the file named by path.
``deadline`` makes an example that takes too long a failure, and pytest-timeout bounds each test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainguard.callbacks import _GUARDS
from trainguard.config import ConfigError, build_guards, option_names

from _fuzz import fuzz_settings

# As tests/test_fuzz_readers.py: no example database (it would write a .hypothesis folder into the repository), and
# a generous per-example deadline as the time bound (CI's 2 cores also run other jobs).
FUZZ = fuzz_settings(80)
pytestmark = pytest.mark.timeout(600)
# The documented bound of every timeout, wait and interval (trainguard.bounds.MAX_SECONDS): one year.
MAX_SECONDS = 365 * 24 * 3600


def _options() -> dict[str, list[str]]:
    import importlib

    found = {}
    for key, target in _GUARDS:
        module, name = target.split(":")
        found[key] = sorted(option_names(getattr(importlib.import_module(module), name))[0])
    return found


OPTIONS = _options()
GUARD_KEYS = st.sampled_from(sorted(OPTIONS))
# Numbers as text, the way an environment variable or a TOML value writes them, the nasty ones first.
NUMBER_TEXT = (
    st.sampled_from(
        [
            "1e308",
            "-1e308",
            "1e999",
            "inf",
            "-inf",
            "nan",
            "Infinity",
            "NaN",
            "-0",
            "0",
            "1.5",
            "0.5",
            "true",
            "false",
            "31536001",
            "9" * 5000,
            "1_000",
            "0x10",
            "2.0",
            "-1",
            "null",
            "none",
            "",
        ]
    )
    | st.integers().map(str)
    | st.floats().map(repr)
)
DEEP = ["[" * 20_000 + "]" * 20_000, '{"a":' * 3000 + "1" + "}" * 3000, "[" * 17 + "]" * 17]
ENV_VALUES = (
    NUMBER_TEXT
    | st.sampled_from(DEEP)
    | st.text(max_size=30)
    | st.builds(
        json.dumps,
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
            max_leaves=8,
        ),
    )
)
NAMED = [
    "TRAINGUARD_NAN_ACTION",
    "TRAINGUARD_HANG_TIMEOUT",
    "TRAINGUARD_HANG_ACTION",
    "TRAINGUARD_SPIKE_POLICY",
    "TRAINGUARD_GUARDS_OFF",
    "TRAINGUARD_DISABLE",
]
GENERIC = st.builds(
    lambda guard, pick, junk: (
        f"TRAINGUARD_{guard.upper()}__{(OPTIONS[guard][pick % len(OPTIONS[guard])]).upper()}"
        if junk is None
        else f"TRAINGUARD_{guard.upper()}__{junk}"
    ),
    GUARD_KEYS,
    st.integers(min_value=0, max_value=50),
    st.none() | st.none() | st.text(max_size=8),  # mostly real options, sometimes junk (even a lone surrogate)
)
ENV_NAMES = st.sampled_from(NAMED) | GENERIC | st.text(max_size=10).map(lambda tail: "TRAINGUARD_" + tail)


def _toml_key(text: str) -> str:
    return text if text.replace("_", "").isalnum() and text.isascii() else json.dumps(text)


TOML_VALUES = NUMBER_TEXT | st.sampled_from(
    ['"stop"', "'x'", "[1, 2]", "[" * 3000 + "]" * 3000, "{a = 1}", "1979-05-27T07:32:00Z", '"\\ud800"', "[[[]]]"]
)
TOML_LINES = st.one_of(
    st.builds(lambda g: f"[{g}]", GUARD_KEYS),
    st.builds(
        lambda g, pick, v: f"{OPTIONS[g][pick % len(OPTIONS[g])]} = {v}",
        GUARD_KEYS,
        st.integers(min_value=0, max_value=50),
        TOML_VALUES,
    ),
    st.builds(lambda k, v: f"{_toml_key(k)} = {v}", st.text(min_size=1, max_size=10), TOML_VALUES),
    st.builds(lambda g, v: f"{g} = {v}", GUARD_KEYS | st.just("disable"), st.sampled_from(["true", "false", "3"])),
    st.text(max_size=30),
)
TOML_TEXT = st.lists(TOML_LINES, max_size=8).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))
NASTY_TOML = st.sampled_from(
    [
        b"[hang_watchdog]\ntimeout = inf\n",
        b"[hang_watchdog]\ntimeout = 1e308\n",
        b"[spike_guard]\nskip_batches = 1.5\n",
        b"[graceful_stop]\nsignals = " + b"[" * 3000 + b"]" * 3000 + b"\n",
        b"[nan_guard]\na = " + b"{b = " * 3000 + b"1" + b"}" * 3000 + b"\n",
        b'[nan_guard]\naction = "\xff"\n',
        b"\xef\xbb\xbf[nan_guard]\n",
        b"[nan_guard]\npatience = " + b"9" * 5000 + b"\n",
        b'[nan_guard]\n"pati\xc3\xa9nce" = 2\n',
        b"[" * 5000,
        b"",
    ]
)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """An empty working directory, so no ``trainguard.toml`` but the one a test names is ever found."""
    folder = Path(tempfile.mkdtemp(prefix="trainguard-fuzz-config-"))
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(before)
        shutil.rmtree(folder, ignore_errors=True)


def _numbers(guard: Any) -> Iterator[tuple[str, float]]:
    """Every number a guard holds as an option (its attributes, and its watchdog settings)."""
    values = dict(vars(guard))
    watchdog = getattr(guard, "watchdog", None)
    if watchdog is not None:
        values.update({f.name: getattr(watchdog.settings, f.name) for f in dataclasses.fields(watchdog.settings)})
    for name, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, value


def build_or_refuse(environ: dict[str, str], config: Path | None) -> None:
    """The only outcomes allowed: a ConfigError that renders as UTF-8 text and JSON, or sane guards."""
    try:
        guards = build_guards(_GUARDS, {}, environ=environ, config_path=config)
    except ConfigError as err:
        str(err).encode("utf-8")  # printable: a name that is not UTF-8 is shown escaped
        json.dumps(err.to_dict())
        return
    for guard in guards:
        for name, value in _numbers(guard):
            assert math.isfinite(value), (type(guard).__name__, name, value)
            if name.endswith(("timeout", "interval", "floor", "grace", "_wait")):
                assert 0 <= value <= MAX_SECONDS, (type(guard).__name__, name, value)


@FUZZ
@given(data=TOML_TEXT | NASTY_TOML | st.binary(max_size=300))
def test_random_toml_bytes_give_a_config_error_or_sane_guards(workdir: Path, data: bytes) -> None:
    path = workdir / "trainguard.toml"
    path.write_bytes(data)
    try:
        build_or_refuse({}, path)
    finally:
        path.unlink()


@FUZZ
@given(env=st.dictionaries(ENV_NAMES, ENV_VALUES, max_size=5))
def test_random_environment_values_give_a_config_error_or_sane_guards(workdir: Path, env: dict[str, str]) -> None:
    env.pop("TRAINGUARD_CONFIG", None)  # a random path could name a real file of this machine
    build_or_refuse(env, None)


@FUZZ
@given(env=st.dictionaries(ENV_NAMES, ENV_VALUES, max_size=5), data=TOML_TEXT | NASTY_TOML | st.binary(max_size=200))
def test_the_kill_switch_wins_over_any_random_setting(workdir: Path, env: dict[str, str], data: bytes) -> None:
    env.pop("TRAINGUARD_CONFIG", None)
    env["TRAINGUARD_DISABLE"] = "1"
    path = workdir / "trainguard.toml"
    path.write_bytes(data)
    try:
        assert build_guards(_GUARDS, {}, environ=env) == []
    finally:
        path.unlink()
