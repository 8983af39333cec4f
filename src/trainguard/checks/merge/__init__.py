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
from ...safe_fs import iter_files, load_json
from ..preflight import DEFAULT_MARGIN, DEFAULT_MARGIN_BYTES, check_disk_space, format_bytes, tokenizer_size

__all__ = [
    "STAGING_PREFIX",
    "VERSION_METADATA",
    "list_versions",
    "safe_merge",
]

from .readback import ADAPTER_WEIGHTS
from .readback import check_adapter as _check_adapter
from .readback import lora_targets as _lora_targets
from .readback import raise_unchanged as _raise_unchanged
from .readback import verify_saved as _verify_saved
from .tokenizer import check_version_tokenizer
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
    for path in iter_files(folder):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


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
    if not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHTS):
        raise CheckpointIntegrityError(
            f"the adapter folder has no weights ({' or '.join(ADAPTER_WEIGHTS)})",
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
    for note in check_version_tokenizer(adapter_dir, tokenizer, bool(_tokenizer_files(adapter_dir)), check_tokenizer):
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
                or getattr(getattr(base_model, "config", None), "name_or_path", "")
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
