"""Structural checks of the files a checkpoint holds, reading headers, not whole files: safetensors headers, torch zip
archives, JSON and index files; and which file names a resume would load.
"""

from __future__ import annotations

import itertools
import os
import struct
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ...errors import TrainGuardError
from ...safe_fs import load_json, open_read, parse_json
from .._layout import (
    JIT_SENTINEL,
    TRAINER_STATE,
)
from .report import Problem

__all__ = ["check_format", "describes_checkpoint", "issue_kind", "loaded_on_resume", "special_extra"]

_MAX_SAFETENSORS_HEADER = 100 << 20  # the limit safetensors itself enforces
_ZIP_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
#: A torch archive holds one member per storage plus a few records; a model with this many is far beyond any real one.
_MAX_ZIP_ENTRIES = 1_000_000
#: deflate cannot expand more than about 1032:1; a member claiming more is crafted (a zip bomb).
_MAX_DEFLATE_RATIO = 1100
_ZIP_LOCAL_HEADER = 30
#: CRC-32 is checked only for members up to this size, and at most this many bytes per archive: enough to cover the
#: small records (data.pkl, version, byteorder) and small tensors, never a read of a multi-gigabyte optimizer state.
_CRC_MEMBER_MAX = 16 << 20
_CRC_BUDGET = 256 << 20
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


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".distcp", ".gguf")
_NOT_WEIGHTS = frozenset({"training_args.bin"})


def describes_checkpoint(names: Iterable[str]) -> bool:
    """True when ``names`` (relative posix paths) hold what any known checkpoint layout holds: ``trainer_state.json``,
    or a weights or state file (safetensors, a torch file, DCP shards or ``.metadata``, DeepSpeed ``global_step*/``
    states, a PEFT adapter). A manifest of nothing else vouches for nothing a resume could load."""
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base == TRAINER_STATE or base == ".metadata":
            return True
        if base.endswith(_WEIGHT_SUFFIXES) and base not in _NOT_WEIGHTS and not base.startswith("."):
            return True
    return False


def _is_partial_write(name: str) -> bool:
    # safetensors >= 0.8 writes "<dir>/.tmpXXXXXX" then renames; a kill leaves it behind.
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".tmp")


# ---------------------------------------------------------------------------------------- structural checks
def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_safetensors(path: Path, size: int) -> str | None:
    if size < 8:
        return f"truncated safetensors file: {size} bytes, shorter than the 8-byte header length"
    with os.fdopen(open_read(path), "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > _MAX_SAFETENSORS_HEADER:
            return f"safetensors header length {header_len} is not plausible (damaged first bytes)"
        if 8 + header_len > size:
            return f"truncated safetensors file: header needs {8 + header_len} bytes, file has {size}"
        raw = fh.read(header_len)
    try:
        # finite numbers only, bounded nesting: a crafted header is a finding, never a RecursionError
        header = parse_json(raw, source=path)
    except TrainGuardError as err:
        return f"safetensors header is not valid JSON ({getattr(err, 'what', err)})"
    if not isinstance(header, dict):
        return "safetensors header is not a JSON object"
    data_len = size - 8 - header_len
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(v) for v in offsets)
            or not isinstance(shape, list)
            or not all(_is_count(d) for d in shape)
            or not isinstance(dtype, str)
        ):
            return f"safetensors header entry {name!r} is malformed (offsets and shape must be non-negative integers)"
        begin, end = offsets
        if begin > end:
            return f"tensor {name!r} has offsets {begin}..{end}"
        if end > data_len:
            return f"truncated safetensors file: tensor {name!r} ends at byte {end} of a {data_len}-byte data area"
        width = _DTYPE_BYTES.get(dtype)
        if width is not None:
            count = 1
            for dim in shape:
                count *= dim
                if count * width > data_len:
                    break  # already too large: no need to multiply a crafted shape out
            if count * width != end - begin:
                return f"tensor {name!r} ({dtype}{shape}) does not take the {end - begin} bytes its offsets give"
        end_max = max(end_max, end)
    if end_max != data_len:
        return f"safetensors data area is {data_len} bytes but the tensors cover {end_max} (truncated or extended)"
    return None


def _zip_layout_issue(infos: list[zipfile.ZipInfo], size: int) -> str | None:
    """What the central directory alone shows wrong: too many members, a member outside the file, members that
    overlap (one member listed many times is a zip bomb), or more uncompressed bytes than deflate can produce."""
    if len(infos) > _MAX_ZIP_ENTRIES:
        return f"zip archive lists {len(infos):,} members, more than any torch file holds (crafted?)"
    spans = []
    for info in infos:
        if info.flag_bits & 0x1:
            # torch.save never encrypts, and reading such a member needs a password (zipfile raises RuntimeError)
            return f"zip member {info.filename!r} is flagged encrypted: torch never writes one (crafted or damaged)"
        begin = info.header_offset
        end = begin + _ZIP_LOCAL_HEADER + len(info.filename.encode("utf-8", "surrogateescape")) + info.compress_size
        if begin < 0 or end > size:
            return f"zip member {info.filename!r} lies beyond the end of the {size}-byte file (truncated?)"
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            return f"zip member {info.filename!r} is stored but its sizes differ"
        if info.file_size > max(info.compress_size, 1) * _MAX_DEFLATE_RATIO:
            return (
                f"zip member {info.filename!r} claims {info.file_size:,} bytes from {info.compress_size:,} (zip bomb?)"
            )
        spans.append((begin, end, info.filename))
    spans.sort()
    for (_, prev_end, prev_name), (begin, _end, name) in itertools.pairwise(spans):
        if begin < prev_end:
            return f"zip members {prev_name!r} and {name!r} overlap in the file (a crafted archive, zip bomb?)"
    return None


def _crc_issue(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> str | None:
    budget = _CRC_BUDGET
    for info in infos:
        if info.file_size > _CRC_MEMBER_MAX or info.file_size > budget:
            continue
        budget -= info.file_size
        try:
            with archive.open(info) as member:
                while member.read(1 << 20):
                    pass
        except zipfile.BadZipFile as err:
            if "CRC" in str(err):
                return f"zip member {info.filename!r} fails its CRC-32 (content changed)"
            raise
    return None


def _check_zip(path: Path, size: int, *, crc: bool) -> str | None:
    if size == 0:
        return "empty file (a torch file is never empty)"
    with os.fdopen(open_read(path), "rb") as fh:
        head = fh.read(4)
        if head[:1] == b"\x80":
            return None  # a legacy (pre-zip) torch pickle: nothing structural to check
        if head != b"PK\x03\x04":
            return "neither a zip archive (torch.save format) nor a legacy pickle: damaged first bytes"
        try:
            # ZipFile reads only the central directory; every member is judged from it before any is read.
            with zipfile.ZipFile(fh) as archive:
                infos = archive.infolist()
                if not infos:
                    return "zip archive with no members"
                issue = _zip_layout_issue(infos, size)
                if issue is None and crc:
                    issue = _crc_issue(archive, infos)
                return issue
        except (
            zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
            zlib.error, struct.error, OverflowError, KeyError, IndexError, RuntimeError,
        ) as err:  # fmt: skip
            return f"torch zip archive unreadable ({type(err).__name__}: {err}); truncated or damaged"


def _check_json(path: Path) -> str | None:
    try:
        value = load_json(path)
    except TrainGuardError as err:
        what = getattr(err, "what", str(err))
        return f"not valid JSON ({what})" if "JSON" not in what else what.replace(str(path), path.name)
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
    except TrainGuardError as err:  # a FIFO, device or socket swapped in after the listing
        return f"unreadable ({err.what})"
    return None


def special_extra(name: str) -> Problem | None:
    base = name.rsplit("/", 1)[-1]
    if base == JIT_SENTINEL:
        return Problem(name, "interrupted", "the Trainer's JIT-save sentinel is still there: that save did not finish")
    if _is_partial_write(name):
        return Problem(name, "interrupted", "a leftover temporary file of an interrupted safetensors write")
    return None
