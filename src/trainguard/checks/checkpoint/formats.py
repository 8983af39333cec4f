"""Structural checks of the files a checkpoint holds, reading headers, not whole files: safetensors headers, torch zip
archives, JSON and index files; and which file names a resume would load.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from .._layout import (
    JIT_SENTINEL,
    TRAINER_STATE,
)
from .report import Problem

__all__ = ["check_format", "issue_kind", "loaded_on_resume", "special_extra"]

_MAX_SAFETENSORS_HEADER = 100 << 20  # the limit safetensors itself enforces
_ZIP_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


# What the Trainer (and PEFT, DeepSpeed, FSDP/DCP) loads from a checkpoint folder when it resumes: an unlisted file of
# these kinds can change the resumed state, so it rejects the checkpoint. Anything else unlisted is a warning.
_LOADED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".distcp", ".pkl", ".index.json")
_LOADED_NAMES = frozenset(
    {TRAINER_STATE, "config.json", "generation_config.json", "adapter_config.json", "latest", ".metadata"}
)
_LOADED_DIR_PREFIXES = ("global_step", "pytorch_model_fsdp", "optimizer_", "model_")


def loaded_on_resume(name: str) -> bool:
    """True when an unlisted file ``name`` (relative posix path) is one a resume would load."""
    parts = name.split("/")
    if any(p.startswith(".") for p in parts[:-1]):
        return False  # inside .ipynb_checkpoints/, .git/, ...: never loaded
    base = parts[-1]
    if base in _LOADED_NAMES:
        return True
    if base.startswith("."):
        return False  # .DS_Store, ._model.safetensors (macOS resource forks), editor swap files
    if base.endswith(_LOADED_SUFFIXES):
        return True
    return len(parts) > 1 and parts[0].startswith(_LOADED_DIR_PREFIXES)


def _is_partial_write(name: str) -> bool:
    # safetensors >= 0.8 writes "<dir>/.tmpXXXXXX" then renames; a kill leaves it behind.
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".tmp")


# ---------------------------------------------------------------------------------------- structural checks
def _check_safetensors(path: Path, size: int) -> str | None:
    if size < 8:
        return f"truncated safetensors file: {size} bytes, shorter than the 8-byte header length"
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > _MAX_SAFETENSORS_HEADER:
            return f"safetensors header length {header_len} is not plausible (damaged first bytes)"
        if 8 + header_len > size:
            return f"truncated safetensors file: header needs {8 + header_len} bytes, file has {size}"
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        return f"safetensors header is not valid JSON ({err})"
    if not isinstance(header, dict):
        return "safetensors header is not a JSON object"
    data_len = size - 8 - header_len
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in info["data_offsets"])
            dtype = str(info["dtype"])
            shape = [int(d) for d in info["shape"]]
        except (KeyError, TypeError, ValueError):
            return f"safetensors header entry {name!r} is malformed"
        if not 0 <= begin <= end:
            return f"tensor {name!r} has offsets {begin}..{end}"
        if end > data_len:
            return f"truncated safetensors file: tensor {name!r} ends at byte {end} of a {data_len}-byte data area"
        width = _DTYPE_BYTES.get(dtype)
        if width is not None:
            count = 1
            for dim in shape:
                count *= dim
            if count * width != end - begin:
                return f"tensor {name!r} ({dtype}{shape}) should take {count * width} bytes, takes {end - begin}"
        end_max = max(end_max, end)
    if end_max != data_len:
        return f"safetensors data area is {data_len} bytes but the tensors cover {end_max} (truncated or extended)"
    return None


def _check_zip(path: Path, size: int, *, crc: bool) -> str | None:
    if size == 0:
        return "empty file (a torch file is never empty)"
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:1] == b"\x80":
        return None  # a legacy (pre-zip) torch pickle: nothing structural to check
    if head != b"PK\x03\x04":
        return "neither a zip archive (torch.save format) nor a legacy pickle: damaged first bytes"
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if not infos:
                return "zip archive with no members"
            if crc:
                bad = archive.testzip()
                if bad is not None:
                    return f"zip member {bad!r} fails its CRC-32 (content changed)"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        return f"torch zip archive unreadable ({type(err).__name__}: {err}); truncated or damaged"
    return None


def _check_json(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except UnicodeDecodeError as err:
        return f"not UTF-8 text ({err.reason})"
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    if path.name.endswith(".index.json") and isinstance(value, dict):
        weight_map = value.get("weight_map")
        if isinstance(weight_map, dict):
            missing = sorted({str(v) for v in weight_map.values()} - {p.name for p in path.parent.iterdir()})
            if missing:
                return f"the index names shard files that are not there: {', '.join(missing)}"
    return None


def issue_kind(issue: str) -> str:
    if issue.startswith("unreadable"):
        return "unreadable"
    return "truncated" if issue.startswith("truncated") else "malformed"


def check_format(path: Path, size: int, *, crc: bool) -> str | None:
    """A structural problem with one file, or None. Reads headers and small files only (plus zip CRCs if asked)."""
    name = path.name
    try:
        if name.endswith(".safetensors"):
            return _check_safetensors(path, size)
        if name.endswith(".json"):
            return _check_json(path)
        if name.endswith(_ZIP_SUFFIXES):
            return _check_zip(path, size, crc=crc)
    except OSError as err:
        return f"unreadable ({type(err).__name__}: {err})"
    return None


def special_extra(name: str) -> Problem | None:
    base = name.rsplit("/", 1)[-1]
    if base == JIT_SENTINEL:
        return Problem(name, "interrupted", "the Trainer's JIT-save sentinel is still there: that save did not finish")
    if _is_partial_write(name):
        return Problem(name, "interrupted", "a leftover temporary file of an interrupted safetensors write")
    return None
