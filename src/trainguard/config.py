"""Configuration without code: ``TRAINGUARD_*`` environment variables, a ``trainguard.toml`` file, a kill switch.

:func:`trainguard.all_guards` (and the axolotl and LLaMA-Factory integrations) read three sources besides their
arguments. For each guard option the first source that sets it wins:

1. explicit arguments: ``all_guards(nan_guard={"action": "stop"})``, an instance, or ``False``;
2. the environment: ``TRAINGUARD_*`` variables (below);
3. a file: the ``trainguard:`` key of the tool's YAML (axolotl, LLaMA-Factory), then ``trainguard.toml``;
4. the guard's own defaults.

Environment variables (values are case-insensitive where they are words):

- ``TRAINGUARD_DISABLE=1``: the kill switch. ``all_guards()`` returns no guards and the integrations add none,
  with one warning on the ``trainguard`` logger. Guards a script constructs itself and passes to
  ``Trainer(callbacks=[...])`` are code, not configuration, and stay active (explicit beats environment).
- ``TRAINGUARD_GUARDS_OFF=run_lock,data_guard``: leave these guards out.
- ``TRAINGUARD_NAN_ACTION=raise|stop|warn``: ``nan_guard.action``.
- ``TRAINGUARD_HANG_TIMEOUT=1800`` (seconds, or ``none`` for the adaptive budget): ``hang_watchdog.timeout``.
- ``TRAINGUARD_HANG_ACTION=dump|abort``: ``hang_watchdog.action``.
- ``TRAINGUARD_SPIKE_POLICY=alert|skip|rollback``: ``spike_guard.policy``.
- ``TRAINGUARD_WEBHOOK_URL``: where alerts are POSTed (read by :mod:`trainguard.alerts`).
- ``TRAINGUARD_<GUARD>__<OPTION>=value`` (two underscores): any option of any guard, e.g.
  ``TRAINGUARD_NAN_GUARD__PATIENCE=2``, ``TRAINGUARD_RUN_LOCK__ENABLED=false``. The value is read as JSON
  (``2``, ``1.5``, ``true``, ``null``, ``["SIGTERM"]``, ``"text"``) and otherwise taken as a string.
- ``TRAINGUARD_CONFIG=path/to/trainguard.toml``: the file to read (it must exist); without it,
  ``./trainguard.toml`` is read when present.

The file, in TOML (read by the standard library, no YAML dependency; the same shape as the tools' ``trainguard:``
YAML key)::

    disable = false            # the kill switch, as a file setting

    [nan_guard]
    action = "stop"

    [hang_watchdog]
    timeout = 1800

    [run_lock]
    enabled = false            # or, at the top: run_lock = false

A value trainguard cannot use raises :class:`ConfigError`, naming the variable, or the file, line and key, and
what to write instead.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .alerts import get_logger
from .bounds import MAX_SECONDS, seconds
from .errors import ConfigError, MalformedFileError, TrainGuardError, UnsafeFileError
from .safe_fs import display_name, display_text, nesting_depth, read_bytes

__all__ = [
    "CONFIG_ENV",
    "CONFIG_FILE",
    "DISABLE_ENV",
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH",
    "ConfigError",
    "Layer",
    "build_guards",
    "disabled",
    "env_layer",
    "file_layer",
    "mapping_layer",
]

ENV_PREFIX = "TRAINGUARD_"
DISABLE_ENV = "TRAINGUARD_DISABLE"
CONFIG_ENV = "TRAINGUARD_CONFIG"
GUARDS_OFF_ENV = "TRAINGUARD_GUARDS_OFF"
CONFIG_FILE = "trainguard.toml"
#: A trainguard.toml is a few hundred bytes; a larger file is refused by its size, never read whole.
MAX_CONFIG_BYTES = 1 << 20
#: A setting nests at most three levels (table, option, list); deeper is a crafted value, refused before a guard
#: sees it (and a 3,000-deep array is refused by the parser's own recursion, not as a raw RecursionError).
MAX_CONFIG_DEPTH = 16

# Guard keywords a configuration may name although this build of all_guards() may not have the guard yet
# (the spike guard is being added to the table in parallel); their settings are accepted and used once it is there.
PENDING_GUARDS = ("spike_guard",)

# The named variables for the options users change most: (guard, option, allowed values or None, parser).
_FLOAT_OR_NONE = "float_or_none"
_NAMED: dict[str, tuple[str, str, tuple[str, ...] | None, str | None]] = {
    "TRAINGUARD_NAN_ACTION": ("nan_guard", "action", ("raise", "stop", "warn"), None),
    "TRAINGUARD_HANG_TIMEOUT": ("hang_watchdog", "timeout", None, _FLOAT_OR_NONE),
    "TRAINGUARD_HANG_ACTION": ("hang_watchdog", "action", ("dump", "abort"), None),
    "TRAINGUARD_SPIKE_POLICY": ("spike_guard", "policy", ("alert", "skip", "rollback"), None),
}
# Variables other modules read; listed so they are not reported as unknown.
# Read elsewhere: the webhook (alerts), the reporting switch (integrations.reporting), the test rig's GPU and engine
# switches (tests/_rig.py, tests/_engines.py).
_OTHER_KNOWN = {
    DISABLE_ENV,
    CONFIG_ENV,
    GUARDS_OFF_ENV,
    "TRAINGUARD_WEBHOOK_URL",
    "TRAINGUARD_REPORTING",
    "TRAINGUARD_TEST_ON_GPU",
    "TRAINGUARD_TEST_ENGINE",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# Pseudo-option that turns a guard on or off in every source (env, file, YAML).
ENABLED = "enabled"


@dataclass
class Layer:
    """The guard settings one source gives.

    Args:
        name: The source in words (``"environment"``, ``"trainguard.toml"``, ``"axolotl YAML"``).
        disable: The kill switch, when this source sets it, with where it was set.
        guards: Per guard keyword: option name -> (value, where). The ``enabled`` pseudo-option turns the guard
            on or off.
    """

    name: str
    disable: tuple[bool, dict[str, Any]] | None = None
    guards: dict[str, dict[str, tuple[Any, dict[str, Any]]]] = field(default_factory=dict)

    def set(self, guard: str, option: str, value: Any, where: dict[str, Any]) -> None:
        self.guards.setdefault(guard, {})[option] = (value, where)

    def __bool__(self) -> bool:
        return self.disable is not None or bool(self.guards)


def _known_guards(table: Sequence[tuple[str, str]]) -> list[str]:
    return [key for key, _ in table] + [key for key in PENDING_GUARDS if key not in {k for k, _ in table}]


def _table_given(table: Sequence[tuple[str, str]] | None) -> Sequence[tuple[str, str]]:
    # The table lives with the callbacks, above this module (configuration never imports a callback): the caller
    # passes it.
    if table is None:
        raise TypeError("pass the guards' table: table=trainguard.callbacks._GUARDS")
    return table


def _parse_bool(raw: str, where: dict[str, Any]) -> bool:
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(
        f"{raw!r} is not a yes/no value",
        where=where,
        next_step="Write 1, true, yes or on to turn it on; 0, false, no, off or nothing to turn it off.",
    )


def _parse_scalar(raw: str, where: dict[str, Any]) -> Any:
    # JSON first, so numbers, booleans, null and lists keep their type; anything else is a plain string. Numbers
    # JSON reads as inf/nan (1e999, Infinity, NaN) are kept: the guard's own range check refuses them, by name.
    try:
        value = json.loads(raw)
    except RecursionError:
        value = _TOO_DEEP
    except ValueError:  # not JSON (or an integer of more digits than Python converts): a plain string
        return raw
    if value is _TOO_DEEP or nesting_depth(value, MAX_CONFIG_DEPTH) > MAX_CONFIG_DEPTH:
        raise ConfigError(
            f"{where['variable']} holds a value nested deeper than {MAX_CONFIG_DEPTH} levels",
            where=where,
            next_step=f'Give {where["variable"]} a number, a word, true/false, or a flat list such as ["SIGTERM"].',
        )
    return value


_TOO_DEEP: Any = object()


def disabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the kill switch ``TRAINGUARD_DISABLE`` is on in the environment (a file's ``disable`` is read by
    :func:`build_guards`).

    Raises:
        ConfigError: The variable holds something other than a yes/no value.
    """
    env = os.environ if environ is None else environ
    raw = env.get(DISABLE_ENV)
    return raw is not None and _parse_bool(raw, {"variable": DISABLE_ENV})


def env_layer(table: Sequence[tuple[str, str]] | None = None, environ: Mapping[str, str] | None = None) -> Layer:
    """The settings of the ``TRAINGUARD_*`` environment variables.

    Raises:
        ConfigError: A variable names no guard, or holds a value its option does not take.
    """
    env = os.environ if environ is None else environ
    known = _known_guards(_table_given(table))
    layer = Layer("environment")
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        raw = env[name]
        # A name that is not UTF-8 (kept by Python as surrogates) must not break printing the error naming it.
        where: dict[str, Any] = {"variable": display_text(name)}
        if name == DISABLE_ENV:
            layer.disable = (_parse_bool(raw, where), where)
        elif name == GUARDS_OFF_ENV:
            for item in filter(None, (part.strip().lower() for part in raw.split(","))):
                _check_guard(item, known, where)
                layer.set(item, ENABLED, False, where)
        elif name in _NAMED:
            guard, option, choices, parser = _NAMED[name]
            value: Any = raw.strip()
            if parser == _FLOAT_OR_NONE:
                value = _float_or_none(value, where)
            elif choices is not None:
                value = value.lower()
                if value not in choices:
                    raise ConfigError(
                        f"{name}={raw!r} is not one of {', '.join(choices)}",
                        where=where,
                        next_step=f"Set {name} to one of {', '.join(choices)}, or unset it for the default.",
                    )
            _set_once(layer, guard, option, value, where)
        elif "__" in name[len(ENV_PREFIX) :]:
            guard, _, option = name[len(ENV_PREFIX) :].partition("__")
            guard, option = guard.lower(), option.lower()
            _check_guard(guard, known, where)
            if not option:
                raise ConfigError(
                    f"{name} names no option after the two underscores",
                    where=where,
                    next_step=f"Write TRAINGUARD_{guard.upper()}__<OPTION>=value (TRAINGUARD_NAN_GUARD__ACTION=stop).",
                )
            value = _parse_bool(raw, where) if option == ENABLED else _parse_scalar(raw, where)
            _set_once(layer, guard, option, value, where)
        elif name not in _OTHER_KNOWN:
            # Not an error: other trainguard modules (and later releases) may read their own TRAINGUARD_ variables.
            get_logger().warning(
                "trainguard: environment variable %s is not a trainguard setting this version knows; ignored",
                display_text(name),
            )
    return layer


def _float_or_none(raw: str, where: dict[str, Any]) -> float | None:
    if raw.lower() in {"none", "null", ""}:
        return None
    value: Any = raw
    with contextlib.suppress(ValueError):  # a word is refused below, by the check every seconds option has
        value = float(raw)
    try:
        return seconds(where["variable"], value)  # finite, above 0, at most a year: 1e308 would overflow a timer
    except ConfigError as exc:
        raise ConfigError(
            exc.what,
            where=where,
            next_step=(
                f"Set {where['variable']} to seconds (e.g. 1800, at most {MAX_SECONDS:,}: one year), or to none for "
                "the adaptive budget."
            ),
            evidence=exc.evidence,
        ) from None


def _set_once(layer: Layer, guard: str, option: str, value: Any, where: dict[str, Any]) -> None:
    previous = layer.guards.get(guard, {}).get(option)
    if previous is not None and previous[0] != value:
        raise ConfigError(
            f"{guard}.{option} is set twice in the environment, to {previous[0]!r} and to {value!r}",
            where={"variable": where["variable"], "also": previous[1]["variable"]},
            next_step="Unset one of the two variables.",
        )
    layer.set(guard, option, value, where)


def _check_guard(guard: str, known: Iterable[str], where: dict[str, Any]) -> None:
    known = list(known)
    if guard not in known:
        raise ConfigError(
            f"{guard!r} is not a trainguard guard",
            where=where,
            next_step=f"Use one of: {', '.join(known)}.",
        )


def find_config_file(
    environ: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None
) -> Path | None:
    """The configuration file to read: ``TRAINGUARD_CONFIG``, else ``trainguard.toml`` in the working directory.

    Only the working directory is searched, never its parents: a training job should not pick up settings from a
    file it was not started beside. Anything at ``./trainguard.toml`` counts, a FIFO or a folder too: reading it
    refuses it by name (:func:`read_config_file`) instead of silently running without the settings meant there.

    Raises:
        ConfigError: ``TRAINGUARD_CONFIG`` names a file that does not exist.
    """
    env = os.environ if environ is None else environ
    named = env.get(CONFIG_ENV)
    if named:
        path = Path(named).expanduser()
        if not os.path.lexists(path):
            raise ConfigError(
                f"{CONFIG_ENV} names {display_name(named)}, which is not a file",
                where={"variable": CONFIG_ENV, "file": display_name(path)},
                next_step=f"Point {CONFIG_ENV} at an existing trainguard.toml, or unset it.",
            )
        return path
    candidate = Path(cwd if cwd is not None else os.getcwd()) / CONFIG_FILE
    return candidate if os.path.lexists(candidate) else None


def read_config_file(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """Read a ``trainguard.toml`` once: its text (for line numbers) and its content.

    The file must be a regular file (a FIFO, device or folder is refused without blocking), of at most
    :data:`MAX_CONFIG_BYTES` (a larger one is refused by its size, not read whole), UTF-8, valid TOML, nested at most
    :data:`MAX_CONFIG_DEPTH` levels.

    Raises:
        ConfigError: Any of those is not so; the message names the file (and the line, where there is one).

    Example::

        Path("trainguard.toml").write_text('nan_guard = { action = "stop" }')
        text, data = read_config_file("trainguard.toml")
        data["nan_guard"]["action"]       # 'stop'
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10 reads TOML with the tomli backport (a dependency there)
        import tomli as tomllib
    shown = display_name(path)
    where: dict[str, Any] = {"file": shown}
    try:
        raw = read_bytes(path, limit=MAX_CONFIG_BYTES)
    except (UnsafeFileError, MalformedFileError) as exc:  # not a regular file; larger than the bound
        raise ConfigError(
            f"trainguard will not read its configuration from {shown}: {exc.what}",
            where=where,
            next_step=f"Put a plain trainguard.toml of at most {MAX_CONFIG_BYTES:,} bytes there, or remove it "
            f"(or point {CONFIG_ENV} at one).",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{shown} cannot be read: {exc.strerror or exc}",
            where=where,
            next_step="Make the file readable, or remove it (or point TRAINGUARD_CONFIG at another).",
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{shown} is not UTF-8 text (byte {exc.start})",
            where={**where, "line": raw.count(b"\n", 0, exc.start) + 1},
            next_step="Save the file as UTF-8 (TOML files are UTF-8).",
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise ConfigError(
            f"{shown} is not valid TOML: {exc}",
            where={**where, "line": int(match.group(1)) if match else None},
            next_step="Fix the line named above (TOML: key = value, strings in quotes, [guard] tables).",
        ) from None
    except RecursionError:  # the standard parser recurses once per nested array or inline table
        data = _TOO_DEEP
    except ValueError as exc:  # e.g. an integer longer than Python converts (4,300 digits)
        raise ConfigError(
            f"{shown} holds a value trainguard cannot read: {exc}",
            where=where,
            next_step="Fix the value (numbers of a sane size, strings in quotes).",
        ) from None
    if data is _TOO_DEEP or nesting_depth(data, MAX_CONFIG_DEPTH) > MAX_CONFIG_DEPTH:
        raise ConfigError(
            f"{shown} nests tables or arrays deeper than {MAX_CONFIG_DEPTH} levels",
            where=where,
            next_step="A trainguard.toml needs [guard] tables of option = value lines; remove the deep value.",
        )
    return text, data


# One part of a TOML key: bare (nan_guard), "basic" (with escapes) or 'literal'.
_KEY_PART = re.compile(r"""\s*(?:([A-Za-z0-9_-]+)|"((?:[^"\\]|\\.)*)"|'([^']*)')\s*""")


def _key_parts(text: str, pos: int) -> tuple[tuple[str, ...], int] | None:
    """The parts of the dotted TOML key at ``text[pos:]`` and where it ends; None when there is no key there."""
    parts: list[str] = []
    while True:
        match = _KEY_PART.match(text, pos)
        if not match:
            return None
        bare, basic, literal = match.groups()
        if basic is not None:
            # TOML's basic-string escapes are JSON's (but \U and \e, rare in a key: shown as written).
            with contextlib.suppress(ValueError, RecursionError):
                basic = json.loads(f'"{basic}"')
        parts.append(next(p for p in (bare, basic, literal) if p is not None))
        pos = match.end()
        if pos < len(text) and text[pos] == ".":
            pos += 1
            continue
        return tuple(parts), pos


def _line_of(text: str, guard: str, option: str | None) -> int | None:
    """The line of ``guard.option`` (or of ``guard`` itself) in a TOML text, best effort, for error messages.

    Keys are matched as TOML reads them: bare, quoted (``"patiénce"``, which is how a key that is not ASCII must be
    written) or dotted (``nan_guard.patience = 2`` at the top). An option set in an inline table is reported at its
    guard's line."""
    wanted = (guard, option) if option is not None else (guard,)
    table: tuple[str, ...] = ()
    guard_line = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("["):
            start = 2 if stripped.startswith("[[") else 1
            header = _key_parts(stripped, start)
            if header is not None and stripped[header[1] :].startswith("]"):
                table = header[0]
                if table == wanted:
                    return number
                if table == (guard,) and guard_line is None:
                    guard_line = number
            continue
        key = _key_parts(stripped, 0)
        if key is None or not stripped[key[1] :].startswith("="):
            continue
        name = table + key[0]
        if name == wanted:
            return number
        if name[:1] == (guard,) and guard_line is None:
            guard_line = number
    return guard_line


def file_layer(
    path: str | os.PathLike[str] | None = None,
    table: Sequence[tuple[str, str]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Layer:
    """The settings of a ``trainguard.toml``: ``path``, else the one :func:`find_config_file` finds (an empty layer
    when there is none). The file is read once (:func:`read_config_file`).

    Raises:
        ConfigError: The file cannot be read as a trainguard.toml (see :func:`read_config_file`), or names an
            unknown guard, or gives a guard something other than a table or true/false.
    """
    found = Path(path) if path is not None else find_config_file(environ)
    if found is None:
        return Layer(CONFIG_FILE)
    text, data = read_config_file(found)
    return _toml_layer(found, text, data, table)


def _toml_layer(found: Path, text: str, data: Mapping[str, Any], table: Sequence[tuple[str, str]] | None) -> Layer:
    return mapping_layer(
        data,
        name=display_name(found),
        table=table,
        where=lambda guard, option: {"file": display_name(found), "line": _line_of(text, guard, option)},
    )


def mapping_layer(
    data: Mapping[str, Any] | None,
    *,
    name: str,
    table: Sequence[tuple[str, str]] | None = None,
    where: Callable[[str, str | None], dict[str, Any]] | None = None,
) -> Layer:
    """The settings of a parsed mapping: a TOML file's content, or a tool's ``trainguard:`` YAML key.

    The shape: ``disable: bool``; per guard keyword ``false``/``true`` or a mapping of its options (``enabled``
    among them).

    Raises:
        ConfigError: An unknown top-level key or guard, or a guard given something else than a mapping or a bool.
    """
    known = _known_guards(_table_given(table))
    locate = where or (lambda guard, option: {"source": name, "field": f"{guard}.{option}" if option else guard})
    layer = Layer(name)
    for key, value in (data or {}).items():
        here = {"field": key, **locate(key, None)}
        if key == "disable":
            if not isinstance(value, bool):
                raise ConfigError(
                    f"disable must be true or false, not {value!r}", where=here, next_step="Write disable = true."
                )
            layer.disable = (value, here)
            continue
        if key not in known:
            raise ConfigError(
                f"{key!r} is neither a trainguard guard nor 'disable'",
                where=here,
                next_step=f"Use disable or one of the guards: {', '.join(known)}.",
            )
        if isinstance(value, bool):
            layer.set(key, ENABLED, value, here)
        elif isinstance(value, Mapping):
            for option, option_value in value.items():
                spot = {"field": f"{key}.{option}", **locate(key, str(option))}
                if option == ENABLED and not isinstance(option_value, bool):
                    raise ConfigError(
                        f"{key}.enabled must be true or false, not {option_value!r}",
                        where=spot,
                        next_step=f"Write {key}.enabled = false to leave the guard out.",
                    )
                layer.set(key, str(option), option_value, spot)
        else:
            raise ConfigError(
                f"{key} must be a table of options or true/false, not {value!r}",
                where=here,
                next_step=f"Write [{key}] with option = value lines, or {key} = false to leave it out.",
            )
    return layer


def option_names(cls: type) -> tuple[set[str], bool]:
    """The keyword options ``cls(...)`` takes, and whether it takes any other keyword (``**options``)."""
    names: set[str] = set()
    open_ended = False
    for parameter in inspect.signature(cls).parameters.values():
        if parameter.name == "self":
            continue
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            open_ended = True
            # HangWatchdog(**options: Unpack[WatchdogOptions]): the TypedDict lists them.
            names |= _typed_dict_keys(cls)
        elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
            names.add(parameter.name)
    return names, open_ended and not _typed_dict_keys(cls)


def _typed_dict_keys(cls: type) -> set[str]:
    annotation = inspect.signature(cls).parameters.get("options")
    text = str(annotation.annotation) if annotation is not None else ""
    match = re.search(r"Unpack\[(\w+)\]", text)
    if not match:
        return set()
    module = sys.modules.get(cls.__module__)
    typed = getattr(module, match.group(1), None)
    return set(getattr(typed, "__annotations__", {}))


def check_options(cls: type, guard: str, options: Mapping[str, tuple[Any, Mapping[str, Any]]]) -> None:
    """Refuse option names ``cls`` does not take, naming where each came from.

    Raises:
        ConfigError: An option ``cls`` does not take, or ``alert_sinks`` (objects, given only in code).
    """
    names, open_ended = option_names(cls)
    for option, (_value, where) in options.items():
        if option != ENABLED and option not in names and not open_ended:
            raise ConfigError(
                f"{cls.__name__} ({guard}) has no option {option!r}",
                where=dict(where),
                next_step=f"Use one of its options: {', '.join(sorted(names - {'alert_sinks'}))}.",
            )
        if option == "alert_sinks":  # sink objects: no text or number a variable or file holds can be one
            raise ConfigError(
                f"{cls.__name__} ({guard}) takes alert_sinks only in code",
                where=dict(where),
                next_step="Set webhook_url (or TRAINGUARD_WEBHOOK_URL) here, or pass alert_sinks= in code.",
            )


def _env_disable(environ: Mapping[str, str] | None) -> tuple[bool, dict[str, Any]] | None:
    """``TRAINGUARD_DISABLE`` alone, read before any other variable (a malformed value of it is still an error)."""
    env = os.environ if environ is None else environ
    if env.get(DISABLE_ENV) is None:
        return None
    return disabled(env), {"variable": DISABLE_ENV}


def _file_layer_for_disable(
    config_path: str | os.PathLike[str] | None,
    table: Sequence[tuple[str, str]],
    environ: Mapping[str, str] | None,
) -> Layer:
    """The file's layer; a file that reads as TOML and says ``disable = true`` switches off even when its other keys
    are wrong (those errors only matter to a run that is not switched off)."""
    found = Path(config_path) if config_path is not None else find_config_file(environ)
    if found is None:
        return Layer(CONFIG_FILE)
    text, data = read_config_file(found)
    if data.get("disable") is True:
        where = {"field": "disable", "file": display_name(found), "line": _line_of(text, "disable", None)}
        return Layer(display_name(found), disable=(True, where))
    return _toml_layer(found, text, data, table)


def _resolve_disable(layers: Sequence[Layer]) -> tuple[bool, dict[str, Any] | None]:
    for layer in reversed(layers):  # highest first
        if layer.disable is not None:
            return layer.disable
    return False, None


def build_guards(
    table: Sequence[tuple[str, str]],
    explicit: Mapping[str, Any],
    *,
    tool_layer: Layer | None = None,
    defaults: Layer | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: str | os.PathLike[str] | None = None,
    guard_type: type | None = None,
) -> list[Any]:
    """One guard per entry of ``table``, with options merged from every source (explicit > environment > tool YAML
    > ``trainguard.toml`` > defaults). :func:`trainguard.all_guards` is this with no tool layer.

    Args:
        table: ``(keyword, "module:Class")`` pairs in run order (``trainguard.callbacks._GUARDS``).
        explicit: Per keyword: a dict of options, a guard instance, or ``False``/``None`` to leave it out.
        tool_layer: The settings of a tool's ``trainguard:`` YAML key (:func:`mapping_layer`).
        defaults: An integration's own defaults, below every other source.
        environ: The environment to read (default ``os.environ``).
        config_path: A ``trainguard.toml`` to read instead of the one :func:`find_config_file` finds.
        guard_type: The class whose instances ``explicit`` may give as they are (``GuardCallback``, passed by
            :func:`trainguard.all_guards`: configuration never imports the callbacks); None accepts no instance.

    Returns:
        The guards, in ``table`` order; none when the kill switch is on.

    Raises:
        TypeError: An explicit keyword names no guard, or gives something else than a dict, an instance or False.
        ConfigError: A setting from the environment or a file names an unknown guard or option, or holds a value the
            guard refuses.
    """
    import importlib

    known = {key for key, _ in table}
    unknown = sorted(set(explicit) - known)
    if unknown:
        raise TypeError(
            f"all_guards() got unknown guard keyword(s) {unknown}; known guards: {sorted(known) or 'none yet'}"
        )
    # The kill switch first, before anything else is parsed: a kill switch that a broken variable or file can block
    # is no kill switch. Each source is consulted only when every source above it left the switch unset, so the
    # precedence is that of every other setting (TRAINGUARD_DISABLE=0 still beats disable = true in the file).
    env_disable = Layer("environment", disable=_env_disable(environ))
    file: Layer | None = None
    off, where = _resolve_disable([layer for layer in (tool_layer, env_disable) if layer is not None])
    if where is None:
        file = _file_layer_for_disable(config_path, table, environ)
        off, where = _resolve_disable([layer for layer in (defaults, file) if layer is not None])
    if off:
        get_logger().warning(
            "trainguard is disabled (%s): no guards are added; guards constructed in code stay active",
            ", ".join(f"{k}={v}" for k, v in (where or {}).items()),
        )
        return []
    env = env_layer(table, environ)
    if file is None:
        file = file_layer(config_path, table, environ)
    layers = [layer for layer in (defaults, file, tool_layer, env) if layer is not None]  # low -> high
    # What each source really changed (after precedence): said once, at the end, so a file nobody remembers
    # putting beside the script cannot switch a guard off unseen.
    applied: dict[int, tuple[Layer, list[str], list[str]]] = {}
    guards: list[Any] = []
    for key, target in table:
        option = explicit.get(key, _MISSING)
        if option is False or option is None:
            continue
        if guard_type is not None and isinstance(option, guard_type):
            guards.append(option)
            continue
        if option is not _MISSING and not isinstance(option, dict):
            raise TypeError(f"all_guards({key}=...) takes a dict of options, a guard instance or False")
        merged: dict[str, tuple[Any, Mapping[str, Any]]] = {}
        origin: dict[str, Layer] = {}  # the layer each merged option came from
        for layer in layers:
            merged.update(layer.guards.get(key, {}))
            origin.update(dict.fromkeys(layer.guards.get(key, {}), layer))
        enabled = merged.pop(ENABLED, (True, {}))[0]
        if option is _MISSING and not enabled:
            if origin[ENABLED] is not defaults:
                applied.setdefault(id(origin[ENABLED]), (origin[ENABLED], [], []))[1].append(key)
            continue
        module_name, cls_name = target.split(":")
        cls = getattr(importlib.import_module(module_name), cls_name)
        check_options(cls, key, merged)
        given: dict[str, Any] = option if option is not _MISSING else {}
        kwargs = {name: value for name, (value, _where) in merged.items()}
        kwargs.update(given)
        configured = {name: where for name, (_value, where) in merged.items() if name not in given}
        for name in configured:
            if origin[name] is not defaults:
                applied.setdefault(id(origin[name]), (origin[name], [], []))[2].append(f"{key}.{name}")
        try:
            guards.append(cls(**kwargs))
        except ConfigError as exc:
            # A number out of its range (trainguard.bounds): name the one option, where it was set, and the range.
            option_name = exc.evidence.get("option")
            if option_name not in configured:
                raise  # given in code: the guard's own message is right as it is
            source = dict(configured[option_name])
            raise ConfigError(
                # where= names the file, line or variable: said once, there
                f"{cls_name} refused its configured {option_name}: {exc.what}",
                where=source,
                next_step=f"{exc.next_step} Or unset it for the default.",
                evidence=exc.evidence,
            ) from None
        except (TypeError, ValueError, OverflowError) as exc:
            if not configured or isinstance(exc, TrainGuardError):
                raise
            raise ConfigError(
                f"{cls_name} refused its configured options: {exc}",
                where={name: _describe(where) for name, where in configured.items()},
                evidence={"options": {name: kwargs[name] for name in configured}},
            ) from exc
    _say_applied(list(applied.values()), quiet=tool_layer)
    return guards


def _say_applied(applied: Sequence[tuple[Layer, list[str], list[str]]], *, quiet: Layer | None) -> None:
    """One line naming each source that changed the guards and what it turned off and set (never the values: a
    webhook URL is a secret). WARNING when a ``trainguard.toml`` or the environment did it, because nothing in the
    script shows them; INFO when only the tool's own YAML did (the user passed that file to the tool)."""
    parts = []
    for layer, off, options in applied:
        what = ([f"turned off {', '.join(off)}"] if off else []) + ([f"set {', '.join(options)}"] if options else [])
        name = "the environment" if layer.name == "environment" else layer.name
        parts.append(f"{name} ({'; '.join(what)})")
    if parts:
        level = logging.INFO if all(layer is quiet for layer, _, _ in applied) else logging.WARNING
        get_logger().log(level, "trainguard: applied guard settings from %s", " and from ".join(parts))


def _describe(where: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in where.items() if v is not None)


_MISSING: Any = object()
