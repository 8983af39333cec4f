"""The manifest: GNU ``sha256sum`` lines as the commit marker, hashing in a thread pool, and writing it.

:func:`write_manifest` hashes every file of a finished checkpoint and writes ``trainguard-manifest.json`` (sizes, step,
time, versions, run lineage) and, last and atomically, ``trainguard-manifest.sha256``: the commit marker.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import re
import stat
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..._util import default_workers, utc_now
from ..._version import __version__
from ...alerts import get_logger
from ...atomic import (
    atomic_write_bytes,
    atomic_write_json,
    can_sync_filesystem,
    fsync_dir,
    fsync_file,
    is_temp_name,
    sync_filesystem,
)
from ...errors import TrainGuardError, UnsafeFileError
from ...safe_fs import describe_kind, display_name, iter_files, load_json, open_read, read_bytes
from .. import lineage as _lineage
from .._layout import (
    JIT_SENTINEL,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    METADATA_NAME,
    RUN_MARKER,
    SAVING_MARKER,
    checkpoint_step,
)
from .._resume import checkpoint_dirs
from .formats import special_extra

__all__ = [
    "FolderListing",
    "format_sha256_lines",
    "has_manifest",
    "hash_many",
    "known_digests",
    "list_files",
    "mark_run_uses_manifests",
    "parse_sha256_file",
    "read_metadata",
    "run_uses_manifests",
    "scan_folder",
    "sha256_file",
    "write_manifest",
]

#: A rank's share of a split manifest (``.trainguard-hashes-rank{r}.json``), merged and removed by the writer.
PARTIAL_PREFIX = ".trainguard-hashes-rank"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: Digests other processes computed: ``{absolute path: (size, mtime_ns, sha256)}`` (see :func:`known_digests`).
_KNOWN: ContextVar[Mapping[str, tuple[int, int, str]] | None] = ContextVar("trainguard_known_digests", default=None)
_CHUNK = 4 << 20  # 4 MiB reads: large enough that hashlib releases the GIL and syscalls are negligible
#: A manifest line is ~70 bytes plus the name: this allows millions of files and stops a crafted giant.
_MAX_MANIFEST_BYTES = 256 << 20


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
    try:
        # a regular file only (a FIFO planted at the marker never blocks), bounded
        data = read_bytes(path, limit=_MAX_MANIFEST_BYTES)
    except TrainGuardError as err:
        raise ValueError(err.what) from None
    # Names are bytes to sha256sum; one that is not UTF-8 comes back as the str os.listdir gives for it.
    for number, line in enumerate(data.decode("utf-8", "surrogateescape").split("\n"), 1):
        raw = line
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
        if name.startswith("/") or ".." in name.split("/"):
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
    # open_read: O_NONBLOCK + fstat, so a FIFO or device is refused (UnsafeFileError), never read and blocked on
    with os.fdopen(open_read(path), "rb", buffering=0) as fh:
        # A buffer of the file's size, not of the chunk: zeroing 8 MiB per 300-byte file was most of the cost of
        # a checkpoint of many small files (#28). +1 so a file that is exactly its size ends in one more read.
        buffer = bytearray(min(chunk_size, os.fstat(fh.fileno()).st_size + 1))
        view = memoryview(buffer)
        while True:
            n = fh.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
        if fsync:
            with contextlib.suppress(OSError):  # some filesystems refuse fsync on a read-only descriptor
                os.fsync(fh.fileno())
    return digest.hexdigest()


@contextlib.contextmanager
def known_digests(digests: Mapping[str, tuple[int, int, str]] | None) -> Iterator[None]:
    """Within the block, :func:`hash_many` takes a file's sha256 from ``digests`` (``{absolute path: (size,
    mtime_ns, sha256)}``, computed by another rank) instead of reading it, when the file's size and mtime still
    match; any other file is hashed as usual. Verification and manifests split over ranks use it."""
    token = _KNOWN.set(digests)
    try:
        yield
    finally:
        _KNOWN.reset(token)


def _take_known(folder: Path, names: list[str], results: dict[str, str | BaseException]) -> list[str]:
    known = _KNOWN.get()
    if not known:
        return names
    rest = []
    for name in names:
        entry = known.get(os.path.abspath(folder / name))
        if entry is not None:
            with contextlib.suppress(OSError):
                st = os.stat(folder / name)
                if (st.st_size, st.st_mtime_ns) == tuple(entry[:2]):
                    results[name] = entry[2]
                    continue
        rest.append(name)
    return rest


# Small files are hashed in batches: one future per 300-byte file cost more than its hashing (#28), and hashlib
# holds the GIL for inputs under 2 KiB, so threads only add contention there. A large file is a batch of its own.
_BATCH_FILES = 256
_BATCH_BYTES = 16 << 20
# Above this many files, one sync of the filesystem replaces a fsync per file (8k fsyncs: 2.5 s of a 2.9 s manifest).
_SYNCFS_FILES = 512


def _batches(order: list[str], sizes: Mapping[str, int]) -> list[list[str]]:
    batches: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name in order:
        size = sizes.get(name, 0)
        if size >= _BATCH_BYTES:
            batches.append([name])
            continue
        current.append(name)
        current_bytes += size
        if len(current) >= _BATCH_FILES or current_bytes >= _BATCH_BYTES:
            batches.append(current)
            current, current_bytes = [], 0
    if current:
        batches.append(current)
    return batches


def _hash_batch(folder: Path, names: list[str], fsync: bool) -> list[tuple[str, str | BaseException]]:
    out: list[tuple[str, str | BaseException]] = []
    for name in names:
        try:
            out.append((name, sha256_file(folder / name, fsync=fsync)))
        except (OSError, UnsafeFileError) as err:
            out.append((name, err))
    return out


def hash_many(
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

    With ``stop_early`` and ``expected``, pending files are cancelled at the first mismatch or error. With ``fsync``
    the files are on disk when it returns (one filesystem sync for many files, else a fsync per file). Linear in the
    number of files: small files go in batches, and at most a few batches are in flight.
    """
    results: dict[str, str | BaseException] = {}
    order = _take_known(folder, sorted(names, key=lambda n: -sizes.get(n, 0)), results)
    if not order:
        return results
    per_file_fsync = fsync and not (len(order) > _SYNCFS_FILES and can_sync_filesystem())
    batches = _batches(order, sizes)
    n_workers = max(1, min(workers or default_workers(8), len(batches)))
    if n_workers == 1 and not stop_early:
        for batch in batches:
            results.update(_hash_batch(folder, batch, per_file_fsync))
    else:
        _hash_in_pool(folder, batches, n_workers, per_file_fsync, results, expected, stop_early)
    if fsync and not per_file_fsync and not sync_filesystem(folder):
        for name, value in results.items():  # the sync failed after all: fall back to a fsync per file
            if isinstance(value, str):
                with contextlib.suppress(OSError, UnsafeFileError):
                    fsync_file(folder / name)
    return results


def _hash_in_pool(
    folder: Path,
    batches: list[list[str]],
    n_workers: int,
    fsync: bool,
    results: dict[str, str | BaseException],
    expected: Mapping[str, str] | None,
    stop_early: bool,
) -> None:
    """Hash ``batches`` in ``n_workers`` threads into ``results``; with ``stop_early``, stop at the first error or
    digest other than ``expected``. A bounded window of futures: waiting on all of them at once costs O(pending) per
    wait, O(files^2) in all (#28: 131 s for 20k files, 600+ s for 200k)."""
    window = 4 * n_workers
    queued = iter(batches)
    with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="trainguard-sha256") as pool:
        pending: set[Future[list[tuple[str, str | BaseException]]]] = set()

        def refill() -> None:
            for batch in queued:
                pending.add(pool.submit(_hash_batch, folder, batch, fsync))
                if len(pending) >= window:
                    return

        refill()
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            failed = False
            for future in done:
                for name, value in future.result():
                    results[name] = value
                    if isinstance(value, BaseException) or (expected is not None and expected.get(name) != value):
                        failed = True
            if failed and stop_early:
                for future in pending:
                    future.cancel()
                return
            refill()


# -------------------------------------------------------------------------------------------- file listing
def _is_own_file(name: str) -> bool:
    return name in (MANIFEST_NAME, SAVING_MARKER) or name.startswith(PARTIAL_PREFIX)


@dataclass
class FolderListing:
    """Everything under a checkpoint folder, sorted by what it is.

    ``files``: ``{relative posix path: size}`` of the regular files (and links to regular files) a manifest covers;
    ``links_out``: ``{name: target}`` for those of them that are links leading outside the folder; ``special``:
    ``{name: what it is}`` for entries that are not regular files (a FIFO, socket, device, a link to a folder, a
    broken link), never opened; ``temps``: leftovers of an interrupted trainguard write (``atomic.is_temp_name``);
    ``nested_manifests``: commit markers found in subfolders (a checkpoint copied into another?).
    """

    files: dict[str, int] = field(default_factory=dict)
    links_out: dict[str, str] = field(default_factory=dict)
    special: dict[str, str] = field(default_factory=dict)
    temps: list[str] = field(default_factory=list)
    nested_manifests: list[str] = field(default_factory=list)


def checkpoint_totals(folder: str | os.PathLike[str]) -> tuple[int, int]:
    """``(files, bytes)`` of a checkpoint folder: the one count ``trainguard verify`` and ``trainguard inspect`` both
    show. Every regular file in it at any depth, trainguard's manifest included (what ``du`` and ``ls -R`` see), by
    its size; links and special files are neither counted nor followed.

    Example::

        checkpoint_totals("out/checkpoint-50")   # (10, 393400)
    """
    files = total = 0
    for item in iter_files(folder):
        try:
            info = os.lstat(item)
        except OSError:
            continue  # removed while we counted
        if stat.S_ISREG(info.st_mode):
            files += 1
            total += info.st_size
    return files, total


def scan_folder(folder: Path) -> FolderListing:
    """List ``folder`` recursively without opening anything: one ``lstat`` a file (two for a link), links to folders
    never followed. trainguard's own files at the top (the commit marker, the saving marker, a rank's partial hashes)
    are left out."""
    listing = FolderListing()
    root_real: str | None = None
    todo = [(folder, "")]
    while todo:
        base, prefix = todo.pop()
        try:
            entries = sorted(os.scandir(base), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed while we listed
        for entry in entries:
            name = entry.name
            relative = prefix + name
            if not prefix and _is_own_file(name):
                continue
            if is_temp_name(name):
                listing.temps.append(relative)
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                todo.append((Path(entry.path), relative + "/"))
                continue
            if stat.S_ISLNK(mode):
                try:
                    st = os.stat(entry.path)
                except OSError:
                    listing.special[relative] = "a broken symbolic link"
                    continue
                if not stat.S_ISREG(st.st_mode):
                    listing.special[relative] = f"a symbolic link to {describe_kind(st.st_mode)}"
                    continue
                if root_real is None:
                    root_real = os.path.realpath(folder)
                target = os.path.realpath(entry.path)
                if os.path.commonpath([root_real, target]) != root_real:
                    listing.links_out[relative] = target
            elif not stat.S_ISREG(mode):
                listing.special[relative] = describe_kind(mode)
                continue
            if prefix and name == MANIFEST_NAME:
                listing.nested_manifests.append(relative)
            listing.files[relative] = st.st_size
    return listing


def list_files(folder: Path) -> dict[str, int]:
    """``{relative posix path: size}`` of every regular file under ``folder`` (recursively, links to regular files
    included), without the commit marker and trainguard temp files; see :func:`scan_folder` for the rest."""
    return scan_folder(folder).files


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
            "since_utc": utc_now(),
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


def read_metadata(folder: Path) -> dict[str, Any] | None:
    """The manifest metadata as a dict, or None when it is missing, not a regular file, or not a JSON object."""
    try:
        value = load_json(folder / METADATA_NAME)
    except (OSError, TrainGuardError):
        return None
    return value if isinstance(value, dict) else None


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
    listing = scan_folder(folder)
    files = listing.files
    files.pop(METADATA_NAME, None)
    files.pop(JIT_SENTINEL, None)
    leftovers = sorted(n for n in files if special_extra(n) is not None)
    if leftovers:
        get_logger().warning(
            "trainguard: %s holds leftovers of an earlier interrupted write (%s); they are listed in its manifest "
            "as they are",
            folder,
            ", ".join(leftovers),
        )
    skipped = [f"{display_name(n)} ({what})" for n, what in sorted(listing.special.items())]
    skipped += [f"{display_name(n)} (a link out to {display_name(t)})" for n, t in listing.links_out.items()]
    if skipped:
        get_logger().warning(
            "trainguard: %s holds entries a manifest cannot vouch for: %s; verification will name them",
            folder,
            ", ".join(skipped),
        )
    # fsync while hashing: once the marker exists, the files it vouches for are on disk, not only in the page cache.
    digests = hash_many(folder, files, files, workers, fsync=True)
    for value in digests.values():
        if isinstance(value, BaseException):
            raise value
    if step is None:
        step = checkpoint_step(folder)
        if step is None and "trainer_state.json" in files:
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, KeyError, TrainGuardError):
                value = load_json(folder / "trainer_state.json")["global_step"]
                step = value if isinstance(value, int) and not isinstance(value, bool) else None
    meta: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "algorithm": "sha256",
        "checkpoint": folder.name,
        "step": step,
        "created_utc": utc_now(),
        "host": platform.node(),
        "versions": _versions(),
        "total_bytes": sum(files.values()),
        "hash_seconds": round(time.perf_counter() - start, 4),
        # JSON is UTF-8: a name that is not is recorded escaped (its size then goes unchecked; its sha256 does not)
        "files": {display_name(name): {"size": files[name], "sha256": digests[name]} for name in sorted(files)},
    }
    if lineage:
        meta["lineage"] = dict(lineage)
    if extra:
        meta["extra"] = dict(extra)
    # Indented for a reader up to a thousand files; beyond, compact: json's indenting encoder is pure Python (1.4 s
    # of a 3.6 s manifest of 20k files, #28) while the compact one is C.
    atomic_write_json(folder / METADATA_NAME, meta, indent=2 if len(files) <= 1000 else None)
    lines = {name: str(digests[name]) for name in files}
    lines[METADATA_NAME] = sha256_file(folder / METADATA_NAME)
    for sub in {(folder / name).parent for name in files}:
        fsync_dir(sub)
    atomic_write_bytes(marker, format_sha256_lines(lines).encode("utf-8", "surrogateescape"))
    _lineage.end_save(folder)
    with contextlib.suppress(OSError):
        os.utime(folder, ns=(folder_stat.st_atime_ns, folder_stat.st_mtime_ns))
    return marker
