"""The merge's checks on the adapter and on what was saved: the adapter loaded into the base is the checkpoint's
(every LoRA weight restored), and the merged model read back from disk holds the merged weights, finite, not the
base's unchanged (:func:`~trainguard.checks.merge.safe_merge` steps 2 and 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...alerts import get_logger
from ...errors import CheckpointIntegrityError, LoraConfigMismatchError, NonFiniteError

__all__ = ["ADAPTER_WEIGHTS", "check_adapter", "lora_targets", "raise_unchanged", "verify_saved"]

#: The adapter weight files peft writes, preferred first.
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter(peft_model: Any, adapter_dir: Path, adapter_name: str) -> None:
    """Every LoRA tensor the config created was in the adapter file, and every one is finite."""
    import torch

    model_keys = {}
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            model_keys[name.replace(f".{adapter_name}.", ".")] = (name, param)
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            file_keys = set(fh.keys())
        missing = sorted(k for k in model_keys if k not in file_keys)
        if missing:
            raise LoraConfigMismatchError(
                f"the adapter file lacks {len(missing)} of the {len(model_keys)} LoRA tensors its config creates "
                f"on this base (first: {missing[0]}); peft would merge them as freshly initialised layers",
                where={"file": str(weights), "field": "target_modules"},
                next_step="Merge the adapter into the base model it was trained on, with the adapter_config.json "
                "it was saved with.",
                evidence={"missing": missing[:20], "missing_count": len(missing)},
            )
    for key, (_name, param) in model_keys.items():
        if not bool(torch.isfinite(param.detach()).all()):
            bad = int((~torch.isfinite(param.detach())).sum())
            raise NonFiniteError(
                f"the adapter holds non-finite values: {key} has {bad} NaN/Inf value(s); merging would poison the "
                "base weights",
                where={"file": str(weights if weights.is_file() else adapter_dir), "field": key},
                next_step="Merge an earlier checkpoint of the run saved before the values diverged.",
                evidence={"tensor": key, "non_finite": bad, "numel": int(param.numel())},
            )


def lora_targets(peft_model: Any, adapter_name: str) -> dict[str, dict[str, Any]]:
    """For each layer the adapter wraps: the merged model's weight key, a copy of the base weight, and whether
    its B matrix is non-zero (the delta is B @ A; B starts at zero under PEFT's default init)."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.get_base_model()
    targets: dict[str, dict[str, Any]] = {}
    for name, module in inner.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base_layer = module.get_base_layer()
        weight = getattr(base_layer, "weight", None)
        if weight is None:
            continue
        b_nonzero = False
        for attr in ("lora_B", "lora_embedding_B"):
            container = getattr(module, attr, None)
            if container is not None and adapter_name in container:
                b = container[adapter_name]
                b_tensor = b.weight if hasattr(b, "weight") else b
                b_nonzero = b_nonzero or bool((b_tensor.detach() != 0).any())
        targets[f"{name}.weight"] = {"base": weight.detach().clone(), "b_nonzero": b_nonzero}
    return targets


def raise_unchanged(adapter_dir: Path, targets: dict[str, dict[str, Any]], *, all_zero: bool) -> None:
    cause = (
        "every lora_B matrix of the adapter is zero, so B @ A adds nothing: an untrained adapter (PEFT's default "
        "init sets B = 0), or a checkpoint saved before the first optimizer step"
        if all_zero
        else "the adapter's non-zero delta did not reach the saved weights (the adapter was not applied)"
    )
    weights = next((adapter_dir / n for n in ADAPTER_WEIGHTS if (adapter_dir / n).is_file()), adapter_dir)
    raise CheckpointIntegrityError(
        f"weights did not change: none of the {len(targets)} layers the adapter targets differs from the base "
        f"model after merging; {cause}",
        where={"file": str(weights), "field": next(iter(targets))},
        next_step="Merge a checkpoint saved after training steps (its adapter_model.safetensors has non-zero "
        "lora_B), or pass allow_unchanged=True to publish a copy of the base on purpose. Nothing was published.",
        evidence={"adapter_layers": len(targets), "changed_layers": 0, "lora_B_all_zero": all_zero},
    )


def verify_saved(
    adapter_dir: Path,
    folder: Path,
    expected: dict[str, tuple[int, ...]],
    aliases: dict[str, str],
    targets: dict[str, dict[str, Any]],
    *,
    allow_unchanged: bool,
) -> dict[str, Any]:
    """Read the saved weights back: complete, right shapes, finite, changed where the adapter applies."""
    import torch
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointIntegrityError(
            "the merged model was saved without any weights file",
            where={"file": str(folder)},
            next_step="Check the transformers version and the disk; nothing was published.",
        )
    saved: dict[str, tuple[int, ...]] = {}
    changed: list[str] = []
    unchanged: list[str] = []
    max_delta = 0.0
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open handles are not mappings
                tensor = fh.get_tensor(key)
                shape = tuple(tensor.shape)
                if key not in expected:
                    raise CheckpointIntegrityError(
                        f"the merged model holds a tensor the base model does not have: {key} {list(shape)} "
                        "(LoRA layers left unmerged?)",
                        where={"file": str(path), "field": key},
                        next_step="Report this with the peft and transformers versions; nothing was published.",
                    )
                if shape != expected[key]:
                    raise CheckpointIntegrityError(
                        f"the merged tensor {key} has shape {list(shape)}, the base model's has {list(expected[key])}",
                        where={"file": str(path), "field": key},
                        next_step="Report this with the peft and transformers versions; nothing was published.",
                    )
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise NonFiniteError(
                        f"the merged tensor {key} holds {bad} NaN/Inf value(s)",
                        where={"file": str(path), "field": key},
                        next_step="Merge an earlier checkpoint of the run; this adapter drives the base to non-finite "
                        "values. Nothing was published.",
                        evidence={"tensor": key, "non_finite": bad},
                    )
                saved[key] = shape
                if key in targets:
                    base = targets[key]["base"].to(tensor.dtype)
                    if torch.equal(tensor, base):
                        unchanged.append(key)
                    else:
                        changed.append(key)
                        delta = float((tensor.float() - base.float()).abs().max())
                        max_delta = max(max_delta, delta)
    missing = sorted(k for k in expected if k not in saved and aliases.get(k) not in saved)
    if missing:
        raise CheckpointIntegrityError(
            f"the merged model is incomplete: {len(missing)} of {len(expected)} base tensors were not saved "
            f"(first: {missing[0]})",
            where={"file": str(folder), "field": missing[0]},
            next_step="Check free space and the transformers version, then merge again; nothing was published.",
            evidence={"missing": missing[:20], "missing_count": len(missing), "saved_count": len(saved)},
        )
    if targets and not changed and not allow_unchanged:
        raise_unchanged(adapter_dir, targets, all_zero=not any(t["b_nonzero"] for t in targets.values()))
    if unchanged:
        get_logger().warning(
            "safe_merge: %d of %d adapter layers left their base weight unchanged (first: %s)",
            len(unchanged),
            len(targets),
            unchanged[0],
        )
    return {
        "tensors": len(saved),
        "base_tensors": len(expected),
        "adapter_layers": len(targets),
        "changed_layers": len(changed),
        "unchanged_layers": unchanged[:20],
        "max_abs_delta": max_delta,
        "finite": True,
    }
