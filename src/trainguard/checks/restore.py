"""Bringing a set-aside checkpoint back into its ``output_dir``: the way back from ``trainguard-quarantine/`` and
``trainguard-archive/``.

trainguard never deletes a checkpoint: one that fails verification on a resume is moved into
``trainguard-quarantine/checkpoint-N.<UTC time>``, one replaced by a new save into
``trainguard-archive/checkpoint-N.<UTC time>``, and a fresh start moves every checkpoint into
``trainguard-archive/<UTC time>-<label>/checkpoint-N``. :func:`restore_checkpoint` moves one of them back to
``output_dir/checkpoint-N``, after verifying it again, and says what it found:

- ``none``: it verifies (an archived checkpoint, or a quarantined one whose cause was fixed): moved back.
- ``inexact``: the only damage is missing RNG state (``rng_state.pth``, ``rng_state_K.pth``). The Trainer resumes
  from it, but not bit-exactly: dropout and every other random draw differ from the uninterrupted run. It is moved
  back only with ``accept_inexact=True``; the acceptance is written into its manifest (re-hashed: every other file
  matched its recorded sha256 first), so the next resume goes through and says "not bit-exact" once.
- ``damaged``: anything else (truncated, changed, malformed or missing files, extra files a resume would load, an
  interrupted save). A changed file may be damage or an edit made on purpose (resharded, converted, re-saved): the
  bytes cannot tell. It is refused unless ``force=True``, which moves it back as it is; a resume sets it aside again
  until it is vouched for with ``trainguard manifest --force`` (or replaced from a backup).

Nothing is ever overwritten: a ``checkpoint-N`` already in ``output_dir`` (newer work of the run) refuses the restore,
and so does a run holding the output_dir's lock. Adapters: ``trainguard restore PATH``.

Example::

    from trainguard.checks.checkpoint import set_aside_checkpoint
    from trainguard.checks.restore import restore_checkpoint
    moved = set_aside_checkpoint("out/checkpoint-60", "an example")   # out/trainguard-quarantine/checkpoint-60.<time>
    result = restore_checkpoint(moved)    # accept_inexact=True for one missing only its RNG state
    result.target, result.damage          # out/checkpoint-60, "none"
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._util import utc_now
from ..atomic import fsync_dir
from ..errors import RestoreRefusedError, RunLockedError
from ..safe_fs import display_name, load_json
from . import lineage as _lineage
from ._layout import ACCEPTED_INEXACT, ARCHIVE_DIR, QUARANTINE_DIR
from .checkpoint.manifest import read_metadata, write_manifest
from .checkpoint.report import CheckpointReport
from .checkpoint.verify import check_checkpoint
from .run_lock import LOCK_NAME, lock_status
from .set_aside import SET_ASIDE_DIRS, set_aside_folders

__all__ = ["Restore", "classify_damage", "locate_set_aside", "plan_restore", "restore_checkpoint"]

_RNG_FILE = re.compile(r"^rng_state(?:_\d+)?\.pth$")
# move_aside's names: checkpoint-N.<utc_stamp>, with "-xxxx" when two landed in the same second.
_SET_ASIDE_NAME = re.compile(r"^(checkpoint-\d+)\.\d{8}T\d{6}(?:\.\d{3})?Z(?:-[0-9a-f]{4})?$")
_GROUP_MEMBER = re.compile(r"^checkpoint-\d+$")

PathLike = str | os.PathLike[str]


@dataclass
class Restore:
    """What a restore found (and, once done, did): the set-aside ``source``, the ``output_dir`` it came from, the
    ``target`` it goes back to, the set-aside folder (``folder``), why it was set aside (``reason``, from trainguard's
    note beside it), the fresh :class:`CheckpointReport`, the ``damage`` class (``none``, ``inexact``, ``damaged``),
    the RNG files it lacks (``inexact``), and ``action`` (``restored``, ``restored as is``, ``restored, not
    bit-exact``; empty until done)."""

    source: Path
    output_dir: Path
    target: Path
    folder: str
    report: CheckpointReport
    damage: str
    reason: str | None = None
    missing_rng: list[str] = field(default_factory=list)
    action: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": display_name(self.source),
            "output_dir": display_name(self.output_dir),
            "target": display_name(self.target),
            "folder": self.folder,
            "reason": self.reason,
            "damage": self.damage,
            "missing_rng": list(self.missing_rng),
            "action": self.action,
            "report": self.report.to_dict(),
        }


def locate_set_aside(path: PathLike) -> tuple[Path, str, str] | None:
    """``(output_dir, set-aside folder name, checkpoint-N)`` for a folder trainguard set aside, or None.

    Recognised: ``<output_dir>/trainguard-quarantine/checkpoint-N.<UTC time>``, the same under
    ``trainguard-archive/``, and ``<output_dir>/trainguard-archive/<group>/checkpoint-N`` (a fresh start's archive).
    Only the names are read; the folder is judged by :func:`classify_damage`.
    """
    source = Path(os.path.abspath(path))
    match = _SET_ASIDE_NAME.match(source.name)
    if match is not None and source.parent.name in SET_ASIDE_DIRS:
        return source.parent.parent, source.parent.name, match.group(1)
    if _GROUP_MEMBER.match(source.name) and source.parent.parent.name == ARCHIVE_DIR:
        return source.parent.parent.parent, ARCHIVE_DIR, source.name
    return None


def classify_damage(report: CheckpointReport) -> tuple[str, list[str]]:
    """``("none" | "inexact" | "damaged", the missing RNG files)`` for a checkpoint's report: ``inexact`` when the
    only problems are missing RNG state files (the resume works, but is not bit-exact)."""
    if report.ok:
        return "none", []
    rng = [p.file for p in report.problems if p.kind == "missing" and _RNG_FILE.match(p.file.rsplit("/", 1)[-1])]
    if len(rng) == len(report.problems):
        return "inexact", rng
    return "damaged", []


def _reason(source: Path) -> str | None:
    # trainguard's note beside the folder; someone could have edited it, so it is only shown, never obeyed.
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        note = load_json(source.parent / f"{source.name}.reason.json")
        reason = note.get("reason") if isinstance(note, dict) else None
        return str(reason) if reason else None
    return None


def plan_restore(path: PathLike, *, workers: int | None = None) -> Restore:
    """Verify a set-aside checkpoint again and say where it would go back to; moves nothing.

    Raises:
        RestoreRefusedError: ``path`` is not a checkpoint trainguard set aside, or its ``checkpoint-N`` name is taken
            in the output_dir.
        UnsafeFileError: A set-aside folder's name in the output_dir is a link or a file.
    """
    source = Path(path)
    located = locate_set_aside(source)
    if located is None or source.is_symlink() or not source.is_dir():
        kind = "a link" if source.is_symlink() else ("not a folder" if source.exists() else "not there")
        detail = f" ({kind})" if located is not None else ""
        raise RestoreRefusedError(
            f"{display_name(source)} is not a checkpoint trainguard set aside{detail}: restore brings back a folder "
            f"from {QUARANTINE_DIR}/ or {ARCHIVE_DIR}/ of an output_dir",
            where={"folder": display_name(source)},
            next_step="`trainguard clean OUTPUT_DIR` lists what is set aside; pass one of those paths.",
        )
    output_dir, folder, name = located
    # A real set-aside folder of a real output_dir (UnsafeFileError for a planted link at its name).
    if not any(f.name == folder for f in set_aside_folders(output_dir)):
        raise RestoreRefusedError(
            f"{display_name(output_dir / folder)} is not a folder trainguard set checkpoints aside in",
            where={"folder": display_name(output_dir / folder)},
        )
    target = output_dir / name
    if os.path.lexists(target):
        raise RestoreRefusedError(
            f"{display_name(target)} is already there (saved after {source.name} was set aside?): restoring "
            f"{source.name} would replace it, so nothing was moved",
            where={"folder": display_name(target)},
            next_step=(
                f"Keep the {name} that is there (`trainguard verify {display_name(output_dir)}` shows it). To bring "
                f"this one back instead, first move that {name} out of the output_dir yourself, then run the same "
                "`trainguard restore` again."
            ),
        )
    report = check_checkpoint(source, workers=workers)
    damage, rng = classify_damage(report)
    return Restore(source, output_dir, target, folder, report, damage, _reason(source), rng)


def restore_checkpoint(
    path: PathLike, *, accept_inexact: bool = False, force: bool = False, workers: int | None = None
) -> Restore:
    """Move a set-aside checkpoint back to ``output_dir/checkpoint-N`` (see the module docstring for the rules).

    Args:
        path: The set-aside folder (``out/trainguard-quarantine/checkpoint-6.20261207T194409Z``, ...).
        accept_inexact: Bring back a checkpoint whose only damage is missing RNG state, and record that the user
            accepted a resume that is not bit-exact (its manifest is re-hashed with the acceptance in it).
        force: Bring back a damaged or modified checkpoint as it is (a resume sets it aside again until it is vouched
            for with ``trainguard manifest --force``).
        workers: Threads hashing files in parallel.

    Returns:
        The :class:`Restore`, with ``action`` set.

    Raises:
        RestoreRefusedError: Not a set-aside checkpoint, its name is taken, or its damage needs the flag not given.
        RunLockedError: A live run holds the output_dir's lock (it may be resuming or setting aside right now).
    """
    plan = plan_restore(path, workers=workers)
    lock = lock_status(plan.output_dir)
    if lock["held"] and not lock["held_by_this_process"]:
        raise RunLockedError(
            f"a run holds the lock on {display_name(plan.output_dir)}: it may be resuming or setting a checkpoint "
            f"aside now, so {plan.source.name} was not moved",
            where={"file": display_name(plan.output_dir / LOCK_NAME)},
            next_step=(
                "Run `trainguard restore` again once that run has ended (`trainguard inspect` shows who holds it)."
            ),
        )
    problems = "; ".join(p.format() for p in plan.report.problems)
    if plan.damage == "inexact" and not (accept_inexact or force):
        raise RestoreRefusedError(
            f"{plan.source.name} lacks only its RNG state ({', '.join(plan.missing_rng)}): a resume from it works but "
            "is not bit-exact (dropout and other random draws differ from the uninterrupted run), so it was not "
            "moved back without your say",
            where={"folder": display_name(plan.source)},
            next_step=(
                f"To resume from it anyway, run `trainguard restore {display_name(plan.source)} --accept-inexact` "
                "(recorded in its manifest; the resume then says 'not bit-exact' once). Otherwise leave it set "
                "aside and resume from the newest checkpoint that verifies."
            ),
            evidence=plan.to_dict(),
        )
    if plan.damage == "damaged" and not force:
        raise RestoreRefusedError(
            f"{plan.source.name} still fails verification, damaged or modified after its save: {problems}; it was "
            "not moved back",
            where={"folder": display_name(plan.source)},
            next_step=(
                "Restore it from a backup. If you changed it on purpose (resharded, converted, re-saved a file), "
                f"bring it back with `trainguard restore {display_name(plan.source)} --force`, then vouch for it as "
                f"it is now with `trainguard manifest {display_name(plan.target)} --force`."
            ),
            evidence=plan.to_dict(),
        )
    reason_note = plan.source.parent / f"{plan.source.name}.reason.json"
    os.rename(plan.source, plan.target)
    fsync_dir(plan.source.parent)
    fsync_dir(plan.output_dir)
    with contextlib.suppress(OSError):  # the note described a folder that is no longer there
        reason_note.unlink()
    with contextlib.suppress(OSError):  # left empty: trainguard made it, and makes it again when needed
        plan.source.parent.rmdir()
    if plan.damage == "inexact" and accept_inexact:
        _record_acceptance(plan.target, plan.missing_rng, workers)
        plan.action = "restored, not bit-exact"
    else:
        plan.action = "restored" if plan.damage == "none" else "restored as is"
    return plan


def _record_acceptance(folder: Path, missing: list[str], workers: int | None) -> None:
    """Re-hash ``folder`` with the acceptance in its lineage record. Every file but the missing RNG state matched its
    recorded sha256 just before (that is what ``inexact`` means), so the new manifest vouches for the same bytes."""
    origin = _lineage.checkpoint_origin(folder)
    meta = read_metadata(folder) or {}
    record = dict(origin.record)
    record[ACCEPTED_INEXACT] = {
        "missing": list(missing),
        "utc": utc_now(),
        "by": "trainguard restore --accept-inexact",
        "meaning": "resumable, not bit-exact: random draws after the resume differ from the uninterrupted run",
    }
    extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else None
    write_manifest(folder, workers=workers, extra=extra, lineage=record)
