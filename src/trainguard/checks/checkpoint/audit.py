"""The save audit: what a save wrote, compared with what the run has, before the save is committed.

A sha256 manifest faithfully vouches for an empty or wrong file. The audit reads what the save wrote — safetensors
headers and index files (never the tensor data), the optimizer's structure through a memory map — and compares it
with a :class:`SaveSpec` taken from the live run at that save:

- weights: every tensor the model has (for a PEFT model: every adapter tensor) is in the files with its full shape
  and dtype; no zero-size tensor where the live one is not empty (ZeRO-3 + LoRA's 40-byte adapter, FSDP's
  ``Size([0])`` embeddings); a key missing only where the model shares that tensor with a saved one (a declared
  tie). The spec names the tensors as the files hold them, after the key conversion ``save_pretrained`` applies
  (MoE experts written one by one, ViT's renamed layers); where that conversion could not be replayed
  (``unmapped``), names are not compared, and the files are only required to be present, readable and not empty;
- optimizer, scheduler and RNG state present unless the run saves model-only, one RNG file per rank; the optimizer's
  saved state covers every parameter the live optimizer holds.

Imports torch only to read the optimizer file, and only when it is there.

Example::

    problems = audit_checkpoint("out/checkpoint-50", spec)     # [] when the save holds what the run had
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import TrainGuardError
from ...safe_fs import load_json, open_read, parse_json
from .report import Problem

__all__ = ["SaveSpec", "TensorSpec", "audit_checkpoint", "audit_optimizer", "safetensors_dtype"]

_WEIGHT_INDEX = ("model.safetensors.index.json",)
_MAX_HEADER = 100 << 20
_TORCH_TO_SAFETENSORS = {
    "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64",
    "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8", "torch.uint8": "U8",
    "torch.bool": "BOOL", "torch.float8_e4m3fn": "F8_E4M3", "torch.float8_e5m2": "F8_E5M2",
}  # fmt: skip


def safetensors_dtype(dtype: Any) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``BF16``); the str of anything else."""
    return _TORCH_TO_SAFETENSORS.get(str(dtype), str(dtype))


@dataclass(frozen=True)
class TensorSpec:
    """One tensor the run has: its full shape (not a rank's shard) and its safetensors dtype name."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SaveSpec:
    """What a save of the live run must hold.

    ``weights`` maps each saved name to its :class:`TensorSpec`; ``weights_kind`` is ``"model"`` or ``"adapter"``;
    ``tied`` maps a name that may be missing to the saved name it shares memory with. ``optimizer_params`` is how many
    parameters the live optimizer holds (None: unknown), ``optimizer_states`` how many have state. ``layout`` is what
    the engine writes: ``plain`` (``save_pretrained`` files, ``optimizer.pt``), ``fsdp_sharded`` (DCP folders),
    ``fsdp_full`` (gathered weights, ``optimizer.bin``) or ``deepspeed`` (``global_stepN/``, ``latest``).
    ``absent_ok`` names files this folder is known not to receive (one node's copy of a node-local save, see
    :func:`~trainguard.checks.checkpoint.nodes.node_copy_gaps`; ``global_stepN`` stands for the step's tag).
    ``unmapped`` says why ``weights`` could not be given the names ``save_pretrained`` writes (an unknown key
    conversion); when set, the weights' names and shapes are not compared.
    """

    weights: dict[str, TensorSpec] = field(default_factory=dict)
    layout: str = "plain"
    weights_kind: str = "model"
    tied: dict[str, str] = field(default_factory=dict)
    model_only: bool = False
    world_size: int = 1
    fp16_scaler: bool = False
    optimizer_params: int | None = None
    optimizer_states: int | None = None
    absent_ok: tuple[str, ...] = ()
    unmapped: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": len(self.weights),
            "weights_kind": self.weights_kind,
            "layout": self.layout,
            "model_only": self.model_only,
            "world_size": self.world_size,
            "optimizer_params": self.optimizer_params,
        }


# --------------------------------------------------------------------------------------------------- weights
def _read_header(path: Path) -> dict[str, Any] | str:
    """A safetensors file's header (names -> dtype, shape), or why it cannot be read."""
    try:
        size = path.stat().st_size
        with os.fdopen(open_read(path), "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return f"{size} bytes: shorter than a safetensors header"
            (length,) = struct.unpack("<Q", raw)
            if length > min(_MAX_HEADER, size - 8):
                return f"header length {length} does not fit a {size}-byte file"
            header = parse_json(fh.read(length), source=path)
    except (OSError, ValueError) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    except TrainGuardError as err:  # crafted JSON (too deep, numbers out of range), or not a regular file
        return f"unreadable ({err.what})"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    header.pop("__metadata__", None)
    return header


def _weight_files(folder: Path, kind: str) -> list[Path] | str:
    if kind == "adapter":
        found = [p for p in (folder / "adapter_model.safetensors",) if p.is_file()]
        return found or "no adapter_model.safetensors: the adapter was not saved"
    index = folder / _WEIGHT_INDEX[0]
    if index.is_file():
        try:
            weight_map = load_json(index).get("weight_map", {})
            if not isinstance(weight_map, dict):
                raise ValueError("weight_map is not an object")
        except (OSError, ValueError, AttributeError) as err:
            return f"{index.name} is unreadable ({err})"
        except TrainGuardError as err:
            return f"{index.name} is unreadable ({err.what})"
        return [folder / name for name in sorted(set(map(str, weight_map.values())))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else "no model.safetensors (nor an index of shards): the model was not saved"


def _saved_dcp(folder: Path, problems: list[Problem]) -> tuple[dict[str, tuple[str, list[int], str]], list[Path]]:
    """The model tensors of a DCP checkpoint (FSDP sharded), by their ``save_pretrained`` names, full shapes."""
    from .layouts import read_dcp_metadata

    dcp = folder / "pytorch_model_fsdp_0"
    index = read_dcp_metadata(dcp)
    if isinstance(index, str):
        problems.append(Problem(f"{dcp.name}/.metadata", "hollow", f"the model's shards cannot be read: {index}"))
        return {}, []
    saved = {}
    for name, (shape, dtype) in index.tensors.items():
        plain = name[len("model.") :] if name.startswith("model.") else name  # DCP keys sit under "model."
        saved[plain] = (safetensors_dtype(dtype), list(shape), f"{dcp.name}/.metadata")
    return saved, [dcp / ".metadata"]


def _audit_weights(folder: Path, spec: SaveSpec, problems: list[Problem]) -> None:
    saved: dict[str, tuple[str, list[int], str]] = {}
    found_before = len(problems)
    if spec.layout == "fsdp_sharded" and spec.weights_kind == "model":
        saved, files = _saved_dcp(folder, problems)
        if not files:
            return
    else:
        found = _weight_files(folder, spec.weights_kind)
        if isinstance(found, str):
            if spec.layout != "deepspeed":  # ZeRO-3 without a 16-bit gather keeps the weights in global_stepN/ only
                problems.append(Problem("", "hollow", found))
            return
        files = found
        for path in files:
            header = _read_header(path)
            if isinstance(header, str):
                problems.append(Problem(path.name, "hollow", header))
                continue
            for name, info in header.items():
                shape = info.get("shape") if isinstance(info, dict) else None
                if isinstance(shape, list) and all(isinstance(d, int) for d in shape):
                    saved[name] = (str(info.get("dtype")), list(shape), path.name)
    if spec.unmapped:
        # The saved names are a conversion of the run's that could not be replayed: comparing names would call
        # every converted tensor missing. What needs no names still holds: the files are there and hold tensors.
        if not saved and len(problems) == found_before:  # (an unreadable header is named already)
            where = files[0].name if len(files) == 1 else ""
            problems.append(Problem(where, "hollow", "the saved weights hold no tensor"))
        return
    missing = [n for n in spec.weights if n not in saved and spec.tied.get(n) not in saved]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        problems.append(
            Problem(
                files[0].name if len(files) == 1 else "",
                "hollow",
                f"{len(missing)} of the run's {len(spec.weights)} {spec.weights_kind} tensor(s) are not in the saved "
                f"weights: {shown}",
            )
        )
    for name, want in spec.weights.items():
        if name not in saved:
            continue
        dtype, shape, file = saved[name]
        if math.prod(shape) == 0 and want.numel > 0:
            problems.append(
                Problem(file, "hollow", f"tensor {name!r} was saved empty ({dtype}{shape}); the run has {want.shape}")
            )
        elif tuple(shape) != want.shape:
            problems.append(
                Problem(file, "hollow", f"tensor {name!r} was saved with shape {shape}; the run has {list(want.shape)}")
            )
        elif dtype != want.dtype:
            problems.append(Problem(file, "hollow", f"tensor {name!r} was saved as {dtype}; the run has {want.dtype}"))


# -------------------------------------------------------------------------------------------- training state
def _optimizer_counts(path: Path) -> tuple[int, int] | str:
    """(parameters in the saved param groups, parameters with saved state), read through a memory map."""
    try:
        import torch

        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a damaged file is the verifier's to name; here it means "cannot audit"
        return f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if not isinstance(saved, Mapping) or not isinstance(saved.get("param_groups"), list):
        return "not an optimizer state dict (no param_groups)"
    params = sum(len(g.get("params", [])) for g in saved["param_groups"] if isinstance(g, Mapping))
    state = saved.get("state")
    return params, len(state) if isinstance(state, Mapping) else 0


_OPTIMIZER_FILES = {"plain": "optimizer.pt", "fsdp_full": "optimizer.bin", "fsdp_sharded": "optimizer_0/.metadata"}


def _generic(relative: str) -> str:
    return re.sub(r"global_step\d+", "global_stepN", relative)


def _audit_training_state(folder: Path, spec: SaveSpec, problems: list[Problem], absent_ok: set[str]) -> None:
    if spec.model_only:
        return
    optimizer = _OPTIMIZER_FILES.get(spec.layout)  # DeepSpeed's optimizer states: check_layouts, per rank
    for name in (optimizer, "scheduler.pt"):
        if name is not None and name not in absent_ok and not (folder / name).is_file():
            problems.append(
                Problem(name, "hollow", "missing: the run saves optimizer and scheduler state, and a resume without "
                        "them restarts the optimizer and the learning-rate schedule from scratch")
            )  # fmt: skip
    if spec.fp16_scaler and not (folder / "scaler.pt").is_file():
        problems.append(Problem("scaler.pt", "hollow", "missing: the run uses an fp16 loss scaler"))
    rng = ["rng_state.pth"] if spec.world_size <= 1 else [f"rng_state_{r}.pth" for r in range(spec.world_size)]
    rng = [n for n in rng if n not in absent_ok]
    absent = [n for n in rng if not (folder / n).is_file()]
    if absent:
        problems.append(
            Problem(
                absent[0], "hollow", f"missing RNG state of {len(absent)} of {len(rng)} rank(s): {', '.join(absent)}"
            )
        )


def audit_optimizer(folder: str | os.PathLike[str], spec: SaveSpec) -> list[Problem]:
    """The saved optimizer's structure against the live optimizer's: every parameter, and state for each one that
    has state. Reads ``optimizer.pt`` through a memory map (milliseconds, not its size); CheckpointVerifier runs it
    on its hashing thread, before the commit marker."""
    optimizer = Path(folder) / "optimizer.pt"
    if spec.model_only or spec.layout != "plain" or spec.optimizer_params is None or not optimizer.is_file():
        return []
    counts = _optimizer_counts(optimizer)
    if isinstance(counts, str):
        return [Problem("optimizer.pt", "hollow", counts)]
    params, states = counts
    if params != spec.optimizer_params:
        want = spec.optimizer_params
        return [Problem("optimizer.pt", "hollow", f"holds {params} parameter(s); the run's optimizer has {want}")]
    if spec.optimizer_states is not None and states < spec.optimizer_states:
        return [
            Problem(
                "optimizer.pt", "hollow", f"holds state for {states} parameter(s); the run's optimizer has state for "
                f"{spec.optimizer_states}",
            )
        ]  # fmt: skip
    return []


def audit_checkpoint(folder: str | os.PathLike[str], spec: SaveSpec, *, optimizer: bool = True) -> list[Problem]:
    """Compare what a save wrote into ``folder`` with ``spec``; every difference is a :class:`Problem` of kind
    ``hollow`` (empty or not what the run had). Reads headers and structure, never tensor data. The weights and the
    files take well under a millisecond; ``optimizer`` adds :func:`audit_optimizer` (a few milliseconds).

    Example::

        audit_checkpoint("out/checkpoint-50", spec)     # []
    """
    from .layouts import check_layouts

    path = Path(folder)
    problems: list[Problem] = []
    absent_ok = {_generic(p) for p in spec.absent_ok}
    if spec.weights and not absent_ok & {"model.safetensors", "adapter_model.safetensors"}:
        _audit_weights(path, spec, problems)
    _audit_training_state(path, spec, problems, absent_ok)
    # every rank's shards, the index that names them
    problems.extend(Problem(p.file, "hollow", p.detail) for p in check_layouts(path, world_size=spec.world_size))
    problems = [p for p in problems if _generic(p.file) not in absent_ok]
    if optimizer:
        problems.extend(audit_optimizer(path, spec))
    return problems
