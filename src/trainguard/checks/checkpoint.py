"""Checkpoint integrity: sha256 manifests as the "this checkpoint is complete" marker, verification, and the newest
verified checkpoint of a run.

The Trainer writes a checkpoint in place, file by file, with no completion marker and no checksum, and
``get_last_checkpoint`` takes the highest number without looking inside. This module adds both:

- :func:`write_manifest` hashes every file of a finished checkpoint and writes, last and atomically,
  ``trainguard-manifest.sha256`` (GNU ``sha256sum`` format: ``cd checkpoint-N && sha256sum -c
  trainguard-manifest.sha256`` checks it as it is). Its presence is the commit marker. The metadata (sizes, step,
  UTC time, library versions) is in ``trainguard-manifest.json``, written just before it and covered by it.
- :func:`verify_checkpoint` checks a folder against its manifest: cheap structural checks first (every file
  present with its recorded size, safetensors headers, JSON, torch zip archives), then sha256 of every file in
  parallel threads. It raises :class:`~trainguard.errors.CheckpointIntegrityError` naming every problem.
- :func:`latest_verified_checkpoint` is ``get_last_checkpoint`` that skips what does not verify.

A folder without a manifest is either an interrupted save (trainguard's saving marker, a half-written manifest, the
Trainer's JIT sentinel or a safetensors temp file is still there) or a *legacy* checkpoint, written without
trainguard: that one gets structural checks only, is reported "unverified (legacy)", never "interrupted", and
``trainguard manifest`` adopts it. Files the Trainer never loads (``.DS_Store``, ``.ipynb_checkpoints/``, a README)
found beside a manifest are warnings, not failures. Which run wrote which checkpoint, and which of them a resume may
use, is :mod:`trainguard.checks.lineage`'s part.

Imports neither torch nor transformers: the ``trainguard verify`` command uses it as is.

Example::

    from trainguard import latest_verified_checkpoint, verify_checkpoint, write_manifest
    write_manifest("out/checkpoint-50")
    verify_checkpoint("out/checkpoint-50")            # raises CheckpointIntegrityError on any damage
    trainer.train(resume_from_checkpoint=str(latest_verified_checkpoint("out")))
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import re
import struct
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._version import __version__
from ..alerts import get_logger
from ..atomic import atomic_write_json, atomic_write_text, fsync_dir, is_temp_name
from ..errors import CheckpointIntegrityError, LineageError
from . import lineage as _lineage
from ._layout import (
    ARCHIVE_DIR,
    JIT_SENTINEL,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    METADATA_NAME,
    QUARANTINE_DIR,
    RUN_MARKER,
    SAVING_MARKER,
    TRAINER_STATE,
    checkpoint_step,
)
from ._resume import checkpoint_dirs

__all__ = [
    "ARCHIVE_DIR",
    "JIT_SENTINEL",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "METADATA_NAME",
    "QUARANTINE_DIR",
    "RUN_MARKER",
    "SAVING_MARKER",
    "CheckpointReport",
    "Problem",
    "ResumeChoice",
    "check_checkpoint",
    "choose_checkpoint",
    "format_sha256_lines",
    "has_manifest",
    "integrity_error",
    "latest_verified_checkpoint",
    "mark_run_uses_manifests",
    "parse_sha256_file",
    "resolve_verified_resume",
    "resume_choice",
    "run_uses_manifests",
    "scan_output_dir",
    "set_aside_checkpoint",
    "sha256_file",
    "verify_checkpoint",
    "write_manifest",
]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 4 << 20  # 4 MiB reads: large enough that hashlib releases the GIL and syscalls are negligible
_MAX_SAFETENSORS_HEADER = 100 << 20  # the limit safetensors itself enforces
_ZIP_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


def _log() -> Any:
    return get_logger()


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# ------------------------------------------------------------------------------------------------------ reports
@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file of a checkpoint.

    ``kind`` is one of ``missing``, ``truncated``, ``size``, ``changed``, ``malformed``, ``extra``,
    ``interrupted``, ``unreadable``, ``unverified`` (no manifest where one was required); in
    :attr:`CheckpointReport.warnings`, ``extra`` (a file the Trainer never loads) or ``stale`` (a leftover marker).
    """

    file: str
    kind: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"file": self.file, "kind": self.kind, "detail": self.detail}

    def format(self) -> str:
        return f"{self.file or '.'}: {self.detail}"


@dataclass
class CheckpointReport:
    """What :func:`check_checkpoint` found in one folder.

    ``mode`` is ``"manifest"`` (sizes, structure and sha256 of every file against the manifest), ``"structural"``
    (a legacy checkpoint, written without trainguard: sizes, headers, JSON, zip CRCs only) or ``"none"`` (nothing
    could be checked: the folder is missing, or the save was interrupted). ``warnings`` are things worth knowing
    that do not make the checkpoint unusable (a ``.DS_Store`` added after the save).
    """

    path: Path
    ok: bool
    mode: str
    step: int | None = None
    files: int = 0
    bytes: int = 0
    hashed_bytes: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``verified``, ``unverified (legacy)`` (structural checks passed, no manifest) or ``FAILED``."""
        if not self.ok:
            return "FAILED"
        return "verified" if self.mode == "manifest" else "unverified (legacy)"

    @property
    def interrupted(self) -> bool:
        """True when the folder is an interrupted save (rather than damaged or legacy)."""
        return any(p.kind == "interrupted" for p in self.problems)

    def describe(self) -> str:
        """One line: the status and, when it failed, every problem."""
        if self.ok:
            extra = f"; warning: {'; '.join(w.format() for w in self.warnings)}" if self.warnings else ""
            return f"{self.path.name}: {self.status} ({self.files} files, {self.mode} checks){extra}"
        return f"{self.path.name}: " + "; ".join(p.format() for p in self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "name": self.path.name,
            "ok": self.ok,
            "status": self.status,
            "mode": self.mode,
            "step": self.step,
            "files": self.files,
            "bytes": self.bytes,
            "hashed_bytes": self.hashed_bytes,
            "seconds": round(self.seconds, 4),
            "problems": [p.to_dict() for p in self.problems],
            "warnings": [w.to_dict() for w in self.warnings],
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------------------ sha256sum format
def _escape_name(name: str) -> tuple[bool, str]:
    # GNU coreutils: a name with a backslash, newline or CR is written escaped and the line starts with "\".
    if "\\" in name or "\n" in name or "\r" in name:
        return True, name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return False, name


def _unescape_name(name: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(name):
        ch = name[i]
        if ch == "\\" and i + 1 < len(name):
            nxt = name[i + 1]
            out.append({"\\": "\\", "n": "\n", "r": "\r"}.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def format_sha256_lines(digests: Mapping[str, str]) -> str:
    """``sha256sum``-format text for ``{relative posix path: hex digest}``, sorted by path."""
    lines = []
    for name in sorted(digests):
        escaped, text = _escape_name(name)
        lines.append(("\\" if escaped else "") + f"{digests[name]}  {text}\n")
    return "".join(lines)


def parse_sha256_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a GNU ``sha256sum`` file into ``{relative path: hex digest}``.

    Accepts text (``"  "``) and binary (``" *"``) lines, escaped names, and ``#`` comment lines.

    Raises:
        ValueError: A line is not in ``sha256sum`` format, or a path repeats or escapes the folder.
        OSError: The file cannot be read.
    """
    digests: dict[str, str] = {}
    with open(path, encoding="utf-8", newline="\n") as fh:
        for number, raw in enumerate(fh, 1):
            line = raw.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            escaped = line.startswith("\\")
            if escaped:
                line = line[1:]
            digest, sep, name = line[:64], line[64:66], line[66:]
            if not _HEX64.match(digest.lower()) or sep not in ("  ", " *") or not name:
                raise ValueError(f"line {number} is not a sha256sum line: {raw[:120]!r}")
            if escaped:
                name = _unescape_name(name)
            parts = Path(name).parts
            if Path(name).is_absolute() or ".." in parts:
                raise ValueError(f"line {number} names a path outside the folder: {name!r}")
            if name in digests:
                raise ValueError(f"line {number} repeats {name!r}")
            digests[name] = digest.lower()
    return digests


# ------------------------------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = _CHUNK, fsync: bool = False) -> str:
    """The hex sha256 of a file, read in ``chunk_size`` chunks into one reused buffer.

    With ``fsync``, the file is also flushed to disk (the Trainer never fsyncs its checkpoint files).
    """
    digest = hashlib.sha256()
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
        if fsync:
            with contextlib.suppress(OSError):  # some filesystems refuse fsync on a read-only descriptor
                os.fsync(fh.fileno())
    return digest.hexdigest()


def _hash_many(
    folder: Path,
    names: Iterable[str],
    sizes: Mapping[str, int],
    workers: int | None,
    *,
    expected: Mapping[str, str] | None = None,
    stop_early: bool = False,
    fsync: bool = False,
) -> dict[str, str | BaseException]:
    """sha256 of ``names`` (relative to ``folder``) in a thread pool; largest first so the pool stays busy.

    With ``stop_early`` and ``expected``, pending files are cancelled at the first mismatch or error.
    """
    order = sorted(names, key=lambda n: -sizes.get(n, 0))
    results: dict[str, str | BaseException] = {}
    if not order:
        return results
    n_workers = max(1, min(workers or _default_workers(), len(order)))
    if n_workers == 1 and not stop_early:
        for name in order:
            try:
                results[name] = sha256_file(folder / name, fsync=fsync)
            except OSError as err:
                results[name] = err
        return results
    with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="trainguard-sha256") as pool:
        pending: dict[Future[str], str] = {pool.submit(sha256_file, folder / name, fsync=fsync): name for name in order}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            failed = False
            for future in done:
                name = pending.pop(future)
                try:
                    results[name] = future.result()
                except OSError as err:
                    results[name] = err
                value = results[name]
                if isinstance(value, BaseException) or (expected is not None and expected.get(name) != value):
                    failed = True
            if failed and stop_early:
                for future in pending:
                    future.cancel()
                break
    return results


# -------------------------------------------------------------------------------------------- file listing
def _is_own_file(name: str) -> bool:
    return name in (MANIFEST_NAME, SAVING_MARKER) or is_temp_name(name)


# What the Trainer (and PEFT, DeepSpeed, FSDP/DCP) loads from a checkpoint folder when it resumes: an unlisted file of
# these kinds can change the resumed state, so it rejects the checkpoint. Anything else unlisted is a warning.
_LOADED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".distcp", ".pkl", ".index.json")
_LOADED_NAMES = frozenset(
    {TRAINER_STATE, "config.json", "generation_config.json", "adapter_config.json", "latest", ".metadata"}
)
_LOADED_DIR_PREFIXES = ("global_step", "pytorch_model_fsdp", "optimizer_", "model_")


def _loaded_on_resume(name: str) -> bool:
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


def _list_files(folder: Path) -> dict[str, int]:
    """``{relative posix path: size}`` of every regular file under ``folder`` (recursively), without the commit
    marker and trainguard temp files."""
    found: dict[str, int] = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        base = Path(root)
        for name in files:
            if _is_own_file(name):
                continue
            path = base / name
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # a broken link, or removed while we listed
            if not os.path.isfile(path):
                continue
            found[path.relative_to(folder).as_posix()] = st.st_size
    return found


def _is_partial_write(name: str) -> bool:
    # safetensors >= 0.8 writes "<dir>/.tmpXXXXXX" then renames; a kill leaves it behind.
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".tmp")


def _step_of(folder: Path) -> int | None:
    return checkpoint_step(folder)


def has_manifest(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` holds a commit marker (``trainguard-manifest.sha256``)."""
    return (Path(folder) / MANIFEST_NAME).is_file()


def run_uses_manifests(output_dir: str | os.PathLike[str]) -> bool:
    """True when ``output_dir`` holds trainguard's registry (written by :class:`~trainguard.CheckpointVerifier` and
    ``trainguard manifest``) or any ``checkpoint-N`` in it has a manifest. Informational: a manifest-less folder is
    judged by what is in it (interrupted or legacy), never by its siblings."""
    folder = Path(output_dir)
    return (folder / RUN_MARKER).is_file() or any(has_manifest(d) for d in checkpoint_dirs(folder))


def mark_run_uses_manifests(output_dir: str | os.PathLike[str]) -> None:
    """Create ``output_dir``'s registry (with no current lineage) if it has none (once; atomic)."""
    marker = Path(output_dir) / RUN_MARKER
    if os.path.lexists(marker):
        return
    atomic_write_json(
        marker,
        {
            "format": _lineage.LINEAGE_FORMAT,
            "since_utc": _utc_now(),
            "meaning": f"trainguard's lineage registry; every checkpoint-N trainguard commits has {MANIFEST_NAME}",
        },
    )


# ----------------------------------------------------------------------------------------- versions, meta
@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"trainguard": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "safetensors", "accelerate", "peft"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _read_metadata(folder: Path) -> dict[str, Any] | None:
    try:
        value = json.loads((folder / METADATA_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


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


def _issue_kind(issue: str) -> str:
    if issue.startswith("unreadable"):
        return "unreadable"
    return "truncated" if issue.startswith("truncated") else "malformed"


def _check_format(path: Path, size: int, *, crc: bool) -> str | None:
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


# -------------------------------------------------------------------------------------------------- checks
def _check_trainer_state(folder: Path, problems: list[Problem]) -> int | None:
    """The ``global_step`` of ``trainer_state.json`` when readable; a mismatch with ``checkpoint-N`` is a problem."""
    expected = _step_of(folder)
    if not (folder / "trainer_state.json").is_file():
        return expected
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        step = int(state.get("global_step"))
    except (OSError, ValueError, TypeError, AttributeError):
        return expected  # unreadable JSON is reported by the format check
    if expected is not None and step != expected:
        problems.append(
            Problem(
                "trainer_state.json",
                "changed",
                f"global_step is {step} but the folder is {folder.name}: not the state saved with this checkpoint",
            )
        )
    return step


def _special_extra(name: str) -> Problem | None:
    base = name.rsplit("/", 1)[-1]
    if base == JIT_SENTINEL:
        return Problem(name, "interrupted", "the Trainer's JIT-save sentinel is still there: that save did not finish")
    if _is_partial_write(name):
        return Problem(name, "interrupted", "a leftover temporary file of an interrupted safetensors write")
    return None


def _check_with_manifest(folder: Path, report: CheckpointReport, workers: int | None, stop_early: bool) -> None:
    problems = report.problems
    try:
        expected = parse_sha256_file(folder / MANIFEST_NAME)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problems.append(Problem(MANIFEST_NAME, "unreadable", f"the manifest is damaged ({err})"))
        return
    actual = _list_files(folder)
    report.files = len(expected)
    report.bytes = sum(actual.get(n, 0) for n in expected)

    sizes: dict[str, int] = {}
    if METADATA_NAME in expected and METADATA_NAME in actual:
        meta_digest = sha256_file(folder / METADATA_NAME)
        report.hashed_bytes += actual[METADATA_NAME]
        if meta_digest != expected[METADATA_NAME]:
            problems.append(Problem(METADATA_NAME, "changed", "the manifest metadata changed since it was written"))
        else:
            meta = _read_metadata(folder) or {}
            entries = meta.get("files") if isinstance(meta.get("files"), dict) else {}
            for name, entry in (entries or {}).items():
                if isinstance(entry, dict) and isinstance(entry.get("size"), int):
                    sizes[name] = entry["size"]
    elif METADATA_NAME not in expected:
        report.notes.append(f"{METADATA_NAME} is not listed: sizes unknown, content checked by sha256 only")

    failed: set[str] = {METADATA_NAME} if problems else set()
    for name in sorted(expected):
        if name not in actual:
            problems.append(Problem(name, "missing", "missing (listed in the manifest)"))
            failed.add(name)
    for name in sorted(set(actual) - set(expected)):
        special = _special_extra(name)
        if special is not None and name.rsplit("/", 1)[-1] == JIT_SENTINEL:
            # The commit marker is written only after the Trainer's save returned: a JIT sentinel beside it is a
            # leftover of that save (or of a JIT save this run skipped), not an unfinished write.
            report.warnings.append(
                Problem(
                    name,
                    "stale",
                    "the Trainer's JIT sentinel is still there, but this save was committed after it completed",
                )
            )
        elif special is not None:
            problems.append(special)
        elif _loaded_on_resume(name):
            problems.append(
                Problem(
                    name,
                    "extra",
                    "not in the manifest: a file a resume would load, added or renamed after the checkpoint was saved",
                )
            )
        else:
            report.warnings.append(
                Problem(
                    name, "extra", "not in the manifest, ignored: added after the save, and never loaded by a resume"
                )
            )
    for name in sorted(set(expected) & set(actual)):
        if name in sizes and actual[name] != sizes[name]:
            kind = "truncated" if actual[name] < sizes[name] else "size"
            word = "truncated" if kind == "truncated" else "size changed"
            problems.append(Problem(name, kind, f"{word}: {actual[name]} bytes, {sizes[name]} when saved"))
            failed.add(name)
    suspects: dict[str, str] = {}
    for name in sorted(set(expected) & set(actual) - failed):
        issue = _check_format(folder / name, actual[name], crc=False)
        if issue is not None:
            suspects[name] = issue
    if suspects:
        # A file can be odd from the start (a ".bin" that is not a torch file): only a file that also differs from
        # its recorded hash is damaged, so hash the suspects first, before the rest.
        suspect_digests = _hash_many(folder, suspects, actual, workers)
        for name, issue in suspects.items():
            failed.add(name)
            if suspect_digests.get(name) == expected[name]:
                report.hashed_bytes += actual[name]
                report.notes.append(f"{name}: {issue}, but unchanged since the manifest was written")
            else:
                problems.append(Problem(name, _issue_kind(issue), issue))

    if problems and stop_early:
        report.notes.append("sha256 hashing skipped: the structural checks already failed")
        return
    to_hash = [n for n in expected if n in actual and n not in failed and n != METADATA_NAME]
    digests = _hash_many(folder, to_hash, actual, workers, expected=expected, stop_early=stop_early)
    for name in sorted(digests):
        value = digests[name]
        if isinstance(value, BaseException):
            problems.append(Problem(name, "unreadable", f"unreadable ({type(value).__name__}: {value})"))
        elif value != expected[name]:
            problems.append(
                Problem(name, "changed", f"content changed: sha256 {value[:12]}…, {expected[name][:12]}… when saved")
            )
        else:
            report.hashed_bytes += actual[name]
    if len(digests) < len(to_hash):
        report.notes.append("sha256 hashing stopped at the first mismatch")


def _interruption(folder: Path) -> Problem | None:
    """Evidence, in a folder without a commit marker, that trainguard began a save or its commit there."""
    if (folder / SAVING_MARKER).is_file():
        origin = _lineage.checkpoint_origin(folder)
        who = f" (lineage {origin.lineage}, run {origin.run})" if origin.lineage else ""
        return Problem(
            SAVING_MARKER,
            "interrupted",
            f"trainguard began this save{who} and it never committed: killed during the save or while its manifest "
            "was written",
        )
    if (folder / METADATA_NAME).is_file():
        return Problem(
            MANIFEST_NAME,
            "interrupted",
            f"{METADATA_NAME} is there but not the commit marker {MANIFEST_NAME}: killed while the manifest was "
            "being written",
        )
    return None


def _check_structure_only(folder: Path, report: CheckpointReport, require_state: bool) -> None:
    problems = report.problems
    actual = _list_files(folder)
    report.files = len(actual)
    report.bytes = sum(actual.values())
    if require_state and "trainer_state.json" not in actual:
        problems.append(
            Problem(
                "trainer_state.json",
                "missing",
                "missing: the Trainer writes it last, so the save did not finish (killed mid-save?)",
            )
        )
    for name in sorted(actual):
        special = _special_extra(name)
        if special is not None:
            problems.append(special)
            continue
        issue = _check_format(folder / name, actual[name], crc=True)
        if issue is not None:
            problems.append(Problem(name, _issue_kind(issue), issue))
    report.notes.append(
        "no manifest (a legacy checkpoint, written without trainguard): structural checks only (sizes, safetensors "
        "headers, JSON, zip CRC-32); a changed byte inside tensor data is not detectable without a manifest "
        "(`trainguard manifest` adopts it)"
    )


def check_checkpoint(
    path: str | os.PathLike[str],
    *,
    require_manifest: bool | None = None,
    workers: int | None = None,
    stop_early: bool = False,
) -> CheckpointReport:
    """Check one checkpoint folder and report every problem; never raises for a damaged checkpoint.

    Args:
        path: The checkpoint folder (``out/checkpoint-50``, a LoRA checkpoint, a ``safe_merge`` version, ...).
        require_manifest: Whether a missing manifest is itself a failure. ``None``/``False`` (default): a folder
            without one is an interrupted save when trainguard's saving marker or a half-written manifest is there,
            else a legacy checkpoint that gets structural checks only (``status`` "unverified (legacy)").
        workers: Threads hashing files in parallel (default: the CPU count, at most 8).
        stop_early: Stop at the first problem (for choosing a checkpoint, where the first reason is enough).

    Example::

        report = check_checkpoint("out/checkpoint-50")
        print(report.ok, [p.format() for p in report.problems])
    """
    folder = Path(path)
    start = time.perf_counter()
    report = CheckpointReport(path=folder, ok=False, mode="none", step=_step_of(folder))
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        report.problems.append(Problem("", "missing", f"the checkpoint {folder} {what}"))
        return report
    if has_manifest(folder):
        report.mode = "manifest"
        _check_with_manifest(folder, report, workers, stop_early)
    else:
        interrupted = _interruption(folder)
        if interrupted is not None:
            report.problems.append(interrupted)
        elif require_manifest:
            report.problems.append(
                Problem(
                    MANIFEST_NAME,
                    "unverified",
                    f"no commit marker {MANIFEST_NAME}: not written (or adopted) by trainguard; `trainguard manifest` "
                    "adopts it after its structural checks pass",
                )
            )
        else:
            report.mode = "structural"
            _check_structure_only(folder, report, require_state=_step_of(folder) is not None)
    if report.mode != "none" and (not report.problems or not stop_early):
        state_step = _check_trainer_state(folder, report.problems)
        if report.step is None:
            report.step = state_step
    report.ok = not report.problems
    report.seconds = time.perf_counter() - start
    return report


def _older_verified(folder: Path, workers: int | None) -> Path | None:
    step = _step_of(folder)
    if step is None:
        return None
    origin = _lineage.checkpoint_origin(folder)
    scope = (
        _lineage.LineageScope(origin.lineage, True, "given")
        if origin.lineage is not None
        else _lineage.current_scope(folder.parent)
    )
    older = [d for d in checkpoint_dirs(folder.parent) if (_step_of(d) or 0) < step]
    for candidate in reversed(older):
        if not scope.admits(_lineage.checkpoint_origin(candidate)):
            continue
        if check_checkpoint(candidate, workers=workers, stop_early=True).ok:
            return candidate
    return None


def integrity_error(report: CheckpointReport, *, alternative: Path | None = None) -> CheckpointIntegrityError:
    """The :class:`CheckpointIntegrityError` for a failed report: every problem named, the next step concrete."""
    folder = report.path
    named = [p.file for p in report.problems if p.file]
    what = f"{folder.name} failed verification ({len(report.problems)} problem(s)): " + "; ".join(
        p.format() for p in report.problems
    )
    where: dict[str, Any] = {"file": str(folder / named[0]) if named else str(folder)}
    if len(set(named)) > 1:
        where["files"] = ", ".join(dict.fromkeys(named))
    where["checkpoint"] = str(folder)
    if alternative is not None:
        next_step = (
            f"Resume from {alternative}, the newest older checkpoint that verifies: pass that path, or use "
            f"train(resume_from_checkpoint=True) with CheckpointVerifier, which sets {folder.name} aside in "
            f"{QUARANTINE_DIR}/ and resumes from it. Nothing is deleted."
        )
    else:
        next_step = (
            "No older checkpoint verifies: start fresh, or restore this checkpoint from a backup. "
            "`trainguard verify OUTPUT_DIR` lists every checkpoint's status; nothing is deleted."
        )
    return CheckpointIntegrityError(
        what,
        where=where,
        next_step=next_step,
        evidence={
            "checkpoint": str(folder),
            "mode": report.mode,
            "problems": [p.to_dict() for p in report.problems],
            "older_verified": str(alternative) if alternative is not None else None,
        },
    )


def verify_checkpoint(
    path: str | os.PathLike[str],
    *,
    require_manifest: bool | None = None,
    workers: int | None = None,
) -> CheckpointReport:
    """Verify a checkpoint folder; raise naming every missing, truncated or changed file.

    Cheap structural checks run first (every listed file present with its recorded size, safetensors headers,
    JSON files, torch zip archives), then the sha256 of every file, in parallel threads. Without a manifest in the
    whole run, only the structural checks run (``report.mode == "structural"``, and ``report.notes`` says so).

    Args:
        path: The checkpoint folder.
        require_manifest: See :func:`check_checkpoint`.
        workers: Threads hashing files in parallel (default: the CPU count, at most 8).

    Returns:
        The :class:`CheckpointReport` (``ok`` is True).

    Raises:
        CheckpointIntegrityError: Anything failed; ``where["file"]`` names the first file, ``what`` every problem,
            ``evidence["problems"]`` all of them, ``next_step`` the newest older checkpoint that verifies.

    Example::

        verify_checkpoint("out/checkpoint-50")
    """
    report = check_checkpoint(path, require_manifest=require_manifest, workers=workers)
    if not report.ok:
        raise integrity_error(report, alternative=_older_verified(report.path, workers))
    return report


# --------------------------------------------------------------------------------------------- the manifest
def write_manifest(
    checkpoint_dir: str | os.PathLike[str],
    *,
    step: int | None = None,
    workers: int | None = None,
    extra: Mapping[str, Any] | None = None,
    lineage: Mapping[str, Any] | None = None,
) -> Path:
    """Hash every file of a finished checkpoint and write its manifest, the commit marker last.

    Writes ``trainguard-manifest.json`` (format, step, UTC time, library versions, and each file's size and sha256)
    and then ``trainguard-manifest.sha256``, one ``<sha256>  <relative path>`` line per file including the JSON,
    both atomically (temporary name, fsync, rename). Every file is fsynced while it is hashed, so the marker never
    vouches for data that is only in the page cache. ``sha256sum -c trainguard-manifest.sha256`` run inside the
    folder checks it. An existing marker is removed first, so a kill while rewriting leaves "no manifest" (an
    interrupted save), never a stale one. The folder's mtime is restored afterwards: the Trainer's rotation sorts
    checkpoints by mtime. trainguard's saving marker, if there, is removed after the commit marker is written; the
    Trainer's JIT sentinel is never listed (JIT checkpointing removes it after its save returns).

    Call it only once every process has finished writing the folder.

    Args:
        checkpoint_dir: The checkpoint folder.
        step: The global step (default: from ``checkpoint-N`` or ``trainer_state.json``).
        workers: Threads hashing files in parallel (default: the CPU count, at most 8).
        extra: More JSON-able facts for the metadata, under ``"extra"``.
        lineage: Who wrote the checkpoint and how (``lineage``, ``run``, ``step``, ``saved_by``,
            ``save_only_model``, ``world_size``, ...), under ``"lineage"``; see :mod:`trainguard.checks.lineage`.

    Returns:
        The path of the ``.sha256`` marker.

    Raises:
        FileNotFoundError: The folder (or a file in it) vanished, e.g. removed by checkpoint rotation.
        OSError: Writing failed.

    Example::

        write_manifest("out/checkpoint-50")   # then: cd out/checkpoint-50 && sha256sum -c trainguard-manifest.sha256
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a checkpoint folder: {folder}")
    start = time.perf_counter()
    folder_stat = folder.stat()
    marker = folder / MANIFEST_NAME
    marker.unlink(missing_ok=True)
    files = _list_files(folder)
    files.pop(METADATA_NAME, None)
    files.pop(JIT_SENTINEL, None)
    leftovers = sorted(n for n in files if _special_extra(n) is not None)
    if leftovers:
        _log().warning(
            "trainguard: %s holds leftovers of an earlier interrupted write (%s); they are listed in its manifest "
            "as they are",
            folder,
            ", ".join(leftovers),
        )
    # fsync while hashing: once the marker exists, the files it vouches for are on disk, not only in the page cache.
    digests = _hash_many(folder, files, files, workers, fsync=True)
    for value in digests.values():
        if isinstance(value, BaseException):
            raise value
    if step is None:
        step = _step_of(folder)
        if step is None and "trainer_state.json" in files:
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                step = int(json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    meta: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "algorithm": "sha256",
        "checkpoint": folder.name,
        "step": step,
        "created_utc": _utc_now(),
        "host": platform.node(),
        "versions": _versions(),
        "total_bytes": sum(files.values()),
        "hash_seconds": round(time.perf_counter() - start, 4),
        "files": {name: {"size": files[name], "sha256": digests[name]} for name in sorted(files)},
    }
    if lineage:
        meta["lineage"] = dict(lineage)
    if extra:
        meta["extra"] = dict(extra)
    atomic_write_json(folder / METADATA_NAME, meta)
    lines = {name: str(digests[name]) for name in files}
    lines[METADATA_NAME] = sha256_file(folder / METADATA_NAME)
    for sub in {(folder / name).parent for name in files}:
        fsync_dir(sub)
    atomic_write_text(marker, format_sha256_lines(lines))
    _lineage.end_save(folder)
    with contextlib.suppress(OSError):
        os.utime(folder, ns=(folder_stat.st_atime_ns, folder_stat.st_mtime_ns))
    return marker


# ---------------------------------------------------------------------------------------------- run level
def set_aside_checkpoint(checkpoint: str | os.PathLike[str], reason: str, *, problems: Iterable[Problem] = ()) -> Path:
    """Move a failed checkpoint to ``output_dir/trainguard-quarantine/<name>.<UTC time>`` (never delete it).

    The rename stays on the same filesystem (atomic), and the new name is outside the Trainer's ``checkpoint-*``
    glob, so neither ``get_last_checkpoint`` nor rotation ever sees it again. The reason is written beside it as
    ``<new name>.reason.json``.

    Returns:
        The folder's new path.

    Example::

        set_aside_checkpoint("out/checkpoint-60", "model.safetensors changed")
    """
    folder = Path(checkpoint)
    target = _lineage.move_aside(folder, reason, into=QUARANTINE_DIR, problems=list(problems))
    _log().warning("trainguard: set aside %s -> %s (%s)", folder, target, reason)
    return target


def scan_output_dir(
    output_dir: str | os.PathLike[str],
    *,
    workers: int | None = None,
    stop_early: bool = False,
) -> list[CheckpointReport]:
    """A report for every ``checkpoint-N`` in ``output_dir``, oldest first (legacy ones get structural checks)."""
    return [check_checkpoint(d, workers=workers, stop_early=stop_early) for d in checkpoint_dirs(output_dir)]


@dataclass
class ResumeChoice:
    """What :func:`choose_checkpoint` found: the chosen folder (or None), who wrote it, its report, the lineage
    scope it was chosen in, the checkpoints that failed (with where each was set aside), and the checkpoints of
    other lineages that were not considered."""

    path: Path | None
    scope: _lineage.LineageScope
    origin: _lineage.CheckpointOrigin | None = None
    report: CheckpointReport | None = None
    failures: list[tuple[CheckpointReport, Path | None]] = field(default_factory=list)
    excluded: list[_lineage.CheckpointOrigin] = field(default_factory=list)
    considered: int = 0


def _scope_for(output_dir: str | os.PathLike[str], lineage: str | None, origins: list[Any]) -> _lineage.LineageScope:
    if lineage == "current":
        return _lineage.current_scope(output_dir, origins)
    if lineage is None:
        return _lineage.LineageScope(None, True, "none")
    return _lineage.LineageScope(str(lineage), False, "given")


def choose_checkpoint(
    output_dir: str | os.PathLike[str],
    *,
    lineage: str | None = "current",
    set_aside: bool = False,
    workers: int | None = None,
    on_failure: Callable[[CheckpointReport, Path | None], None] | None = None,
) -> ResumeChoice:
    """The newest checkpoint of ``output_dir`` in the lineage scope that verifies, with everything learnt on the way.

    See :func:`latest_verified_checkpoint` for the arguments. Checkpoints outside the scope are never checked, set
    aside or chosen; they are listed in ``excluded``.
    """
    origins = [_lineage.checkpoint_origin(d) for d in checkpoint_dirs(output_dir)]
    scope = _scope_for(output_dir, lineage, origins)
    eligible = [o for o in origins if scope.admits(o)]
    choice = ResumeChoice(None, scope, excluded=[o for o in origins if not scope.admits(o)], considered=len(eligible))
    if choice.excluded:
        _log().info(
            "trainguard: not considered in %s (not %s): %s",
            output_dir,
            scope.describe(),
            _lineage.describe_many(choice.excluded),
        )
    for origin in reversed(eligible):
        report = check_checkpoint(origin.path, workers=workers, stop_early=True)
        if report.ok:
            if report.mode == "structural":
                _log().info(
                    "trainguard: %s is a legacy checkpoint (written without trainguard): structural checks only",
                    origin.path,
                )
            choice.path, choice.origin, choice.report = origin.path, origin, report
            return choice
        reason = "; ".join(p.format() for p in report.problems)
        if report.mode == "structural":
            reason = f"legacy checkpoint (no manifest), structural checks only: {reason}"
        moved: Path | None = None
        if set_aside:
            moved = set_aside_checkpoint(origin.path, reason, problems=report.problems)
        else:
            _log().warning("trainguard: skipping %s: %s", origin.path, reason)
        choice.failures.append((report, moved))
        if on_failure is not None:
            on_failure(report, moved)
    return choice


def latest_verified_checkpoint(
    output_dir: str | os.PathLike[str],
    *,
    set_aside: bool = False,
    workers: int | None = None,
    on_failure: Callable[[CheckpointReport, Path | None], None] | None = None,
    lineage: str | None = "current",
) -> Path | None:
    """The newest ``checkpoint-N`` of the output_dir's current run lineage that verifies, or None.

    Checks from the newest down and stops at the first that passes, so a healthy run costs one verification. A
    legacy checkpoint (written without trainguard) "verifies" when it passes the structural checks, and the log says
    so. Checkpoints of another lineage (another run that saved into the same folder) are never chosen.

    Args:
        output_dir: The run's output folder.
        set_aside: Move each newer checkpoint of the lineage that fails to ``trainguard-quarantine/`` (renamed, never
            deleted), so the Trainer can neither resume from it nor save into it again.
        workers: Threads hashing files in parallel.
        on_failure: Called with each failed report and its new path (when set aside), e.g. to alert.
        lineage: ``"current"`` (default): the lineage the registry names current (else the newest checkpoint's);
            a lineage id: that lineage only; None: any checkpoint, as ``get_last_checkpoint`` does.

    Example::

        ckpt = latest_verified_checkpoint("out")
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    """
    return choose_checkpoint(
        output_dir, lineage=lineage, set_aside=set_aside, workers=workers, on_failure=on_failure
    ).path


def resume_choice(
    output_dir: str | os.PathLike[str] | None,
    resume_from_checkpoint: Any = True,
    *,
    set_aside: bool = True,
    workers: int | None = None,
    on_failure: Callable[[CheckpointReport, Path | None], None] | None = None,
) -> ResumeChoice | None:
    """:func:`resolve_verified_resume` with the details (who wrote the choice, what failed, what was excluded).

    Returns None for ``None``/``False``, or ``True`` with no checkpoint at all.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is not True:
        path = Path(os.fspath(resume_from_checkpoint))
        report = verify_checkpoint(path, workers=workers)
        origin = _lineage.checkpoint_origin(path)
        return ResumeChoice(path, _lineage.LineageScope(origin.lineage, True, "given"), origin, report, considered=1)
    if output_dir is None or not checkpoint_dirs(output_dir):
        return None
    choice = choose_checkpoint(output_dir, set_aside=set_aside, workers=workers, on_failure=on_failure)
    if choice.path is not None:
        return choice
    others = _lineage.describe_many(choice.excluded)
    if not choice.failures:
        raise LineageError(
            f"resume_from_checkpoint=True in {output_dir}: no checkpoint there belongs to the current run lineage "
            f"({choice.scope.describe()}); the ones there are another run's: {others}",
            where={"file": str(output_dir), "checkpoint": str(choice.excluded[-1].path)},
            next_step=(
                "To continue one of them, pass its path: train(resume_from_checkpoint='.../checkpoint-N') (its run "
                "lineage then becomes current). To start over, train without resume_from_checkpoint "
                "(see CheckpointVerifier's existing_checkpoints option)."
            ),
            evidence={"scope": choice.scope.describe(), "checkpoints": [o.to_dict() for o in choice.excluded]},
        )
    listing = "; ".join(r.describe() + (f" (set aside to {m})" if m is not None else "") for r, m in choice.failures)
    others_note = f" Other runs' checkpoints were not considered: {others}." if others else ""
    raise CheckpointIntegrityError(
        f"none of the {len(choice.failures)} checkpoint(s) of the current run lineage in {output_dir} verifies: "
        f"{listing}",
        where={"file": str(output_dir)},
        next_step=(
            "Start fresh (train() without resume_from_checkpoint), or restore a checkpoint from a backup; "
            f"the failed ones are kept{' in ' + QUARANTINE_DIR + '/' if set_aside else ''}.{others_note}"
        ),
        evidence={"checkpoints": [r.to_dict() for r, _ in choice.failures]},
    )


def resolve_verified_resume(
    output_dir: str | os.PathLike[str] | None,
    resume_from_checkpoint: Any = True,
    *,
    set_aside: bool = True,
    workers: int | None = None,
    on_failure: Callable[[CheckpointReport, Path | None], None] | None = None,
) -> Path | None:
    """The checkpoint to pass to ``trainer.train(resume_from_checkpoint=...)``, verified; a pre-flight.

    ``True`` resolves to :func:`latest_verified_checkpoint` in the output_dir's current run lineage (newer
    checkpoints of it that fail are set aside when ``set_aside``); an explicit path is verified and refused when it
    fails; ``None``/``False`` give None.

    Returns:
        The verified folder, or None when there is nothing to resume from (``True`` and no checkpoint at all).

    Raises:
        CheckpointIntegrityError: The explicit path fails verification, or ``True`` and no checkpoint of the current
            lineage verifies.
        LineageError: ``True``, and every checkpoint there belongs to another run lineage.

    Example::

        ckpt = resolve_verified_resume("out", True)
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    """
    choice = resume_choice(
        output_dir, resume_from_checkpoint, set_aside=set_aside, workers=workers, on_failure=on_failure
    )
    return choice.path if choice is not None else None
