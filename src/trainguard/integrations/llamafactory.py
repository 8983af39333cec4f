"""Run a LLaMA-Factory YAML with trainguard's guards: ``trainguard-llamafactory train config.yaml``.

LLaMA-Factory (v0) has no YAML hook for callbacks (its issue #8761 asks for one); its documented Python entry
point ``llamafactory.train.tuner.run_exp(args, callbacks=[...])`` takes them. This module is a thin wrapper around
it, and the console script ``trainguard-llamafactory`` takes the same arguments as ``llamafactory-cli train``::

    trainguard-llamafactory train examples/llamafactory_sft.yaml learning_rate=1e-4

Guard options go in the same YAML under a ``trainguard:`` key (the shape of ``all_guards(**overrides)``; see
docs/integrations.md). The key is removed before LLaMA-Factory parses the arguments, so ``llamafactory-cli train``
on the same file fails on an unknown key instead of training unguarded without saying so. ``TRAINGUARD_*``
environment variables and ``trainguard.toml`` apply too (explicit > environment > this YAML key >
``trainguard.toml``), and ``TRAINGUARD_DISABLE=1`` runs LLaMA-Factory with no guards.

Several devices (or ``FORCE_TORCHRUN=1``): ``llamafactory-cli`` starts ``torchrun`` on its own launcher file, which
would drop the guards; this wrapper starts ``torchrun`` on itself instead, with LLaMA-Factory's variables
(``NPROC_PER_NODE``, ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

From Python::

    from trainguard.integrations.llamafactory import run
    run({"stage": "sft", "model_name_or_path": "...", ..., "trainguard": {"nan_guard": {"action": "stop"}}})
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError, build_guards, mapping_layer
from ._auto_resume import AutoResumeToVerified

__all__ = ["KEY", "guards_for", "main", "read_config", "run"]

#: The YAML key that holds trainguard's settings.
KEY = "trainguard"

_USAGE = (
    "usage: trainguard-llamafactory train CONFIG.yaml|CONFIG.json [key=value ...]\n"
    "Runs `llamafactory-cli train` with trainguard's guards; guard options go under a `trainguard:` key in CONFIG."
)


def _require_llamafactory() -> Any:
    try:
        from llamafactory.train import tuner
    except ImportError as exc:
        raise ImportError(
            "trainguard.integrations.llamafactory needs LLaMA-Factory: pip install 'trainguard[llamafactory]' "
            f"(import failed: {exc})"
        ) from exc
    return tuner


def read_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The arguments LLaMA-Factory would read from ``path`` with ``key=value`` overrides, as ``llamafactory-cli``
    merges them (OmegaConf).

    Raises:
        ConfigError: ``path`` is neither ``.yaml``/``.yml`` nor ``.json``, or is not a mapping.
    """
    from omegaconf import OmegaConf

    source = Path(path).absolute()
    if source.suffix in (".yaml", ".yml"):
        base = OmegaConf.load(source)
    elif source.suffix == ".json":
        base = OmegaConf.create(json.loads(source.read_text(encoding="utf-8")))
    else:
        raise ConfigError(
            f"{source} is not a .yaml, .yml or .json file",
            where={"file": source},
            next_step="Pass the LLaMA-Factory config file, as to `llamafactory-cli train`.",
        )
    merged = OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.from_cli(list(overrides))))
    if not isinstance(merged, dict):
        raise ConfigError(f"{source} does not hold a mapping of arguments", where={"file": source})
    return {str(k): v for k, v in merged.items()}


def guards_for(args: dict[str, Any], *, source: str = "LLaMA-Factory arguments") -> list[Any]:
    """Remove the ``trainguard`` key from ``args`` (in place) and return the guards it asks for.

    Raises:
        ConfigError: The key names an unknown guard or option, or a value the guard refuses.
    """
    from ..callbacks import _GUARDS

    settings = args.pop(KEY, None)
    if settings is not None and not isinstance(settings, Mapping):
        raise ConfigError(
            f"{KEY}: must be a mapping of guard settings, not {settings!r}",
            where={"source": source, "field": KEY},
            next_step=f"Write `{KEY}:` followed by indented `guard_name: {{option: value}}` lines.",
        )
    layer = mapping_layer(
        settings,
        name=source,
        table=_GUARDS,
        where=lambda guard, option: {"file": source, "field": f"{KEY}.{guard}" + (f".{option}" if option else "")},
    )
    guards = build_guards(_GUARDS, {}, tool_layer=layer)
    # LLaMA-Factory resumes a non-empty output_dir from its highest-numbered checkpoint, unverified, unless told
    # otherwise; let CheckpointVerifier pick the newest verified one instead.
    auto_resume = not args.get("resume_from_checkpoint") and not args.get("overwrite_output_dir")
    if auto_resume and args.get("output_dir") and any(g.guard_name == "checkpoint_verifier" for g in guards):
        guards.insert(0, AutoResumeToVerified(str(args["output_dir"]), "LLaMA-Factory"))
    return guards


def run(args: dict[str, Any], callbacks: Sequence[Any] = (), *, source: str = "LLaMA-Factory arguments") -> None:
    """Run ``llamafactory.train.tuner.run_exp`` on ``args`` (a dict, as from the YAML) with the guards.

    Args:
        args: LLaMA-Factory's arguments, with trainguard's under ``trainguard`` (removed from the dict here).
        callbacks: More callbacks, added after the guards.
        source: How to name ``args`` in error messages (the YAML's path).

    Raises:
        ImportError: LLaMA-Factory is not installed.
        ConfigError: A trainguard setting is wrong.
        TrainGuardError: A guard refused or stopped the run (RunLockedError, DatasetMismatchError, ...).
    """
    tuner = _require_llamafactory()
    args = dict(args)
    guards = guards_for(args, source=source)
    tuner.run_exp(args=args, callbacks=[*guards, *callbacks])


def _torchrun_wanted() -> bool:
    if os.environ.get("LOCAL_RANK") is not None:  # already a torchrun worker
        return False
    from llamafactory.extras.misc import get_device_count, is_env_enabled

    return bool(is_env_enabled("FORCE_TORCHRUN") or get_device_count() > 1)


def _torchrun(argv: Sequence[str]) -> int:
    from llamafactory.extras.misc import find_available_port, get_device_count

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        os.environ.get("NNODES", "1"),
        "--node_rank",
        os.environ.get("NODE_RANK", "0"),
        "--nproc_per_node",
        os.environ.get("NPROC_PER_NODE", str(get_device_count())),
        "--master_addr",
        os.environ.get("MASTER_ADDR", "127.0.0.1"),
        "--master_port",
        os.environ.get("MASTER_PORT", str(find_available_port())),
        "-m",
        __name__,
        *argv,
    ]
    return subprocess.run(command, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    """The ``trainguard-llamafactory`` command: ``train CONFIG [key=value ...]``.

    Returns:
        0 when training finished; 2 on a usage error. A guard's refusal propagates as its exception (exit 1).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv[:2]):
        print(_USAGE)
        return 0
    if len(argv) < 2 or argv[0] != "train":
        print(_USAGE, file=sys.stderr)
        return 2
    _require_llamafactory()
    if _torchrun_wanted():
        return _torchrun(argv)
    config, overrides = argv[1], argv[2:]
    run(read_config(config, overrides), source=str(Path(config).absolute()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
