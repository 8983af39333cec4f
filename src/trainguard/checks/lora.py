"""LoRA identity on resume: the checkpoint's ``adapter_config.json`` against the run's LoRA config, and the adapter
weights in the model against the checkpoint's.

On resume, ``Trainer`` loads the adapter weights into the *current* config and never reads the checkpoint's
``adapter_config.json``: another ``lora_alpha``, ``use_rslora`` or ``lora_dropout`` resumes silently with other
behaviour, another ``r`` fails only after everything is loaded with a ``size mismatch`` dump, and another
``target_modules`` or ``use_dora`` with an optimizer param-group error (or silently, without ``optimizer.pt``).
:func:`check_lora_config` reads JSON only (milliseconds, no model, no peft needed for dicts).

Example::

    from trainguard import check_lora_config
    check_lora_config("out/checkpoint-50", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import LoraConfigMismatchError
from ._resume import read_json_object

__all__ = [
    "ADAPTER_CONFIG",
    "IGNORED_FIELDS",
    "check_lora_config",
    "compare_adapter_weights",
    "lora_config_differences",
    "read_adapter_configs",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

#: Fields that cannot change what a resumed adapter computes or how it trains: bookkeeping (versions, paths,
#: ``inference_mode``, which peft saves as true) and initialisation recipes (the weights come from the checkpoint).
#: ``base_model_name_or_path`` is not compared but a difference is returned as a warning.
IGNORED_FIELDS = frozenset(
    {
        "inference_mode",
        "peft_version",
        "revision",
        "auto_mapping",
        "base_model_name_or_path",
        "init_lora_weights",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "runtime_config",
        "megatron_core",
    }
)
# Compared as sets when given as lists (peft keeps target_modules as a set: its JSON order is not stable), and as
# strings when given as a regex.
_SET_FIELDS = frozenset(
    {"target_modules", "modules_to_save", "exclude_modules", "layers_to_transform", "target_parameters"}
)
_CONFIG_KEYS = frozenset({"r", "lora_alpha", "target_modules", "peft_type", "lora_dropout"})
_LOG = logging.getLogger("trainguard")


def read_adapter_configs(checkpoint_dir: str | os.PathLike[str]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every adapter config in a checkpoint: ``{adapter_name: (file, config dict)}``.

    peft writes the ``default`` adapter's ``adapter_config.json`` at the checkpoint's root and each other adapter's
    in a sub-folder named after it.

    Raises:
        CheckpointIntegrityError: An ``adapter_config.json`` is unreadable or not a JSON object (file and line named).
    """
    folder = Path(checkpoint_dir)
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    root = folder / ADAPTER_CONFIG
    if root.is_file():
        found["default"] = (root, read_json_object(root))
    if folder.is_dir():
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            file = sub / ADAPTER_CONFIG
            if file.is_file():
                found[sub.name] = (file, read_json_object(file))
    if not found:
        found = _recorded_configs(folder)
    return found


def _recorded_configs(folder: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """The adapter configs CheckpointVerifier recorded in the manifest at the save: sharded engines (FSDP's
    SHARDED_STATE_DICT) write the adapter into their own shards and no ``adapter_config.json``."""
    from ._layout import METADATA_NAME
    from .lineage import checkpoint_origin

    recorded = checkpoint_origin(folder).record.get("resume")
    configs = recorded.get("lora") if isinstance(recorded, dict) else None
    if not isinstance(configs, dict):
        return {}
    return {str(n): (folder / METADATA_NAME, dict(c)) for n, c in configs.items() if isinstance(c, dict)}


def _config_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"expected a peft LoraConfig or a dict, not {type(config).__name__}")


def _as_adapter_map(lora_config: Any) -> dict[str | None, tuple[dict[str, Any], bool]]:
    """``{adapter_name: (config, partial)}``; the key None means "one config for every adapter in the checkpoint".
    A plain dict is partial: only the fields it names are compared."""
    if hasattr(lora_config, "to_dict") or (isinstance(lora_config, Mapping) and _CONFIG_KEYS & set(lora_config)):
        return {None: (_config_dict(lora_config), not hasattr(lora_config, "to_dict"))}
    if isinstance(lora_config, Mapping) and lora_config:
        return {str(name): (_config_dict(cfg), not hasattr(cfg, "to_dict")) for name, cfg in lora_config.items()}
    raise TypeError(
        "lora_config must be a peft LoraConfig, a config dict, or a {adapter_name: config} mapping "
        f"(such as model.peft_config), not {type(lora_config).__name__}"
    )


def _normalize(field: str, value: Any) -> Any:
    if isinstance(value, enum.Enum):
        value = value.value
    if field in _SET_FIELDS:
        if isinstance(value, int) and not isinstance(value, bool):
            return ("set", (str(value),))
        if isinstance(value, (list, tuple, set, frozenset)):
            return ("set", tuple(sorted({str(v) for v in value})))
        if isinstance(value, str):
            return ("regex", value)
    if isinstance(value, Mapping):
        return {str(k): _normalize("", v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_normalize("", v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(str(v) for v in value)
    return value


def _shown(normalized: Any) -> Any:
    if isinstance(normalized, tuple) and len(normalized) == 2 and normalized[0] == "set":
        return sorted(normalized[1])
    if isinstance(normalized, tuple) and len(normalized) == 2 and normalized[0] == "regex":
        return f"regex {normalized[1]!r}"
    return normalized


_MISSING = object()


def _default_of(field: str) -> Any:
    """peft's LoraConfig default for a field that one side does not have (older peft wrote fewer fields)."""
    try:
        from peft import LoraConfig
    except ImportError:
        return None
    for f in dataclasses.fields(LoraConfig):
        if f.name == field:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return None


def lora_config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], *, ignore: Iterable[str] = (), partial: bool = False
) -> list[dict[str, Any]]:
    """The fields that differ between two LoRA config dicts: ``[{"field", "checkpoint", "current"}]``, sorted.

    A field missing on one side counts as peft's default for it (older peft versions wrote fewer fields), except
    with ``partial=True``, where only the fields ``current`` names are compared.

    Example::

        lora_config_differences({"r": 8}, {"r": 16})   # [{"field": "r", "checkpoint": 8, "current": 16}]
    """
    skipped = IGNORED_FIELDS | set(ignore)
    differences = []
    for field in sorted(set(saved) | set(current)):
        if field in skipped or (partial and field not in current):
            continue
        old = saved.get(field, _MISSING)
        new = current.get(field, _MISSING)
        old = _default_of(field) if old is _MISSING else old
        new = _default_of(field) if new is _MISSING else new
        a, b = _normalize(field, old), _normalize(field, new)
        if a != b:
            differences.append({"field": field, "checkpoint": _shown(a), "current": _shown(b)})
    return differences


def check_lora_config(
    checkpoint_dir: str | os.PathLike[str],
    lora_config: Any,
    *,
    ignore: Iterable[str] = (),
) -> list[str]:
    """Compare every adapter config in a checkpoint with the run's LoRA config; refuse any difference that matters.

    Args:
        checkpoint_dir: The checkpoint folder (``adapter_config.json`` at its root for the ``default`` adapter,
            sub-folders for named adapters).
        lora_config: A ``peft.LoraConfig`` or a config dict (compared with every adapter in the checkpoint; a dict
            compares only the fields it names), or a ``{adapter_name: config}`` mapping such as
            ``model.peft_config``.
        ignore: More field names to leave out of the comparison (``IGNORED_FIELDS`` are always left out).

    Returns:
        Warnings that do not block a resume (another ``base_model_name_or_path``), also logged.

    Raises:
        LoraConfigMismatchError: A field differs (``r``, ``lora_alpha``, ``target_modules``, ``use_dora``, ...),
            an adapter is on one side only, or the checkpoint holds no adapter; every difference is listed with
            both values.
        CheckpointIntegrityError: An ``adapter_config.json`` is not valid JSON (file and line named).

    Example::

        check_lora_config("out/checkpoint-50", model.peft_config)
        check_lora_config("out/checkpoint-50", {"r": 8, "lora_alpha": 16}, ignore=["lora_dropout"])
    """
    folder = Path(checkpoint_dir)
    wanted = _as_adapter_map(lora_config)
    saved = read_adapter_configs(folder)
    if not saved:
        raise LoraConfigMismatchError(
            f"{folder.name} holds no {ADAPTER_CONFIG}: it is not a LoRA checkpoint, but this run is a LoRA run",
            where={"file": str(folder / ADAPTER_CONFIG)},
            next_step="Resume from the LoRA run's own checkpoint, or train this adapter in a new output_dir.",
        )
    problems: list[dict[str, Any]] = []
    warnings: list[str] = []
    files: list[str] = []
    if None in wanted:
        pairs = [(name, saved[name], wanted[None]) for name in saved]
    else:
        pairs = [(name, saved[name], wanted[name]) for name in saved if name in wanted]
        for name in sorted(set(saved) - set(wanted)):
            problems.append({"adapter": name, "field": "adapter", "checkpoint": "present", "current": "absent"})
            files.append(str(saved[name][0]))
        for extra in sorted(str(n) for n in set(wanted) - set(saved)):
            problems.append({"adapter": extra, "field": "adapter", "checkpoint": "absent", "current": "present"})
    for name, (file, old), (new, partial) in pairs:
        for diff in lora_config_differences(old, new, ignore=ignore, partial=partial):
            problems.append({"adapter": name, **diff})
            if str(file) not in files:
                files.append(str(file))
        base_old, base_new = old.get("base_model_name_or_path"), new.get("base_model_name_or_path")
        if base_old and base_new and base_old != base_new and "base_model_name_or_path" not in set(ignore):
            warnings.append(
                f"adapter '{name}' in {folder.name} was trained on base model {base_old!r}, this run uses {base_new!r}"
            )
    for message in warnings:
        _LOG.warning("trainguard: %s", message)
    if problems:
        lines = "; ".join(
            f"adapter '{p['adapter']}' {p['field']}: checkpoint {p['checkpoint']!r}, this run {p['current']!r}"
            for p in problems
        )
        fields = sorted({p["field"] for p in problems})
        raise LoraConfigMismatchError(
            f"the LoRA config differs from {folder.name}'s: {lines}",
            where={"file": ", ".join(files) or str(folder), "field": ", ".join(fields)},
            next_step=(
                "Resume with the checkpoint's LoRA settings (the values after 'checkpoint' above), or train the new "
                "settings in another output_dir (or after trainguard.start_fresh(trainer)). To accept a difference "
                "on purpose, pass its field in ignore=[...]."
            ),
            evidence={"differences": problems, "checkpoint": str(folder)},
        )
    return warnings


def compare_adapter_weights(model: Any, checkpoint_dir: str | os.PathLike[str]) -> list[str]:
    """Confirm that each adapter's weights in ``model`` are the checkpoint's, value for value.

    Returns:
        One line per problem (an adapter with no weights file, a tensor missing from the model, another shape or
        other values); empty when every saved tensor is in the model unchanged.

    Example::

        problems = compare_adapter_weights(trainer.model, "out/checkpoint-50")
    """
    import torch

    folder = Path(checkpoint_dir)
    problems: list[str] = []
    adapters = list(getattr(model, "peft_config", {}) or {})
    for name in adapters:
        sub = folder if name == "default" else folder / name
        weights = next((sub / f for f in ADAPTER_WEIGHTS if (sub / f).is_file()), None)
        if weights is None:
            if any(folder.glob("pytorch_model_fsdp_*")):
                continue  # FSDP's sharded state dict holds the adapter in its own shards (the save audit's part)
            problems.append(f"adapter '{name}': no adapter weights in {sub}")
            continue
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            saved = load_file(str(weights))
        else:
            saved = torch.load(weights, map_location="cpu", weights_only=True)
        live = _adapter_state_dict(model, name)
        for key, tensor in saved.items():
            current = live.get(key)
            if current is None:
                problems.append(f"adapter '{name}': {key} is in the checkpoint but not in the model")
                continue
            if hasattr(current, "to_local"):
                current = current.to_local()  # FSDP2: this rank's shard
            current = current.detach().cpu()
            if current.numel() < tensor.numel():
                continue  # sharded (ZeRO-3 placeholder, an FSDP shard): not comparable on this rank alone
            if current.shape != tensor.shape:
                problems.append(
                    f"adapter '{name}': {key} has shape {tuple(current.shape)}, checkpoint {tuple(tensor.shape)}"
                )
            elif not torch.equal(current, tensor.to(current.dtype)):
                problems.append(f"adapter '{name}': {key} differs from the checkpoint's values")
    return problems


def _adapter_state_dict(model: Any, adapter_name: str) -> dict[str, Any]:
    try:
        from peft import PeftModel, get_peft_model_state_dict
    except ImportError:
        pass
    else:
        if isinstance(model, PeftModel):
            return dict(get_peft_model_state_dict(model, adapter_name=adapter_name))
    getter = getattr(model, "get_adapter_state_dict", None)  # transformers' PEFT integration
    if getter is not None:
        return dict(getter(adapter_name))
    return {}
