"""Run lineage: which run wrote which checkpoint of an ``output_dir``, and what a run may resume, save over or rotate.

A *lineage* is one line of training: it begins with a fresh start (step 0) and goes on through every resume from one
of its checkpoints. Each ``train()`` call is a *run* of a lineage. Every checkpoint trainguard commits records its
lineage, its run, its step and how it was saved (``trainguard-manifest.json``, key ``"lineage"``), and the
output_dir's ``trainguard-checkpoints.json`` (the *registry*) records which lineage is current and which runs
trained there. The rules, decided here on plain paths and used by :class:`~trainguard.CheckpointVerifier`, the
functions and the commands alike:

- A fresh start into an output_dir that holds any ``checkpoint-N`` is refused (:func:`fresh_start_error`), unless
  the user keeps them deliberately or archives them first: a fresh run would overwrite some, a later resume could
  continue the other run, and rotation would delete them.
- ``resume_from_checkpoint=True`` lands only on the current lineage's checkpoints (:meth:`LineageScope.admits`).
  Checkpoints written without trainguard ("legacy") count as the current lineage's only when it grew out of one.
- Rotation deletes only the current lineage's committed checkpoints, never the newest (:func:`rotation_plan`).
- A save into an existing ``checkpoint-N`` first moves what is there aside (:func:`prepare_save_target`), so a
  manifest never lists a file that save did not write; a second save of the same step by the same run is skipped.

Imports neither torch nor transformers.

Example::

    from trainguard.checks.lineage import checkpoint_origin, current_scope
    checkpoint_origin("out/checkpoint-6").describe()    # 'checkpoint-6 (lineage 20261130T010203Z-3fa9c1)'
    current_scope("out").admits(checkpoint_origin("out/checkpoint-6"))
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._util import utc_now
from ..alerts import get_logger
from ..atomic import atomic_write_json
from ..errors import LineageError, TrainGuardError
from ..safe_fs import load_json, remove_tree
from ._layout import (
    ARCHIVE_DIR,
    JIT_SENTINEL,
    LINEAGE_FORMAT,
    MANIFEST_NAME,
    METADATA_NAME,
    SAVING_MARKER,
    checkpoint_step,
)
from ._resume import checkpoint_dirs
from .lineage_registry import (
    adopts_unrecorded,
    after_save,
    read_registry,
    record_after_save,
    record_run,
    summarize_ranks,
)
from .set_aside import move_aside

__all__ = [
    "LINEAGE_FORMAT",
    "CheckpointOrigin",
    "LineageScope",
    "SaveTarget",
    "adopts_unrecorded",
    "after_save",
    "begin_save",
    "checkpoint_origin",
    "current_scope",
    "describe_many",
    "end_save",
    "fresh_start_error",
    "lineage_checkpoints",
    "move_aside",
    "new_id",
    "prepare_save_target",
    "read_registry",
    "record_after_save",
    "record_run",
    "rotate",
    "rotation_plan",
    "summarize_ranks",
]

_MAX_RECORD_BYTES = 1 << 20  # a lineage record larger than this is not trainguard's


def new_id() -> str:
    """A new lineage or run id: sortable by time, readable, unique (``20261130T010203Z-3fa9c1``)."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def _read_object(path: Path) -> dict[str, Any] | None:
    """A small JSON object from ``path``, or None when it is missing, not a regular file, too big or not an object."""
    try:
        # regular files only (a FIFO here never blocks), bounded, finite numbers, shallow nesting
        value = load_json(path, limit=_MAX_RECORD_BYTES)
    except (OSError, TrainGuardError):
        return None
    return value if isinstance(value, dict) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# ----------------------------------------------------------------------------------------- a checkpoint's origin
@dataclass(frozen=True)
class CheckpointOrigin:
    """Who wrote one ``checkpoint-N`` folder, as far as its files tell.

    ``state`` is ``committed`` (trainguard's commit marker is there), ``saving`` (trainguard began a save or its
    commit and did not finish: an interrupted save) or ``legacy`` (no trainguard file at all: written by a plain
    Trainer, or before trainguard was attached). ``lineage`` and ``run`` are None where nothing was recorded (legacy
    folders, and manifests written by trainguard releases before lineages or by ``write_manifest`` alone).
    """

    path: Path
    step: int | None
    state: str
    lineage: str | None = None
    run: str | None = None
    saved_by: str | None = None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def recorded(self) -> bool:
        """True when the folder says which lineage wrote it."""
        return self.lineage is not None

    def writer(self) -> str:
        """Who wrote it, in a few words (``lineage 2026…-3fa9c1``, ``written without trainguard``, ...)."""
        if self.state == "legacy":
            return "written without trainguard"
        who = f"lineage {self.lineage}" if self.lineage else "no lineage recorded"
        return who + (", save not finished" if self.state == "saving" else "")

    def describe(self) -> str:
        """One phrase: the folder and who wrote it."""
        return f"{self.path.name} ({self.writer()})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.path.name,
            "step": self.step,
            "state": self.state,
            "lineage": self.lineage,
            "run": self.run,
            "saved_by": self.saved_by,
            "save_only_model": self.record.get("save_only_model"),
            "world_size": self.record.get("world_size"),
        }


def checkpoint_origin(folder: str | os.PathLike[str]) -> CheckpointOrigin:
    """Read who wrote ``folder`` from trainguard's files in it (never raises; reads at most two small files).

    Example::

        checkpoint_origin("out/checkpoint-6").lineage
    """
    path = Path(folder)
    step = checkpoint_step(path)
    record: dict[str, Any] | None = None
    if (path / MANIFEST_NAME).is_file():
        state = "committed"
        meta = _read_object(path / METADATA_NAME) or {}
        record = meta.get("lineage") if isinstance(meta.get("lineage"), dict) else None
    elif (path / SAVING_MARKER).is_file() or (path / METADATA_NAME).is_file():
        state = "saving"
        record = _read_object(path / SAVING_MARKER)
        if record is None:
            meta = _read_object(path / METADATA_NAME) or {}
            record = meta.get("lineage") if isinstance(meta.get("lineage"), dict) else None
    else:
        return CheckpointOrigin(path, step, "legacy")
    record = dict(record or {})
    return CheckpointOrigin(
        path,
        step,
        state,
        lineage=_text(record.get("lineage")),
        run=_text(record.get("run")),
        saved_by=_text(record.get("saved_by")),
        record=record,
    )


# ------------------------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class LineageScope:
    """Which checkpoints of an output_dir a ``resume_from_checkpoint=True`` may land on.

    ``lineage`` None admits every checkpoint (an output_dir from before lineages). ``adopts_unrecorded``: the
    lineage grew out of a checkpoint that records no lineage (legacy), so such checkpoints are its own too.
    ``source`` says where the scope came from (``registry``, ``newest checkpoint``, ``none``, ``given``).
    """

    lineage: str | None
    adopts_unrecorded: bool = True
    source: str = "none"

    def admits(self, origin: CheckpointOrigin) -> bool:
        """True when a resume in this scope may use ``origin``."""
        if self.lineage is None:
            return True
        if origin.lineage is None:
            return self.adopts_unrecorded
        return origin.lineage == self.lineage

    def describe(self) -> str:
        if self.lineage is None:
            return "any lineage (none recorded)"
        legacy = ", and checkpoints written without trainguard" if self.adopts_unrecorded else ""
        return f"lineage {self.lineage}{legacy}"


def current_scope(
    output_dir: str | os.PathLike[str], origins: Iterable[CheckpointOrigin] | None = None
) -> LineageScope:
    """The scope of ``resume_from_checkpoint=True`` in ``output_dir``: its registry's current lineage; without one,
    the lineage of the newest checkpoint that records one; without that, every checkpoint.

    Example::

        current_scope("out").lineage
    """
    current = read_registry(output_dir).get("current")
    if isinstance(current, dict) and _text(current.get("lineage")):
        return LineageScope(str(current["lineage"]), bool(current.get("adopts_unrecorded", False)), "registry")
    if origins is None:
        origins = [checkpoint_origin(d) for d in checkpoint_dirs(output_dir)]
    recorded = [o for o in origins if o.lineage is not None and o.state == "committed"]
    if recorded:
        newest = max(recorded, key=lambda o: o.step or 0)
        return LineageScope(newest.lineage, True, "newest checkpoint")
    return LineageScope(None, True, "none")


# ----------------------------------------------------------------------------------------------- fresh starts
def describe_many(origins: Iterable[CheckpointOrigin], limit: int = 12) -> str:
    """``checkpoint-2, checkpoint-4 (lineage X); checkpoint-6 (written without trainguard)``: grouped by writer."""
    groups: dict[str, list[str]] = {}
    for origin in origins:
        groups.setdefault(origin.writer(), []).append(origin.path.name)
    parts = []
    for writer, names in groups.items():
        shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
        parts.append(f"{shown} ({writer})")
    return "; ".join(parts)


def fresh_start_error(output_dir: str | os.PathLike[str], origins: list[CheckpointOrigin]) -> LineageError:
    """The refusal of a fresh start into ``output_dir`` that holds ``origins``: each named, the ways forward given."""
    shown = describe_many(origins)
    return LineageError(
        f"a fresh start (no resume_from_checkpoint) into {output_dir}, which already holds {len(origins)} "
        f"checkpoint(s) of another run: {shown}. Started as it is, this run would save over some of them, a later "
        "resume_from_checkpoint=True could continue the other run, and save_total_limit would delete them",
        where={"folder": str(output_dir), "checkpoint": str(origins[-1].path)},
        next_step=(
            "Continue them: trainer.train(resume_from_checkpoint=True). Or archive them first: "
            "trainguard.start_fresh(trainer) moves them into trainguard-archive/ (never deleted). Or give this run "
            "another output_dir. Or, to start a new lineage beside them on purpose (they are then never resumed, "
            "saved over or rotated by this run): CheckpointVerifier(existing_checkpoints='keep'), i.e. "
            "all_guards(checkpoint_verifier={'existing_checkpoints': 'keep'})."
        ),
        evidence={"checkpoints": [o.to_dict() for o in origins]},
    )


# ------------------------------------------------------------------------------------------------------- saves
@dataclass(frozen=True)
class SaveTarget:
    """What :func:`prepare_save_target` did: ``action`` is ``fresh`` (nothing there), ``moved`` (what was there is
    now at ``moved_to``) or ``skip`` (this run already committed this step there: do not save again)."""

    action: str
    folder: Path
    moved_to: Path | None = None
    previous: CheckpointOrigin | None = None
    reason: str = ""


def prepare_save_target(
    folder: str | os.PathLike[str], *, lineage: str | None, run: str | None, step: int
) -> SaveTarget:
    """Make ``folder`` ready for a new save of ``step`` by ``run``: a folder left there by anything else (another
    run or lineage, a plain Trainer, an interrupted save) is moved into ``trainguard-archive/``, never deleted, so the
    new manifest lists only files this save writes. A folder this run already committed at this step (a JIT save
    right after a regular save of the same step) is kept, and the save should be skipped.

    An empty folder, or one holding only the Trainer's JIT sentinel (written just before a JIT save), is used as is.
    """
    path = Path(folder)
    if not os.path.lexists(path):
        return SaveTarget("fresh", path)
    if path.is_dir() and not path.is_symlink():
        try:
            names = {entry.name for entry in os.scandir(path)}
        except OSError:
            names = {"?"}
        if names <= {JIT_SENTINEL}:
            return SaveTarget("fresh", path)
        origin = checkpoint_origin(path)
        recorded_step = origin.record.get("step")
        if (
            origin.state == "committed"
            and run is not None
            and origin.run == run
            and (recorded_step is None or recorded_step == step)
        ):
            return SaveTarget(
                "skip", path, previous=origin, reason=f"{path.name} is already committed by this run at step {step}"
            )
    else:
        origin = CheckpointOrigin(path, checkpoint_step(path), "legacy")
    who = origin.describe() if path.is_dir() else f"{path.name} (not a folder)"
    reason = f"replaced by a new save at step {step} of lineage {lineage or 'unrecorded'}: it held {who}"
    moved = move_aside(path, reason, into=ARCHIVE_DIR)
    return SaveTarget("moved", path, moved_to=moved, previous=origin, reason=reason)


def begin_save(folder: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Create ``folder`` and write the saving marker into it (before the Trainer writes anything there)."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / SAVING_MARKER, {"format": LINEAGE_FORMAT, **record, "began_utc": utc_now()})


def end_save(folder: str | os.PathLike[str]) -> None:
    """Remove the saving marker once the commit marker is written."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        os.unlink(Path(folder) / SAVING_MARKER)


# ---------------------------------------------------------------------------------------------------- rotation
def lineage_checkpoints(
    run_dir: str | os.PathLike[str], lineage: str | None, *, unfinished: bool = False
) -> list[CheckpointOrigin]:
    """The committed checkpoints of ``lineage`` in ``run_dir`` (with ``unfinished``, also its saves in progress),
    oldest (lowest step) first."""
    if lineage is None:
        return []
    states = ("committed", "saving") if unfinished else ("committed",)
    found = [checkpoint_origin(d) for d in checkpoint_dirs(run_dir)]
    return [o for o in found if o.state in states and o.lineage == lineage]


def rotation_plan(
    run_dir: str | os.PathLike[str],
    *,
    limit: int | None,
    lineage: str | None,
    protect: Iterable[str | os.PathLike[str] | None] = (),
    unfinished: bool = False,
) -> list[Path]:
    """The folders ``save_total_limit`` may delete: the oldest checkpoints of ``lineage`` beyond ``limit``.

    Never another lineage's checkpoint, a legacy one, the lineage's newest committed one, or anything in ``protect``
    (the best checkpoint, the one just saved). Same counting as the Trainer's ``rotate_checkpoints``, applied to this
    lineage only; with ``unfinished`` the save in progress counts too (rotation inside the save, before its commit).
    """
    if limit is None or limit <= 0:
        return []
    mine = lineage_checkpoints(run_dir, lineage, unfinished=unfinished)
    if len(mine) <= limit:
        return []
    protected = {mine[-1].path.resolve()}
    committed = [o for o in mine if o.state == "committed"]
    if committed:
        protected.add(committed[-1].path.resolve())
    for item in protect:
        if item is not None:
            with contextlib.suppress(OSError):
                protected.add(Path(item).resolve())
    keep = max(limit, len([o for o in mine if o.path.resolve() in protected]))
    remaining = len(mine)
    doomed: list[Path] = []
    for origin in mine:
        if remaining <= keep:
            break
        if origin.path.resolve() not in protected:
            doomed.append(origin.path)
            remaining -= 1
    return doomed


def rotate(
    run_dir: str | os.PathLike[str],
    *,
    limit: int | None,
    lineage: str | None,
    protect: Iterable[str | os.PathLike[str] | None] = (),
    unfinished: bool = False,
) -> list[Path]:
    """Delete what :func:`rotation_plan` names (the user's ``save_total_limit`` asked for it); return those paths."""
    doomed = rotation_plan(run_dir, limit=limit, lineage=lineage, protect=protect, unfinished=unfinished)
    for path in doomed:
        get_logger().info("trainguard: deleting %s of this lineage (save_total_limit=%s)", path, limit)
        remove_tree(path)
    return doomed
