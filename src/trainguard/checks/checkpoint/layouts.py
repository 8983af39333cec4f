"""The layouts sharded engines write, checked for completeness from their own indexes.

- **DCP** (FSDP ``SHARDED_STATE_DICT``: ``pytorch_model_fsdp_0/``, ``optimizer_0/``): ``.metadata`` names every
  shard file and the byte range each tensor chunk takes in it; every named file must be there and long enough, and a
  folder of ``*.distcp`` shards without its ``.metadata`` cannot be loaded at all. ``.metadata`` is a pickle: it is
  read with an unpickler that only builds an exact list of DCP's own metadata classes, ``torch.Size`` and dtypes,
  never arbitrary code, and (in manifest mode) only once the file's hash matched.
- **DeepSpeed** (``global_stepN/``, ``latest``): ``latest`` names the tag folder DeepSpeed will load; it must be
  there and be this checkpoint's step; every data-parallel rank's ``*_optim_states.pt`` (and, for ZeRO-3, its
  ``*_model_states.pt``) must be there.

Example::

    problems = check_layouts("out/checkpoint-50", world_size=2)
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import TrainGuardError
from ...safe_fs import read_bytes, read_text, walk_tree
from .._layout import checkpoint_step
from .report import Problem

__all__ = ["DcpIndex", "check_layouts", "checkpoint_layout", "loader_mismatch", "read_dcp_metadata"]

DCP_METADATA = ".metadata"
_MAX_METADATA = 256 << 20
_DS_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_DS_MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")


# Every global a DCP ``.metadata`` may name, as an exact ``(module, name)`` pair (torch 2.6 through 2.13 write these).
# Never a module prefix: ``torch.distributed.checkpoint.filesystem`` imports ``os``, and pickle protocol 4 resolves a
# dotted name such as ``os.system`` inside it. Every class here builds a plain record from its arguments, no more.
_DCP = "torch.distributed.checkpoint"
_ALLOWED = frozenset(
    {
        (f"{_DCP}.metadata", "Metadata"),
        (f"{_DCP}.metadata", "MetadataIndex"),
        (f"{_DCP}.metadata", "ChunkStorageMetadata"),
        (f"{_DCP}.metadata", "TensorProperties"),
        (f"{_DCP}.metadata", "TensorStorageMetadata"),
        (f"{_DCP}.metadata", "BytesStorageMetadata"),
        (f"{_DCP}.metadata", "StorageMeta"),
        (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"),
        (f"{_DCP}.filesystem", "_StorageInfo"),
        (f"{_DCP}.filesystem", "_StoragePrefix"),
        (f"{_DCP}.filesystem", "SerializationFormat"),
        ("torch", "Size"),
        ("torch._utils", "_get_layout"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "Path"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: exact ``(module, name)`` pairs, looked up one attribute deep.

    ``pickle.Unpickler.find_class`` itself is never called: it walks dotted names (``os.system`` reached through a
    module that imported ``os``), which is how an allowed module becomes a way to any callable.
    """

    def find_class(self, module: str, name: str) -> Any:
        import importlib

        import torch

        if "." not in name and (module, name) in _ALLOWED:
            return getattr(importlib.import_module(module), name)
        if module == "torch" and "." not in name:
            value = torch.__dict__.get(name)
            # dtypes, layouts and memory formats are plain values, and the only other torch globals metadata names
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata: refused, nothing was run")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of checkpoint metadata")


@dataclass
class DcpIndex:
    """What a DCP ``.metadata`` says: each tensor's full shape and dtype, and where each chunk's bytes are."""

    tensors: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    #: relative file -> the end of the furthest chunk in it (its least possible size)
    files: dict[str, int] = field(default_factory=dict)


def read_dcp_metadata(folder: str | os.PathLike[str]) -> DcpIndex | str:
    """Read a DCP folder's ``.metadata`` (restricted unpickling); a string says why it could not be read."""
    path = Path(folder) / DCP_METADATA
    try:
        # a regular file only (a FIFO at .metadata never blocks), and bounded
        data = read_bytes(path, limit=_MAX_METADATA)
    except FileNotFoundError:
        return "missing"
    except TrainGuardError as err:
        return err.what
    except OSError as err:
        return f"unreadable ({type(err).__name__}: {str(err)[:200]})"
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        index = DcpIndex()
        for name, meta in (getattr(metadata, "state_dict_metadata", None) or {}).items():
            size_attr = getattr(meta, "size", None)
            properties = getattr(meta, "properties", None)
            if size_attr is not None:
                index.tensors[str(name)] = (tuple(int(d) for d in size_attr), str(getattr(properties, "dtype", "")))
        for info in (getattr(metadata, "storage_data", None) or {}).values():
            relative = getattr(info, "relative_path", None)
            if relative is None:
                continue
            end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
            index.files[str(relative)] = max(index.files.get(str(relative), 0), end)
    except Exception as err:  # damaged bytes, foreign classes, a truncated pickle, fields of the wrong type
        return f"unreadable ({type(err).__name__}: {str(err)[:200]})"
    return index


def _dcp_folders(folder: Path) -> list[Path]:
    found = []
    for root, _dirs, files in walk_tree(folder):
        if DCP_METADATA in files or any(f.endswith(".distcp") for f in files):
            found.append(Path(root))
    return sorted(found)


def _check_dcp(folder: Path, dcp: Path, problems: list[Problem], readable: Callable[[str], bool] | None) -> None:
    relative = dcp.relative_to(folder).as_posix()
    if readable is not None and (dcp / DCP_METADATA).exists() and not readable(f"{relative}/{DCP_METADATA}"):
        problems.append(
            Problem(
                f"{relative}/{DCP_METADATA}", "unverified",
                "not read: its bytes are not the ones the manifest committed, and a pickle is never opened before "
                "its hash matched",
            )
        )  # fmt: skip
        return
    index = read_dcp_metadata(dcp)
    if index == "missing":
        problems.append(
            Problem(f"{relative}/{DCP_METADATA}", "missing", "missing: the shards of this folder cannot be loaded")
        )
        return
    if isinstance(index, str):
        problems.append(Problem(f"{relative}/{DCP_METADATA}", "malformed", index))
        return
    for name, least in sorted(index.files.items()):
        shard = dcp / name
        if not shard.is_file():
            problems.append(Problem(f"{relative}/{name}", "missing", f"missing (named by {DCP_METADATA})"))
        elif shard.stat().st_size < least:
            problems.append(
                Problem(
                    f"{relative}/{name}", "truncated",
                    f"truncated: {shard.stat().st_size} bytes, {DCP_METADATA} places data up to byte {least}",
                )
            )  # fmt: skip


def _check_deepspeed(folder: Path, world_size: int | None, problems: list[Problem]) -> None:
    latest = folder / "latest"
    tags = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("global_step"))
    if not latest.is_file() and not tags:
        return
    if not latest.is_file():
        problems.append(Problem("latest", "missing", "missing: DeepSpeed cannot find which global_step folder to load"))
        return
    try:
        tag = read_text(latest, limit=4096).strip()
    except (OSError, TrainGuardError) as err:
        problems.append(Problem("latest", "unreadable", f"unreadable ({getattr(err, 'what', err)})"))
        return
    if not tag or "/" in tag or tag in (".", ".."):
        problems.append(Problem("latest", "malformed", f"names {tag[:80]!r}, not a global_step folder of this one"))
        return
    step = checkpoint_step(folder)
    if step is not None and tag != f"global_step{step}":
        problems.append(Problem("latest", "changed", f"names {tag!r}, but this is {folder.name}: a stale latest"))
    tagged = folder / tag
    if not tagged.is_dir():
        problems.append(Problem(tag, "missing", f"missing: the folder latest names ({tag})"))
        return
    names = [p.name for p in tagged.iterdir()]
    optim = sorted(int(m.group(1)) for n in names if (m := _DS_OPTIM.match(n)))
    model = sorted(int(m.group(1)) for n in names if (m := _DS_MODEL.match(n)))
    ranks = world_size or _deepspeed_world(tagged, names) or (max(optim + model) + 1 if optim or model else 0)
    for kind, present in (("optim", optim), ("model", model)):
        if kind == "model" and not present:
            continue  # ZeRO-1/2 keep the model in one mp_rank_00_model_states.pt
        absent = [r for r in range(ranks) if r not in present]
        if absent:
            problems.append(
                Problem(
                    f"{tag}/zero_pp_rank_{absent[0]}_mp_rank_00_{kind}_states.pt",
                    "missing",
                    f"missing the {kind} state of {len(absent)} of {ranks} rank(s): "
                    + ", ".join(str(r) for r in absent),
                )
            )
    if not model and optim and not any(n.startswith("mp_rank_") and n.endswith("_model_states.pt") for n in names):
        problems.append(Problem(f"{tag}/mp_rank_00_model_states.pt", "missing", "missing: the engine's model state"))


def _deepspeed_world(tagged: Path, names: list[str]) -> int | None:
    """The data-parallel world size DeepSpeed recorded in a model-states file (``dp_world_size``): without a
    manifest, the only record of how many ranks' files belong here. Read through a memory map, tensors untouched."""
    # regular files only: torch.load opens with open(), which blocks on a FIFO
    candidates = sorted(n for n in names if n.endswith("_model_states.pt") and (tagged / n).is_file())
    if not candidates:
        return None
    try:
        import torch

        states = torch.load(tagged / candidates[0], map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable or not a plain state: the verifier names damaged files on its own
        return None
    world = states.get("dp_world_size") if isinstance(states, dict) else None
    return world if isinstance(world, int) and world > 0 else None


def check_layouts(
    folder: str | os.PathLike[str], *, world_size: int | None = None, readable: Callable[[str], bool] | None = None
) -> list[Problem]:
    """Every sharded layout in ``folder`` checked for completeness from its own index (cheap: small reads only).

    Args:
        folder: The checkpoint folder.
        world_size: The run's number of ranks, when known (every rank's DeepSpeed shard must be there).
        readable: Whether the index at a relative path may be parsed; a DCP ``.metadata`` it refuses is reported
            "unverified" and never unpickled (in manifest mode: only files whose hash matched).

    Example::

        check_layouts("out/checkpoint-50", world_size=2)      # [] for a complete checkpoint
    """
    path = Path(folder)
    problems: list[Problem] = []
    for dcp in _dcp_folders(path):
        _check_dcp(path, dcp, problems, readable)
    _check_deepspeed(path, world_size, problems)
    return problems


_LAYOUT_NAMES = {
    "plain": "plain (save_pretrained weights, optimizer.pt)",
    "fsdp_sharded": "FSDP SHARDED_STATE_DICT (pytorch_model_fsdp_0/, optimizer_0/)",
    "fsdp_full": "FSDP FULL_STATE_DICT (pytorch_model_fsdp.bin, optimizer.bin)",
    "deepspeed": "DeepSpeed (global_stepN/, latest)",
}


def checkpoint_layout(folder: str | os.PathLike[str]) -> str | None:
    """Which engine wrote ``folder``, from its files: ``deepspeed``, ``fsdp_sharded``, ``fsdp_full``, ``plain``, or
    None when it cannot tell (one node's copy of a node-local save may hold too little to say)."""
    path = Path(folder)
    try:
        names = set(os.listdir(path))
    except OSError:
        return None
    if any(n.startswith("global_step") and (path / n).is_dir() for n in names) or "latest" in names:
        return "deepspeed"
    if any(n.startswith("pytorch_model_fsdp_") and (path / n).is_dir() for n in names):
        return "fsdp_sharded"
    if "pytorch_model_fsdp.bin" in names or "optimizer.bin" in names:
        return "fsdp_full"
    if "optimizer.pt" in names:
        return "plain"
    return None


def loader_mismatch(written_by: str | None, engine: str) -> str | None:
    """Why the run's engine cannot load a checkpoint ``written_by`` another (None when it can, or when unknown).

    The Trainer picks its loader from the run's engine, not from the files: DeepSpeed reads only ``global_stepN/``;
    FSDP reads only its own state-dict type; a plain run refuses FSDP files and, given a DeepSpeed checkpoint, loads
    the 16-bit weights and silently starts the optimizer from scratch (its state is in ``global_stepN/``).
    """
    if written_by is None or written_by == engine:
        return None
    wrote, runs = _LAYOUT_NAMES.get(written_by, written_by), _LAYOUT_NAMES.get(engine, engine)
    if written_by == "deepspeed" and engine == "plain":
        consequence = "the Trainer would load its 16-bit weights and silently start the optimizer from scratch"
    else:
        consequence = "the Trainer's loader for this run cannot read it and fails partway through loading"
    return f"the checkpoint was written by {wrote}; this run is {runs}: {consequence}"
