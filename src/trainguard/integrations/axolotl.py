"""The axolotl plugin: turn trainguard's guards on from an axolotl YAML, no Python.

::

    plugins:
      - trainguard.integrations.axolotl.TrainguardPlugin
    trainguard:                      # optional; the shape of all_guards(**overrides)
      nan_guard: {action: stop}
      hang_watchdog: {timeout: 1800}
      run_lock: false

The ``trainguard:`` key is validated with axolotl's own config schema (:class:`TrainguardArgs`): an unknown guard
or option fails ``axolotl train`` before anything loads. ``TRAINGUARD_*`` variables and ``trainguard.toml`` apply
too (explicit > environment > this YAML key > ``trainguard.toml`` > the plugin's defaults), and
``TRAINGUARD_DISABLE=1`` (or ``trainguard: {disable: true}``) adds no guards.

The guards are added with ``add_callbacks_pre_trainer``, so they are in ``Trainer(callbacks=...)`` and see
``on_init_end``, where they find the Trainer and wrap ``train()`` (the pre-resume checks need that; callbacks added
by ``add_callbacks_post_trainer`` miss it).

Overlaps with axolotl's own features (axolotl 0.19; see docs/integrations.md):

- ``auto_resume_from_checkpoints``: axolotl picks the highest-numbered ``checkpoint-N`` without looking inside it.
  When that pick is axolotl's (``resume_from_checkpoint`` not set in the YAML), trainguard's
  :class:`~trainguard.CheckpointVerifier` takes over and resumes from the newest *verified* checkpoint (a damaged
  newer one is set aside, never deleted). A path written in the YAML is resumed as given, after verification.
- the SIGINT save: axolotl's handler (rank 0 only) writes the bare weights into ``output_dir`` and exits 0, so an
  interrupted run looks finished and has no optimizer state. The plugin adds SIGINT to
  :class:`~trainguard.GracefulStop`'s signals: during training trainguard's handler replaces axolotl's (it is
  installed later, at ``on_train_begin``) and every rank stops at the same step with a verified checkpoint; before and
  after training axolotl's handler is in place again. ``trainguard: {graceful_stop: {signals: [SIGTERM]}}`` leaves
  SIGINT to axolotl.
- ``loss_watchdog_threshold``: kept as it is. It stops on a loss *above* a threshold; a NaN loss is never above
  anything, which is what :class:`~trainguard.NanGuard` catches. The two do not overlap.
"""

from __future__ import annotations

from typing import Any

try:
    from axolotl.integrations.base import BasePlugin
except ImportError as _exc:  # pragma: no cover - exercised in a venv without axolotl
    raise ImportError(
        "trainguard.integrations.axolotl is an axolotl plugin and needs axolotl: pip install 'trainguard[axolotl]' "
        f"(import failed: {_exc})"
    ) from _exc

from pydantic import BaseModel, ConfigDict, field_validator

from ..callbacks import _GUARDS
from ..config import Layer, build_guards, check_options, mapping_layer
from ._auto_resume import AutoResumeToVerified

__all__ = ["TrainguardArgs", "TrainguardPlugin"]

#: The plugin's defaults, below trainguard.toml, the YAML key and the environment.
DEFAULTS: dict[str, dict[str, Any]] = {"graceful_stop": {"signals": ["SIGTERM", "SIGUSR1", "SIGINT"]}}


def _validate(settings: dict[str, Any]) -> Layer:
    """Check a ``trainguard:`` mapping the way :func:`trainguard.all_guards` would, without building guards."""
    import importlib

    layer = mapping_layer(
        settings,
        name="axolotl YAML",
        table=_GUARDS,
        where=lambda guard, option: {"field": "trainguard." + guard + (f".{option}" if option else "")},
    )
    targets = dict(_GUARDS)
    for guard, options in layer.guards.items():
        if guard in targets:
            module_name, cls_name = targets[guard].split(":")
            check_options(getattr(importlib.import_module(module_name), cls_name), guard, options)
    return layer


class TrainguardArgs(BaseModel):
    """The ``trainguard:`` key of an axolotl YAML, merged into axolotl's config schema by the plugin.

    Its value: ``disable: true`` (the kill switch), and per guard keyword (``nan_guard``, ``hang_watchdog``, ...)
    ``false`` to leave it out or a mapping of its options, as ``all_guards(**overrides)`` takes them.
    """

    model_config = ConfigDict(extra="allow")

    trainguard: dict[str, Any] | None = None

    @field_validator("trainguard")
    @classmethod
    def _known_guards_and_options(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            _validate(value)  # ConfigError is a ValueError: pydantic reports it under the `trainguard` field
        return value


class TrainguardPlugin(BasePlugin):
    """Adds trainguard's guards to an axolotl run: ``plugins: [trainguard.integrations.axolotl.TrainguardPlugin]``.

    Raises:
        trainguard.config.ConfigError: At config load, for an unknown guard or option under ``trainguard:``; when
            the guards are built, for a bad ``TRAINGUARD_*`` variable or ``trainguard.toml``.

    Usage (an axolotl YAML, then the shell)::

        # config.yaml
        plugins: [trainguard.integrations.axolotl.TrainguardPlugin]
        trainguard: {nan_guard: {action: stop}}
        # shell
        axolotl train config.yaml
    """

    def get_input_args(self) -> str:
        return "trainguard.integrations.axolotl.TrainguardArgs"

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list[Any]:
        settings = cfg.get("trainguard") or {}
        defaults = mapping_layer(DEFAULTS, name="axolotl plugin defaults", table=_GUARDS)
        guards = build_guards(_GUARDS, {}, tool_layer=_validate(dict(settings)), defaults=defaults)
        if not guards:
            return []
        # resume_from_checkpoint is still the YAML's value here: axolotl fills in its auto-resume pick later.
        if cfg.get("auto_resume_from_checkpoints") and not cfg.get("resume_from_checkpoint"):
            verifier = any(g.guard_name == "checkpoint_verifier" for g in guards)
            if verifier:
                guards.insert(0, AutoResumeToVerified(str(cfg.get("output_dir")), "axolotl"))
        return guards
