"""The lineage registry: ``output_dir/trainguard-checkpoints.json``, which lineage is current (the one
``resume_from_checkpoint=True`` continues), the lineages and runs that trained there, and what the first step after
each save saw (for the resume attestation).

Bounded by design: the last 200 lineages and runs, and per save one summary of all ranks (:func:`summarize_ranks`)
for the last 100 saves, so its size does not grow with ranks x saves (about 24 KiB at 1,024 ranks x 1,000 saves). A
registry that cannot be read is named in a warning and never rewritten in place: a writer moves it into
``trainguard-quarantine/`` first. Read and written through its record type, :class:`~.records.Registry` (a wrong
field is named). Imports neither torch nor transformers; :mod:`.lineage` re-exports these names.

Example::

    from trainguard.checks.lineage_registry import read_registry
    read_registry("out").get("current")     # {"lineage": "2026…-3fa9c1", "adopts_unrecorded": False, ...}
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._util import utc_now
from ..alerts import get_logger
from ..atomic import atomic_write_json
from ..errors import MalformedFileError, TrainGuardError
from ..safe_fs import load_json
from ._layout import LINEAGE_FORMAT, MANIFEST_NAME, METADATA_NAME, RUN_MARKER
from .records import Registry, summarize_ranks
from .set_aside import move_aside

if TYPE_CHECKING:
    from .lineage import CheckpointOrigin

__all__ = [
    "adopts_unrecorded",
    "after_save",
    "read_registry",
    "record_after_save",
    "record_run",
    "summarize_ranks",
]

_MAX_RUNS = 200  # runs kept in the registry; older ones are dropped (their checkpoints still say who wrote them)
_MAX_LINEAGES = 200  # lineages kept in the registry, the current one always among them
_MAX_RECORD_BYTES = 1 << 20  # a registry larger than this is not trainguard's


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


_warned: set[tuple[str, int, int]] = set()  # unreadable registries already named in the log (path, size, mtime)


def _load_registry(path: Path) -> dict[str, Any] | None:
    """The registry at ``path``; None when there is none.

    Raises:
        MalformedFileError: it is there but cannot be read (too big, not JSON, not an object, not a regular file).
    """
    if not os.path.lexists(path):
        return None
    try:
        value = load_json(path, limit=_MAX_RECORD_BYTES)
    except FileNotFoundError:
        return None
    except (OSError, TrainGuardError) as err:
        reason = err.what if isinstance(err, TrainGuardError) else str(err)
        raise _unreadable(path, reason) from None
    if not isinstance(value, dict):
        raise _unreadable(path, f"it holds a JSON {type(value).__name__}, not an object")
    try:
        return Registry.from_json(value, source=str(path)).to_json()
    except MalformedFileError as err:
        raise _unreadable(path, err.what, field=err.where.get("field")) from None


def _unreadable(path: Path, reason: str, *, field: str | None = None) -> MalformedFileError:
    return MalformedFileError(
        f"the lineage registry {path} cannot be read ({reason}): which lineage is current, and the runs that "
        "trained here, are unknown",
        where={"file": str(path), **({"field": field} if field else {})},
        next_step=(
            "Restore the file from a copy, or move it aside: the next run then records a new registry (trainguard "
            "moves an unreadable one into trainguard-quarantine/ itself before writing, never deleting it). Until "
            "then resume_from_checkpoint=True continues the lineage of the newest checkpoint that records one."
        ),
    )


def _warn_once(path: Path, err: MalformedFileError) -> None:
    try:
        st = os.lstat(path)
        key = (str(path), st.st_size, st.st_mtime_ns)
    except OSError:
        key = (str(path), -1, -1)
    if key not in _warned:
        _warned.add(key)
        get_logger().warning("trainguard: %s", err)


def read_registry(output_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The output_dir's lineage registry (``trainguard-checkpoints.json``), or ``{}`` when there is none.

    A marker written by a release before lineages (``{"format", "since_utc", "meaning"}``) reads as a registry with
    no current lineage. A registry that is there but cannot be read (too big, malformed, not a regular file) reads
    as ``{}`` too, with a warning naming the file and what to do (once per state of the file); writers never
    rewrite it in place (see :func:`record_run`).
    """
    path = Path(output_dir) / RUN_MARKER
    try:
        return _load_registry(path) or {}
    except MalformedFileError as err:
        _warn_once(path, err)
        return {}


def _registry_for_update(folder: Path) -> dict[str, Any]:
    """The registry to update before a write: the one there, ``{}`` when there is none; an unreadable one is moved
    into ``trainguard-quarantine/`` first (never deleted, never rewritten in place), with a warning saying where."""
    path = folder / RUN_MARKER
    try:
        return _load_registry(path) or {}
    except MalformedFileError as err:
        moved = move_aside(path, f"unreadable lineage registry: {err.what}")
        get_logger().warning(
            "trainguard: %s; it was moved to %s and a new registry is recorded (this run's lineage becomes the "
            "current one). Restore it from %s if it was the right one.",
            err.what,
            moved,
            moved,
        )
        return {}


def _write(folder: Path, registry: dict[str, Any]) -> None:
    """Write ``registry`` through its record type (:class:`~.records.Registry`: checked, bounded), atomically."""
    path = folder / RUN_MARKER
    atomic_write_json(path, Registry.from_json(registry, source=str(path)).to_json())


def adopts_unrecorded(output_dir: str | os.PathLike[str], lineage: str) -> bool:
    """Whether ``lineage`` grew out of a checkpoint that records no lineage (so legacy checkpoints are its own)."""
    registry = read_registry(output_dir)
    current = registry.get("current")
    if isinstance(current, dict) and current.get("lineage") == lineage:
        return bool(current.get("adopts_unrecorded", False))
    lineages = registry.get("lineages")
    entry = lineages.get(lineage) if isinstance(lineages, dict) else None
    origin = entry.get("from") if isinstance(entry, dict) else None
    return isinstance(origin, dict) and origin.get("lineage") is None


def record_run(
    output_dir: str | os.PathLike[str],
    *,
    lineage: str,
    run: str,
    adopts_unrecorded: bool,
    resumed_from: CheckpointOrigin | None = None,
    world_size: int = 1,
) -> None:
    """Record in the registry that ``run`` of ``lineage`` trains in ``output_dir`` now, making that lineage current.

    Idempotent for the same run (an ``auto_find_batch_size`` retry re-enters the loop). Atomic; call it from one
    process. Keeps the last 200 runs.
    """
    folder = Path(output_dir)
    registry = _registry_for_update(folder)
    now = utc_now()
    registry["format"] = LINEAGE_FORMAT
    registry.setdefault("since_utc", now)
    registry["meaning"] = (
        f"trainguard's lineage registry: the current lineage (the one resume_from_checkpoint=True continues) and the "
        f"runs that trained here. Every checkpoint-N trainguard commits has {MANIFEST_NAME} and records its lineage "
        f"in {METADATA_NAME}."
    )
    found = registry.get("current")
    current: dict[str, Any] = dict(found) if isinstance(found, dict) else {}
    if current.get("lineage") != lineage:
        current = {"lineage": lineage, "since_utc": now}
    current["adopts_unrecorded"] = bool(adopts_unrecorded)
    registry["current"] = current
    known = registry.get("lineages")
    lineages: dict[str, Any] = dict(known) if isinstance(known, dict) else {}
    if lineage not in lineages:
        lineages[lineage] = {
            "started_utc": now,
            "host": platform.node(),
            "from": resumed_from.to_dict() if resumed_from is not None else None,
        }
    if len(lineages) > _MAX_LINEAGES:  # the oldest first (insertion order); the current one is always kept
        drop = [k for k in lineages if k != lineage][: len(lineages) - _MAX_LINEAGES]
        lineages = {k: v for k, v in lineages.items() if k not in drop}
    registry["lineages"] = lineages
    runs = (
        [r for r in registry.get("runs", []) if isinstance(r, dict)] if isinstance(registry.get("runs"), list) else []
    )
    if not any(r.get("run") == run for r in runs):
        runs.append(
            {
                "run": run,
                "lineage": lineage,
                "started_utc": now,
                "host": platform.node(),
                "pid": os.getpid(),
                "world_size": int(world_size),
                "resumed_from": resumed_from.path.name if resumed_from is not None else None,
            }
        )
    registry["runs"] = runs[-_MAX_RUNS:]
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder, registry)


# ------------------------------------------------------------------------------ the first step after a save
_MAX_AFTER_SAVE = 100  # checkpoints whose next step is remembered; older entries are dropped


def record_after_save(
    output_dir: str | os.PathLike[str], checkpoint: str, *, run: str | None, observations: list[Any]
) -> None:
    """Remember what the first step after ``checkpoint`` was saved saw on all ranks (RNG and batch digests,
    summarized by :func:`summarize_ranks`: the record's size does not grow with the ranks), for a resume from it to
    compare with. Keeps the last 100 checkpoints. Atomic; call it from one process."""
    folder = Path(output_dir)
    registry = _registry_for_update(folder)
    found = registry.get("after_save")
    entries: dict[str, Any] = {k: v for k, v in found.items() if k != checkpoint} if isinstance(found, dict) else {}
    entries[checkpoint] = {"run": run, "utc": utc_now(), **summarize_ranks(observations)}
    registry["after_save"] = dict(list(entries.items())[-_MAX_AFTER_SAVE:])
    registry.setdefault("format", LINEAGE_FORMAT)
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder, registry)


def after_save(output_dir: str | os.PathLike[str], checkpoint: str, run: str | None) -> dict[str, Any] | None:
    """What the first step after ``checkpoint`` saw (:func:`summarize_ranks`), when the run that saved it recorded
    it; else None. An entry of a release that kept one observation per rank is summarized the same way."""
    entries = read_registry(output_dir).get("after_save")
    entry = entries.get(checkpoint) if isinstance(entries, dict) else None
    if not isinstance(entry, dict) or entry.get("run") != run:
        return None
    size = entry.get("world_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        return None
    return {"world_size": size, "rng": _text(entry.get("rng")), "batch": _text(entry.get("batch"))}
