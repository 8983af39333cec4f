"""Disk and memory pre-flight checks, and the size of what a run will write.

Users lose runs to a full disk at the *last* checkpoint of a long run (SimpleTuner #2353, LlamaFactory #5155) and
to merges that die half-written on a full disk (unsloth #534, #1122). The functions here answer "will it fit?"
before the work starts:

- :func:`check_disk_space`: free space on the filesystem that holds a path against what will be written.
- :func:`check_memory`: available RAM against a threshold.
- :func:`gpu_memory_summary`: free and total memory of each CUDA device (empty without CUDA).
- :func:`estimate_checkpoint_size` and :func:`planned_checkpoints`: what one Trainer checkpoint weighs and how many
  of them will be on disk at once, from plain numbers (parameter bytes, optimizer name, save settings).
- :func:`param_stats` and :func:`directory_size`: those plain numbers, read from a model or a folder.

Nothing here imports torch or transformers; a model is only iterated (``named_parameters``).

Example::

    from trainguard import check_disk_space
    check_disk_space("out/", required_bytes=40 * 2**30)   # PreflightError naming needed and free when short
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PreflightError

__all__ = [
    "CheckpointEstimate",
    "DiskSpace",
    "MemoryStatus",
    "ParamStats",
    "check_disk_space",
    "check_memory",
    "describe_args",
    "directory_size",
    "estimate_checkpoint_size",
    "format_bytes",
    "gpu_memory_summary",
    "optimizer_state_bytes",
    "param_stats",
    "planned_checkpoints",
    "tokenizer_size",
]

PathLike = str | os.PathLike[str]

#: Default fractional safety margin on top of an estimate: estimates miss files (README, logs, caches).
DEFAULT_MARGIN = 0.10
#: Default fixed safety margin: a disk filled to the last byte breaks logging, alerts and other processes too.
DEFAULT_MARGIN_BYTES = 64 * 2**20
#: The origin's rule "RAM < 85 % used": refuse when less than 15 % of the RAM is available.
DEFAULT_MIN_AVAILABLE_MEMORY = 0.15

# Files of a Trainer checkpoint whose size does not depend on the model: scheduler.pt (~1.5 KB), rng_state.pth
# (~15 KB with CUDA states), training_args.bin (~5 KB), config.json, generation_config.json, trainer_state.json's
# fixed part. Measured 23 KB on transformers 5.24; rounded up.
_FIXED_CHECKPOINT_BYTES = 32 * 1024
# trainer_state.json grows by about this much per logged step (one log_history entry).
_BYTES_PER_LOG_ENTRY = 256
# safetensors header entry per tensor (name, dtype, shape, offsets), and torch.save's per-tensor record overhead.
_SAFETENSORS_BYTES_PER_TENSOR = 128
_TORCH_SAVE_BYTES_PER_TENSOR = 1024
# Filesystems allocate whole blocks: a checkpoint of ~10 files wastes up to a block each.
_FILES_PER_CHECKPOINT = 10
_BLOCK = 4096


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: a size a person reads at a glance (binary units, like ``df -h``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - loop always returns


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself, or its nearest existing parent: a run's output_dir usually does not exist yet."""
    current = path.absolute()
    while not current.exists():
        if current.parent == current:
            break
        current = current.parent
    return current


def _margin_bytes(required: int, margin: float, margin_bytes: int) -> int:
    return max(math.ceil(required * margin), int(margin_bytes))


# ------------------------------------------------------------------------------------------------------- disk
@dataclass(frozen=True)
class DiskSpace:
    """The outcome of :func:`check_disk_space`.

    Attributes:
        path: The path asked about.
        checked_path: The existing folder whose filesystem was measured (``path`` or its nearest parent).
        free_bytes: Space this (unprivileged) process may still write there.
        total_bytes: Size of the filesystem.
        required_bytes: What the caller said will be written.
        needed_bytes: ``required_bytes`` plus the margin: what must be free.
    """

    path: str
    checked_path: str
    free_bytes: int
    total_bytes: int
    required_bytes: int
    needed_bytes: int

    @property
    def ok(self) -> bool:
        return self.free_bytes >= self.needed_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "free": format_bytes(self.free_bytes), "needed": format_bytes(self.needed_bytes)}


def check_disk_space(
    path: PathLike,
    required_bytes: int = 0,
    *,
    margin: float = DEFAULT_MARGIN,
    margin_bytes: int = DEFAULT_MARGIN_BYTES,
    purpose: str = "this",
    raise_error: bool = True,
) -> DiskSpace:
    """Check that the filesystem holding ``path`` has room for ``required_bytes`` plus a margin.

    ``path`` need not exist yet (a new run's ``output_dir``): its nearest existing parent is measured. Free space is
    what an unprivileged process may write (``shutil.disk_usage(...).free``, i.e. ``f_bavail``), not the blocks
    reserved for root.

    Args:
        path: Where the data will be written.
        required_bytes: How much will be written.
        margin: Extra room as a fraction of ``required_bytes`` (default 10 %: estimates miss small files).
        margin_bytes: The least extra room, in bytes (default 64 MiB: a disk filled to the last byte also breaks
            logs, alerts and every other process on it). The margin is the larger of the two.
        purpose: What the space is for, used in the message ("3 checkpoints of 1.2 GiB each").
        raise_error: When False, return the :class:`DiskSpace` without raising.

    Returns:
        The measurement; ``.ok`` says whether it fits.

    Raises:
        PreflightError: Less is free than ``required_bytes`` plus the margin; the message names the path, what is
            needed and what is free, in human units, and the evidence holds the byte counts.
        ValueError: ``required_bytes``, ``margin`` or ``margin_bytes`` is negative.

    Example::

        check_disk_space("/data/run1", required_bytes=3 * 15 * 2**30, purpose="3 checkpoints")
    """
    if required_bytes < 0 or margin < 0 or margin_bytes < 0:
        raise ValueError("required_bytes, margin and margin_bytes must not be negative")
    target = Path(path)
    checked = _existing_ancestor(target)
    usage = shutil.disk_usage(checked)
    needed = int(required_bytes) + _margin_bytes(int(required_bytes), margin, margin_bytes)
    result = DiskSpace(
        path=str(target),
        checked_path=str(checked),
        free_bytes=int(usage.free),
        total_bytes=int(usage.total),
        required_bytes=int(required_bytes),
        needed_bytes=needed,
    )
    if raise_error and not result.ok:
        raise PreflightError(
            f"not enough free disk space for {purpose}: needs {format_bytes(needed)} "
            f"({format_bytes(required_bytes)} + margin), {format_bytes(result.free_bytes)} free",
            where={"file": str(target), "filesystem": str(checked)},
            next_step=(
                f"Free at least {format_bytes(needed - result.free_bytes)} on the filesystem holding {checked}, "
                "write to a larger disk, or lower what is written (fewer kept checkpoints with save_total_limit, "
                "save_only_model=True)."
            ),
            evidence=result.to_dict(),
        )
    return result


def directory_size(path: PathLike) -> int:
    """Bytes a folder occupies on disk (whole blocks, like ``du``; at least the files' sizes). 0 when missing."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue  # removed while we walked (rotation): it no longer takes space
            total += max(st.st_size, getattr(st, "st_blocks", 0) * 512)
    return total


# ----------------------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryStatus:
    """The outcome of :func:`check_memory`: RAM sizes in bytes and the threshold that applied."""

    total_bytes: int
    available_bytes: int
    min_available_bytes: int
    gpus: list[dict[str, Any]] = field(default_factory=list)

    @property
    def available_fraction(self) -> float:
        return self.available_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def ok(self) -> bool:
        return self.available_bytes >= self.min_available_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "available_fraction": round(self.available_fraction, 4),
            "available": format_bytes(self.available_bytes),
            "total": format_bytes(self.total_bytes),
        }


def gpu_memory_summary() -> list[dict[str, Any]]:
    """Free and total memory of every visible CUDA device, from ``torch.cuda.mem_get_info``.

    Returns an empty list when torch is not installed or no CUDA device is visible (the check is then skipped).

    Example::

        for gpu in gpu_memory_summary():
            print(gpu["index"], gpu["name"], gpu["free"], "of", gpu["total"])
    """
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus: list[dict[str, Any]] = []
    for index in range(torch.cuda.device_count()):
        try:
            free, total = torch.cuda.mem_get_info(index)
            name = torch.cuda.get_device_name(index)
        except Exception as exc:  # a broken device must not stop the summary of the others
            gpus.append({"index": index, "error": f"{type(exc).__name__}: {exc}"})
            continue
        gpus.append(
            {
                "index": index,
                "name": name,
                "free_bytes": int(free),
                "total_bytes": int(total),
                "free": format_bytes(free),
                "total": format_bytes(total),
            }
        )
    return gpus


def check_memory(
    min_available_fraction: float | None = DEFAULT_MIN_AVAILABLE_MEMORY,
    min_available_bytes: int | None = None,
    *,
    raise_error: bool = True,
    include_gpus: bool = True,
) -> MemoryStatus:
    """Check that enough system RAM is available (``psutil.virtual_memory().available``).

    Available memory counts page cache the kernel can drop, so a machine that merely cached files passes; a
    machine where another job holds the RAM does not. The threshold is the larger of the two limits given.

    Args:
        min_available_fraction: The least share of total RAM that must be available (default 0.15: the origin's
            "RAM < 85 % used" rule; a Trainer's dataloader workers, tokenisation and checkpoint serialisation all
            need host RAM, and the kernel's OOM killer ends a run without a Python traceback). None: no share.
        min_available_bytes: The least available RAM in bytes. None: no absolute floor.
        raise_error: When False, return the :class:`MemoryStatus` without raising.
        include_gpus: Add :func:`gpu_memory_summary` to the result (reported, never refused on).

    Raises:
        PreflightError: Less RAM is available than the threshold; names both in human units, bytes in evidence.
        ValueError: ``min_available_fraction`` is outside [0, 1] or ``min_available_bytes`` is negative.

    Example::

        status = check_memory(min_available_fraction=0.15)
        print(status.available_fraction, status.gpus)
    """
    import psutil

    if min_available_fraction is not None and not 0.0 <= min_available_fraction <= 1.0:
        raise ValueError(f"min_available_fraction must be within [0, 1], got {min_available_fraction!r}")
    if min_available_bytes is not None and min_available_bytes < 0:
        raise ValueError(f"min_available_bytes must not be negative, got {min_available_bytes!r}")
    vm = psutil.virtual_memory()
    limits = [0]
    if min_available_fraction is not None:
        limits.append(math.ceil(vm.total * min_available_fraction))
    if min_available_bytes is not None:
        limits.append(int(min_available_bytes))
    status = MemoryStatus(
        total_bytes=int(vm.total),
        available_bytes=int(vm.available),
        min_available_bytes=max(limits),
        gpus=gpu_memory_summary() if include_gpus else [],
    )
    if raise_error and not status.ok:
        raise PreflightError(
            f"not enough free RAM: {format_bytes(status.available_bytes)} available "
            f"({status.available_fraction:.0%} of {format_bytes(status.total_bytes)}), "
            f"needs at least {format_bytes(status.min_available_bytes)}",
            where={"host": os.uname().nodename if hasattr(os, "uname") else "?"},
            next_step=(
                "Stop the processes holding the RAM (see `top`/`ps aux --sort=-rss`), lower dataloader workers, or "
                "relax the threshold (PreflightGuard(min_available_memory=...) or None to skip the RAM check)."
            ),
            evidence=status.to_dict(),
        )
    return status


# ------------------------------------------------------------------------------------------ checkpoint sizing
@dataclass(frozen=True)
class ParamStats:
    """Parameter sizes of a model, as a Trainer checkpoint will store them.

    Attributes:
        saved_bytes / saved_tensors: What ``save_pretrained`` writes: every parameter of a full model; only the
            adapter (and ``modules_to_save``) parameters of a PEFT model.
        trainable_bytes / trainable_tensors: Parameters with ``requires_grad``; the optimizer keeps state for these.
        total_params / trainable_params: Element counts.
        adapter_only: True for a PEFT model (only the adapter is saved).
    """

    saved_bytes: int
    saved_tensors: int
    trainable_bytes: int
    trainable_tensors: int
    total_params: int
    trainable_params: int
    adapter_only: bool


def _is_peft_model(model: Any) -> bool:
    # Duck-typed so peft need not be installed: PeftModel has peft_config and get_base_model.
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def param_stats(model: Any) -> ParamStats:
    """Read :class:`ParamStats` from a model (shared/tied parameters counted once, as ``save_pretrained`` does).

    Example::

        stats = param_stats(trainer.model); print(stats.saved_bytes, stats.trainable_params)
    """
    adapter_only = _is_peft_model(model)
    saved_bytes = saved_tensors = trainable_bytes = trainable_tensors = total = trainable = 0
    for name, param in model.named_parameters():  # named_parameters() yields a shared parameter once
        nbytes = int(param.numel()) * int(param.element_size())
        total += int(param.numel())
        is_trainable = bool(param.requires_grad)
        if is_trainable:
            trainable += int(param.numel())
            trainable_bytes += nbytes
            trainable_tensors += 1
        if not adapter_only or is_trainable or "lora_" in name:
            saved_bytes += nbytes
            saved_tensors += 1
    return ParamStats(
        saved_bytes=saved_bytes,
        saved_tensors=saved_tensors,
        trainable_bytes=trainable_bytes,
        trainable_tensors=trainable_tensors,
        total_params=total,
        trainable_params=trainable,
        adapter_only=adapter_only,
    )


# optim name fragment -> (state tensors per parameter, bytes per state element; None = the parameter's own size).
# torch optimizers create their state with zeros_like(param), so it has the parameter's dtype.
_OPTIM_STATES: tuple[tuple[str, int, int | None], ...] = (
    ("lion_8bit", 1, 1),
    ("8bit", 2, 1),  # bitsandbytes 8-bit Adam/AdamW: two uint8 states (+ small blockwise scales)
    ("adafactor", 0, None),  # factored second moment: O(rows + cols), no first moment by default
    ("lomo", 0, None),  # LOMO/AdaLomo fuse the update into backward; no per-parameter state
    ("lion", 1, None),  # one momentum buffer
    ("sgd", 1, None),  # momentum buffer (none when momentum=0; counted so the estimate errs on the safe side)
    ("adagrad", 1, None),
    ("rmsprop", 1, None),
)


def optimizer_state_bytes(optim: str, trainable_bytes: int, trainable_params: int) -> int:
    """Bytes of optimizer state per checkpoint for the Trainer's ``optim`` name.

    AdamW and Adam (every ``adamw_*`` / ``adam*`` name) and any name not known here: two states the size of the
    trainable parameters. 8-bit variants: two (Lion: one) bytes per parameter. Lion, SGD, Adagrad, RMSprop: one
    state. Adafactor and LOMO: none (their small factored state is covered by the margin).

    Example::

        optimizer_state_bytes("adamw_torch", trainable_bytes=4 * 10**6, trainable_params=10**6)  # 8_000_000
    """
    name = str(getattr(optim, "value", optim)).lower()
    for fragment, states, bytes_per in _OPTIM_STATES:
        if fragment in name:
            if bytes_per is None:
                return states * int(trainable_bytes)
            return states * bytes_per * int(trainable_params)
    return 2 * int(trainable_bytes)


@dataclass(frozen=True)
class CheckpointEstimate:
    """What one Trainer checkpoint will weigh, by part (bytes)."""

    weights_bytes: int
    optimizer_bytes: int
    other_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.optimizer_bytes + self.other_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes, "total": format_bytes(self.total_bytes)}


def estimate_checkpoint_size(
    stats: ParamStats,
    *,
    optim: str = "adamw_torch",
    save_only_model: bool = False,
    tokenizer_bytes: int = 0,
    log_entries: int = 0,
) -> CheckpointEstimate:
    """Estimate the size of one ``checkpoint-N`` folder written by ``Trainer._save_checkpoint``.

    weights (what ``save_pretrained`` writes) + optimizer state (see :func:`optimizer_state_bytes`; none with
    ``save_only_model``) + scheduler, RNG, ``training_args.bin``, configs and ``trainer_state.json`` (a few tens of
    KB, growing with the log history) + the tokenizer files + block rounding. Measured against real checkpoints of
    the tiny test Llama it is within +15 % (it errs on the large side).

    Args:
        stats: From :func:`param_stats`.
        optim: ``TrainingArguments.optim``.
        save_only_model: ``TrainingArguments.save_only_model``.
        tokenizer_bytes: Size of the tokenizer files saved with each checkpoint (0 without a processing class).
        log_entries: Log-history entries ``trainer_state.json`` will hold by the last save.

    Example::

        est = estimate_checkpoint_size(param_stats(model), optim=args.optim); print(est.total_bytes)
    """
    weights = stats.saved_bytes + stats.saved_tensors * _SAFETENSORS_BYTES_PER_TENSOR
    optimizer = 0
    other = int(tokenizer_bytes) + _FILES_PER_CHECKPOINT * _BLOCK + max(0, int(log_entries)) * _BYTES_PER_LOG_ENTRY
    other += _FIXED_CHECKPOINT_BYTES
    if not save_only_model:
        optimizer = optimizer_state_bytes(optim, stats.trainable_bytes, stats.trainable_params)
        optimizer += stats.trainable_tensors * _TORCH_SAVE_BYTES_PER_TENSOR
    return CheckpointEstimate(weights_bytes=weights, optimizer_bytes=optimizer, other_bytes=other)


def _remaining_saves(
    save_strategy: str,
    *,
    save_steps: float,
    max_steps: int,
    start_step: int,
    num_epochs: int,
    epochs_done: int,
    eval_strategy: str,
    eval_steps: float,
) -> int:
    def every(interval: float) -> int:
        # DefaultFlowCallback: a float below 1 is a fraction of max_steps; saves at multiples, and at the last step.
        n = math.ceil(max_steps * interval) if interval < 1 else int(interval)
        if n <= 0 or max_steps <= start_step:
            return 0
        count = max_steps // n - start_step // n
        if max_steps % n:
            count += 1
        return max(0, count)

    if save_strategy == "no":
        return 0
    if save_strategy == "steps":
        return every(save_steps)
    if save_strategy == "epoch":
        return max(0, num_epochs - epochs_done)
    if save_strategy == "best":  # at most one save per evaluation
        if eval_strategy == "steps":
            return every(eval_steps or save_steps)
        if eval_strategy == "epoch":
            return max(0, num_epochs - epochs_done)
        return 0
    return 0


def planned_checkpoints(
    *,
    save_strategy: str,
    save_steps: float = 500,
    max_steps: int,
    num_epochs: int = 1,
    save_total_limit: int | None = None,
    load_best_model_at_end: bool = False,
    start_step: int = 0,
    epochs_done: int = 0,
    existing_checkpoints: int = 0,
    eval_strategy: str = "no",
    eval_steps: float = 0,
) -> int:
    """How many *new* checkpoints' worth of space a run needs at its peak, beyond what is already on disk.

    Without ``save_total_limit`` every save stays: the number of saves still to come. With a limit ``L``, rotation
    runs *after* the new checkpoint is written, so the peak is ``L + 1`` checkpoints (``max(L, 2) + 1`` when
    ``load_best_model_at_end`` protects a best checkpoint besides the newest). Checkpoints already in
    ``output_dir`` (a resumed run) take space that is no longer free, so they count against that peak.

    Args:
        save_strategy: ``"no"``, ``"steps"``, ``"epoch"`` or ``"best"``.
        save_steps: Steps between saves (a float below 1 is a fraction of ``max_steps``).
        max_steps: Total optimizer steps of the run.
        num_epochs: Total epochs of the run.
        save_total_limit: ``TrainingArguments.save_total_limit`` (None or <= 0: keep all).
        load_best_model_at_end: ``TrainingArguments.load_best_model_at_end``.
        start_step: The step a resumed run starts from.
        epochs_done: Epochs already done by a resumed run.
        existing_checkpoints: ``checkpoint-*`` folders already in ``output_dir``.
        eval_strategy: For ``save_strategy="best"``: saves happen at most once per evaluation.
        eval_steps: Steps between evaluations.

    Example::

        planned_checkpoints(save_strategy="steps", save_steps=100, max_steps=1000, save_total_limit=2)  # 3
    """
    save_strategy = str(getattr(save_strategy, "value", save_strategy))
    eval_strategy = str(getattr(eval_strategy, "value", eval_strategy))
    saves = _remaining_saves(
        save_strategy,
        save_steps=float(save_steps),
        max_steps=int(max_steps),
        start_step=int(start_step),
        num_epochs=int(num_epochs),
        epochs_done=int(epochs_done),
        eval_strategy=eval_strategy,
        eval_steps=float(eval_steps or 0),
    )
    if saves == 0:
        return 0
    if save_total_limit is None or save_total_limit <= 0:
        return saves
    kept = max(int(save_total_limit), 2 if load_best_model_at_end else 1)
    return min(saves, max(1, kept + 1 - int(existing_checkpoints)))


def tokenizer_size(tokenizer: Any) -> int:
    """Approximate bytes of the files ``tokenizer.save_pretrained`` writes (0 for None).

    A fast tokenizer's ``tokenizer.json`` is serialised in memory (exact, no disk write); a slow one is sized from
    its vocabulary files when they are local, else counted as 1 MiB.
    """
    if tokenizer is None:
        return 0
    base = 8 * 1024  # tokenizer_config.json, special_tokens_map.json, chat template
    inner = getattr(tokenizer, "tokenizer", None)  # a processor wraps its tokenizer
    tok = inner if inner is not None and not hasattr(tokenizer, "backend_tokenizer") else tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        try:
            return base + len(backend.to_str().encode("utf-8"))
        except Exception:  # pragma: no cover - to_str exists on every tokenizers.Tokenizer
            pass
    files: Iterable[str] = (getattr(tok, "vocab_files_names", None) or {}).values()
    folder = Path(str(getattr(tok, "name_or_path", "") or ""))
    size = sum((folder / f).stat().st_size for f in files if (folder / f).is_file()) if folder.is_dir() else 0
    return base + (size or 2**20)


def describe_args(args: Any) -> Mapping[str, Any]:
    """The ``TrainingArguments`` fields the estimate depends on, as plain values (for messages and evidence)."""
    fields = (
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "save_only_model",
        "load_best_model_at_end",
        "optim",
        "max_steps",
        "num_train_epochs",
    )
    out: dict[str, Any] = {}
    for name in fields:
        value = getattr(args, name, None)
        out[name] = getattr(value, "value", value)
    return out
