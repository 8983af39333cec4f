"""Merge a LoRA adapter into its base model and publish the result as an immutable version ``v001``, ``v002``, ...

Merges fail in ways nobody notices until the model is served: a full disk leaves half a model (unsloth #534,
#1122), a save writes an almost empty file (peft #2054: a "40 KB" merged model), or the merged weights equal the
base because the adapter was never applied or never trained (unsloth #869). :func:`safe_merge` refuses each of
these before a version becomes visible:

1. pre-flight: the adapter folder is complete, and the versions folder's disk has room for the merged model plus a
   margin (before the base model is even loaded), and the tokenizer the version will hold (``tokenizer=``, or the
   checkpoint's tokenizer files) is the one the adapter was trained with (the tokenizer record DatasetGuard keeps in
   ``trainer_state.json``, else the checkpoint's tokenizer files): another vocabulary, EOS or chat template is
   refused before anything is written;
2. the adapter's tensors cover every LoRA layer the config creates and are finite;
3. the merge runs into a staging folder inside ``versions_dir`` (``.staging-<random>``, same filesystem);
4. the *saved* files are read back: every tensor of the base is there with its shape, every value is finite, and
   the weights of the layers the adapter targets changed;
5. ``trainguard-version.json`` (source, base, LoRA config, dataset fingerprint, metrics, UTC time, versions) and the
   checksum manifest are written, every file is fsynced;
6. the staging folder is renamed to the next free ``vNNN`` without ever replacing an existing folder.

On any failure the staging folder this call created is removed (it is ours, never the user's) and a
:class:`~trainguard.errors.TrainGuardError` says what happened; no partial version is left.

Example::

    from trainguard import safe_merge
    path = safe_merge("out/checkpoint-50", "models/base", "models/merged")   # -> models/merged/v001
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import platform
import secrets
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..._util import utc_now
from ...alerts import get_logger
from ...atomic import atomic_write_json, fsync_dir
from ...errors import (
    CheckpointIntegrityError,
    LoraConfigMismatchError,
    MalformedFileError,
    NonFiniteError,
    PreflightError,
    TrainGuardError,
    UnsafeFileError,
)
from ...safe_fs import load_json
from ..dataset.identity import stored_record
from ..preflight import DEFAULT_MARGIN, DEFAULT_MARGIN_BYTES, check_disk_space, format_bytes, tokenizer_size

__all__ = [
    "STAGING_PREFIX",
    "VERSION_METADATA",
    "list_versions",
    "safe_merge",
]

from .versions import (
    METADATA_FORMAT,
    STAGING_PREFIX,
    VERSION_METADATA,
    _rename_noreplace,  # noqa: F401 - tests race it
    list_versions,
)
from .versions import next_number as _next_number
from .versions import publish as _publish

PathLike = str | os.PathLike[str]

_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
# config.json, generation_config.json, the index of a sharded save, metadata and manifest: a few KB, rounded up.
_SMALL_FILES_BYTES = 256 * 1024


# -------------------------------------------------------------------------------------------------- helpers
def _is_enospc(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = load_json(path)
    except FileNotFoundError:
        raise CheckpointIntegrityError(
            f"{what} is missing: {path.name} not found",
            where={"file": str(path)},
            next_step="Pass the folder of a saved PEFT adapter (it holds adapter_config.json and "
            "adapter_model.safetensors), e.g. a Trainer checkpoint-N of a PEFT run.",
        ) from None
    except (MalformedFileError, UnsafeFileError) as exc:
        raise CheckpointIntegrityError(
            f"{what} is unreadable: {exc.what}",
            where=exc.where,
            next_step="Restore the file from the run that wrote it; it is not valid JSON.",
        ) from None
    except OSError as exc:
        raise CheckpointIntegrityError(
            f"{what} is unreadable: {exc}",
            where={"file": str(path)},
            next_step="Check the file's permissions and the storage it is on, then run again.",
        ) from None
    if not isinstance(value, dict):
        raise CheckpointIntegrityError(
            f"{what} must hold a JSON object, found {type(value).__name__}",
            where={"file": str(path)},
            next_step="Restore the file from the run that wrote it.",
        )
    return value


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    return files or sorted(p for p in folder.glob("*.bin") if p.name.startswith(("pytorch_model", "model")))


def _tokenizer_files(folder: Path) -> list[Path]:
    return [folder / name for name in _TOKENIZER_FILES if (folder / name).is_file()]


def _software() -> dict[str, str]:
    from ..._version import __version__

    versions = {"trainguard": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "safetensors"):
        module = sys.modules.get(name)
        versions[name] = str(getattr(module, "__version__", "not installed")) if module else "not installed"
    return versions


def _write_manifest(folder: Path, source_step: int | None) -> Path:
    # Imported here: the checkpoint module is only needed when a merge publishes.
    from ..checkpoint import write_manifest

    return write_manifest(folder, step=source_step, extra={"kind": "safe_merge version"})


def _fsync_tree(folder: Path) -> None:
    # save_pretrained does not fsync: a power loss after the rename could publish zero-length files.
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


# ------------------------------------------------------------------------------------------------- tokenizer
def _load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in ``folder`` (local files only), or None when it cannot be loaded."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # any loader failure: the comparison is skipped with a note, the merge goes on
        get_logger().warning("safe_merge: cannot load the tokenizer in %s to compare it (%s: %s)", folder,
                             type(exc).__name__, exc)  # fmt: skip
        return None


def _check_tokenizer(adapter_dir: Path, tokenizer: Any, has_files: bool, mode: str) -> list[str]:
    """Refuse a merge whose version would hold another tokenizer than the one the adapter was trained with.

    The reference: the tokenizer record DatasetGuard stored in the checkpoint's ``trainer_state.json``, else the
    checkpoint's tokenizer files (when ``tokenizer`` is given). The candidate: ``tokenizer``, else the checkpoint's
    tokenizer files (the version's copy of them; compared only with a record). Returns notes (nothing to compare).
    """
    from ..tokenizer import check_tokenizer, tokenizer_fingerprint

    if mode == "off":
        return []
    reference: dict[str, Any] | None = None
    source = ""
    state_path = adapter_dir / "trainer_state.json"
    if state_path.is_file():
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, TrainGuardError):
            record = stored_record(load_json(state_path))
            if record is not None and isinstance(record.get("tokenizer"), dict):
                reference, source = record["tokenizer"], "the tokenizer recorded in trainer_state.json"
    if reference is None and tokenizer is not None and has_files:
        saved = _load_tokenizer(adapter_dir)
        if saved is not None:
            reference, source = tokenizer_fingerprint(saved), "the tokenizer files of the adapter checkpoint"
    if reference is None and tokenizer is None and has_files:
        return []  # the version gets the checkpoint's own tokenizer files, and there is no record to hold them to
    if reference is None:
        return [f"{adapter_dir.name} holds no tokenizer record or loadable tokenizer files: the tokenizer is not "
                "compared"]  # fmt: skip
    if tokenizer is not None:
        current, what = tokenizer_fingerprint(tokenizer), "the tokenizer passed as tokenizer="
    elif has_files:
        loaded = _load_tokenizer(adapter_dir)
        if loaded is None:
            return [f"the tokenizer files of {adapter_dir.name} cannot be loaded: the tokenizer is not compared"]
        current, what = tokenizer_fingerprint(loaded), f"the tokenizer files in {adapter_dir.name}"
    else:
        return [f"no tokenizer will be saved with this version (none in {adapter_dir.name}, none given): pair it "
                "with the tokenizer the adapter was trained with"]  # fmt: skip
    file = state_path if source.endswith("trainer_state.json") else adapter_dir
    return check_tokenizer(
        reference,
        current,
        where={"file": str(file)},
        subject=f"refusing to merge {adapter_dir.name}: {what} is not {source}",
        next_step=(
            f"Pass the tokenizer the adapter was trained with (AutoTokenizer.from_pretrained({str(adapter_dir)!r}) "
            "when the Trainer saved it there), or check_tokenizer='warn' to publish this one anyway. Nothing was "
            "written."
        ),
        mode=mode,
    )


# ------------------------------------------------------------------------------------------------ base model
def _load_base(path: Path) -> Any:
    import transformers

    config_path = path / "config.json"
    config = _read_json(config_path, "the base model's config")
    architectures = config.get("architectures") or []
    cls = getattr(transformers, str(architectures[0]), None) if architectures else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    try:
        return cls.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointIntegrityError(
            f"the base model could not be loaded with {cls.__name__}.from_pretrained: {type(exc).__name__}: {exc}",
            where={"file": str(path)},
            next_step="Pass the folder of a complete saved base model, or load it yourself and pass the instance.",
        ) from exc


def _model_bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict().values():
        key = tensor.data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key in seen:
            continue  # tied weights are saved once
        seen.add(key)
        total += int(tensor.numel()) * int(tensor.element_size())
    return total


# ---------------------------------------------------------------------------------------------- the checks
def _check_adapter(peft_model: Any, adapter_dir: Path, adapter_name: str) -> None:
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


def _lora_targets(peft_model: Any, adapter_name: str) -> dict[str, dict[str, Any]]:
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


def _raise_unchanged(adapter_dir: Path, targets: dict[str, dict[str, Any]], *, all_zero: bool) -> None:
    cause = (
        "every lora_B matrix of the adapter is zero, so B @ A adds nothing: an untrained adapter (PEFT's default "
        "init sets B = 0), or a checkpoint saved before the first optimizer step"
        if all_zero
        else "the adapter's non-zero delta did not reach the saved weights (the adapter was not applied)"
    )
    weights = next((adapter_dir / n for n in _ADAPTER_WEIGHTS if (adapter_dir / n).is_file()), adapter_dir)
    raise CheckpointIntegrityError(
        f"weights did not change: none of the {len(targets)} layers the adapter targets differs from the base "
        f"model after merging; {cause}",
        where={"file": str(weights), "field": next(iter(targets))},
        next_step="Merge a checkpoint saved after training steps (its adapter_model.safetensors has non-zero "
        "lora_B), or pass allow_unchanged=True to publish a copy of the base on purpose. Nothing was published.",
        evidence={"adapter_layers": len(targets), "changed_layers": 0, "lora_B_all_zero": all_zero},
    )


def _verify_saved(
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
        _raise_unchanged(adapter_dir, targets, all_zero=not any(t["b_nonzero"] for t in targets.values()))
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


# ------------------------------------------------------------------------------------------------ safe_merge
def safe_merge(
    adapter_checkpoint: PathLike,
    base_model: Any,
    versions_dir: PathLike,
    *,
    dataset_fingerprint: str | Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    check_tokenizer: str = "raise",
    allow_unchanged: bool = False,
    disk_margin: float = DEFAULT_MARGIN,
    disk_margin_bytes: int = DEFAULT_MARGIN_BYTES,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Merge a LoRA adapter into its base model and publish it as the next immutable version under
    ``versions_dir`` (``v001``, ``v002``, ...), checked before it becomes visible.

    Disk: the merged model is written once, into ``versions_dir`` (staging and version share the filesystem, so
    publishing is a rename, not a copy), so the pre-flight asks for 1x the merged size (+ tokenizer and small
    files) + margin. The origin's "3x model size" counted a backup and the old model on the same disk during an
    in-place consolidation; versions here are never overwritten or moved, so neither copy exists. The base model
    is read from its own folder and needs no space in ``versions_dir``.

    Args:
        adapter_checkpoint: A folder holding ``adapter_config.json`` and ``adapter_model.safetensors`` (a PEFT
            ``save_pretrained`` folder or a Trainer ``checkpoint-N`` of a PEFT run).
        base_model: The base model: a local folder of a saved model (loaded with the class in its
            ``config.json``), or a loaded ``PreTrainedModel``. An instance is merged in place (PEFT's
            ``merge_and_unload`` changes its layers); do not reuse it as a base afterwards.
        versions_dir: The folder of versions (created if missing).
        dataset_fingerprint: The training data's fingerprint (``trainguard.dataset_fingerprint(...)`` or any
            string or JSON-able mapping), recorded in the metadata.
        metrics: Evaluation results to record (JSON-able mapping).
        metadata: Any other JSON-able fields to record under ``"extra"``.
        tokenizer: A tokenizer or processor to save with the version. Default: the tokenizer files found in
            ``adapter_checkpoint`` are copied.
        check_tokenizer: The version's tokenizer (``tokenizer``, else the checkpoint's files) against the one the
            adapter was trained with (DatasetGuard's record in the checkpoint's ``trainer_state.json``, else the
            checkpoint's tokenizer files): ``"raise"`` (default: refused before anything is written), ``"warn"``
            (logged) or ``"off"``.
        allow_unchanged: Publish even when no weight changed (default False: that is the "adapter never applied /
            never trained" failure).
        disk_margin: Extra free space as a fraction of the merged size (default 0.10).
        disk_margin_bytes: The least extra free space (default 64 MiB).
        max_shard_size: Passed to ``save_pretrained``.

    Returns:
        The new version folder.

    Raises:
        PreflightError: Not enough free space (before loading anything), or the disk filled during the save.
        CheckpointIntegrityError: The adapter folder is incomplete or unreadable, the base cannot be loaded, the
            saved model is incomplete or has wrong shapes, or no weight changed ("weights did not change").
        LoraConfigMismatchError: The adapter does not fit this base (missing target modules, other shapes, LoRA
            tensors missing from the file).
        NonFiniteError: The adapter or the merged weights hold NaN/Inf.
        TokenizerMismatchError: The version's tokenizer is not the one the adapter was trained with (vocabulary,
            merges, special tokens, EOS/PAD/BOS, chat template, padding side), naming each changed field; nothing
            was written.

    Example::

        version = safe_merge("out/checkpoint-50", "models/llama-base", "models/merged", metrics={"eval_loss": 1.2})
        print(version, json.loads((version / "trainguard-version.json").read_text())["source_checkpoint"])
    """
    adapter_dir = Path(adapter_checkpoint)
    versions = Path(versions_dir)
    if not adapter_dir.is_dir():
        raise CheckpointIntegrityError(
            f"adapter_checkpoint is not a folder: {adapter_dir}",
            where={"file": str(adapter_dir)},
            next_step="Pass the folder of a saved PEFT adapter (adapter_config.json + adapter_model.safetensors).",
        )
    adapter_config = _read_json(adapter_dir / "adapter_config.json", "the adapter's adapter_config.json")
    if not any((adapter_dir / name).is_file() for name in _ADAPTER_WEIGHTS):
        raise CheckpointIntegrityError(
            f"the adapter folder has no weights ({' or '.join(_ADAPTER_WEIGHTS)})",
            where={"file": str(adapter_dir)},
            next_step="Pass a folder the PEFT run saved completely (a verified checkpoint).",
        )
    if str(adapter_config.get("peft_type", "LORA")).upper() not in ("LORA", "ADALORA"):
        raise LoraConfigMismatchError(
            f"safe_merge merges LoRA adapters; this adapter is {adapter_config.get('peft_type')!r}",
            where={"file": str(adapter_dir / "adapter_config.json"), "field": "peft_type"},
            next_step="Use the merge method of that PEFT type.",
        )
    if versions.exists() and not versions.is_dir():
        raise PreflightError(
            f"versions_dir exists and is not a folder: {versions}",
            where={"file": str(versions)},
            next_step="Pass a folder path for the versions.",
        )
    base_is_path = isinstance(base_model, (str, os.PathLike))
    base_path = Path(base_model) if base_is_path else None
    if base_path is not None and not (base_path / "config.json").is_file():
        raise CheckpointIntegrityError(
            f"base_model is not a saved model folder (no config.json): {base_path}",
            where={"file": str(base_path)},
            next_step="Pass the local folder of the base model (save_pretrained output), or a loaded model.",
        )
    if not base_is_path and (not hasattr(base_model, "state_dict") or hasattr(base_model, "peft_config")):
        raise TypeError(
            "base_model must be a path to a saved model or a plain (not PEFT-wrapped) PreTrainedModel; got "
            f"{type(base_model).__name__}"
        )

    # 1. The tokenizer the version will hold, then the disk pre-flight, before loading anything large.
    if check_tokenizer not in ("raise", "warn", "off"):
        raise ValueError(f"check_tokenizer must be 'raise', 'warn' or 'off', not {check_tokenizer!r}")
    for note in _check_tokenizer(adapter_dir, tokenizer, bool(_tokenizer_files(adapter_dir)), check_tokenizer):
        # a mismatch let through by check_tokenizer="warn" is a warning; "nothing to compare" is a note
        get_logger().log(logging.WARNING if note.startswith("refusing") else logging.INFO, "safe_merge: %s", note)
    tok_files = _tokenizer_files(adapter_dir) if tokenizer is None else []
    tok_bytes = sum(p.stat().st_size for p in tok_files) if tokenizer is None else tokenizer_size(tokenizer)
    if base_path is not None:
        merged_bytes = sum(p.stat().st_size for p in _weight_files(base_path))
    else:
        merged_bytes = _model_bytes(base_model)
    required = merged_bytes + tok_bytes + _SMALL_FILES_BYTES
    check_disk_space(
        versions,
        required,
        margin=disk_margin,
        margin_bytes=disk_margin_bytes,
        purpose=f"the merged model ({format_bytes(merged_bytes)} of weights, 1x the base's size)",
    )

    # 2. Load, check the adapter, merge in memory.
    from peft import PeftModel

    base = _load_base(base_path) if base_path is not None else base_model
    state = base.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    by_storage: dict[tuple[int, tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in state.items():
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident in by_storage:
            aliases[key], aliases[by_storage[ident]] = by_storage[ident], key  # tied: either name may be saved
        else:
            by_storage[ident] = key
    del state
    adapter_name = "default"
    try:
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=adapter_name)
    except Exception as exc:
        raise LoraConfigMismatchError(
            f"the adapter does not fit this base model: {type(exc).__name__}: {exc}",
            where={"file": str(adapter_dir / "adapter_config.json"), "field": "target_modules"},
            next_step="Merge the adapter into the base model it was trained on "
            f"(adapter_config.json names {adapter_config.get('base_model_name_or_path')!r}).",
        ) from exc
    _check_adapter(peft_model, adapter_dir, adapter_name)
    targets = _lora_targets(peft_model, adapter_name)
    if targets and not allow_unchanged and not any(t["b_nonzero"] for t in targets.values()):
        # Fail before writing anything; the read-back check below still guards the saved files.
        _raise_unchanged(adapter_dir, targets, all_zero=True)
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as exc:
        if "nan" in str(exc).lower():
            raise NonFiniteError(
                f"merging produced NaN weights: {exc}",
                where={"file": str(adapter_dir)},
                next_step="Merge an earlier checkpoint of the run.",
            ) from exc
        raise

    # 3-6. Stage, verify, describe, publish.
    versions.mkdir(parents=True, exist_ok=True)
    staging = versions / f"{STAGING_PREFIX}{secrets.token_hex(6)}"
    staging.mkdir()
    try:
        merged.save_pretrained(str(staging), max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        for path in tok_files:
            shutil.copyfile(path, staging / path.name)
        report = _verify_saved(adapter_dir, staging, expected, aliases, targets, allow_unchanged=allow_unchanged)
        trainer_state = adapter_dir / "trainer_state.json"
        source_step = None
        if trainer_state.is_file():
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, OverflowError, TrainGuardError):
                source_step = int(load_json(trainer_state).get("global_step"))
        base_name = (
            str(base_path.resolve())
            if base_path is not None
            else str(
                getattr(base_model, "name_or_path", "")
                or getattr(getattr(base_model, "config", None), "_name_or_path", "")
            )
        )
        record = {
            "format": METADATA_FORMAT,
            "created_utc": utc_now(),
            "source_checkpoint": str(adapter_dir.resolve()),
            "source_step": source_step,
            "base_model": {
                "name_or_path": base_name or None,
                "class": type(merged).__name__,
                "dtype": str(next(iter(merged.parameters())).dtype).replace("torch.", ""),
                "parameters": int(sum(p.numel() for p in merged.parameters())),
            },
            "lora_config": adapter_config,
            "dataset_fingerprint": dict(dataset_fingerprint)
            if isinstance(dataset_fingerprint, Mapping)
            else dataset_fingerprint,
            "metrics": dict(metrics) if metrics is not None else None,
            "merge_checks": report,
            "software": _software(),
            "extra": dict(metadata) if metadata is not None else {},
        }
        try:
            atomic_write_json(staging / VERSION_METADATA, record)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metrics, metadata and dataset_fingerprint must be JSON-able: {exc}") from exc
        manifest = _write_manifest(staging, source_step)
        _fsync_tree(staging)
        target = _publish(staging, versions, start=_next_number(versions))
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)  # ours alone: created by this call a moment ago
        if isinstance(exc, TrainGuardError) or not _is_enospc(exc):
            raise
        free = shutil.disk_usage(versions).free
        raise PreflightError(
            f"the disk filled while the merged model was being written ({type(exc).__name__}: {exc}); "
            f"{format_bytes(free)} free after removing the staging folder",
            where={"file": str(versions)},
            next_step=f"Free at least {format_bytes(required)} plus margin on the disk holding {versions} and merge "
            "again; nothing was published and the staging folder was removed.",
            evidence={"required_bytes": required, "free_bytes": free},
        ) from exc
    get_logger().info(
        "safe_merge: published %s (%d tensors, %d/%d adapter layers changed, manifest %s)",
        target,
        report["tensors"],
        report["changed_layers"],
        report["adapter_layers"],
        manifest.name,
    )
    return target
