"""Verifying one checkpoint folder: against its manifest (sizes, structure, sha256), or, for a legacy checkpoint
without one, structurally; and the error that names every problem.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ...errors import CheckpointIncompleteError, CheckpointIntegrityError, CheckpointNotFoundError, TrainGuardError
from ...safe_fs import display_name, load_json
from .. import lineage as _lineage
from .._layout import (
    JIT_SENTINEL,
    MANIFEST_NAME,
    METADATA_NAME,
    QUARANTINE_DIR,
    SAVING_MARKER,
    checkpoint_step,
)
from .._resume import checkpoint_dirs, trainer_state_problem
from .formats import check_format, describes_checkpoint, issue_kind, loaded_on_resume, special_extra
from .layouts import check_layouts
from .manifest import (
    FolderListing,
    checkpoint_totals,
    has_manifest,
    hash_many,
    parse_sha256_file,
    read_metadata,
    scan_folder,
)
from .report import CheckpointReport, Problem

__all__ = ["check_checkpoint", "integrity_error", "not_found_error", "verify_checkpoint"]


# -------------------------------------------------------------------------------------------------- checks
def _check_trainer_state(folder: Path, problems: list[Problem]) -> int | None:
    """The ``global_step`` of ``trainer_state.json`` when readable; a mismatch with ``checkpoint-N`` is a problem, and
    so is a state the Trainer could not load (crafted JSON, a field of another type), even one the manifest covers."""
    expected = checkpoint_step(folder)
    if not (folder / "trainer_state.json").is_file():
        return expected
    named = any(p.file == "trainer_state.json" for p in problems)
    try:
        state = load_json(folder / "trainer_state.json")
    except OSError:
        return expected  # unreadable: the hashing names it
    except TrainGuardError as err:
        if not named:
            problems.append(Problem("trainer_state.json", "malformed", f"the Trainer cannot load it: {err.what}"))
        return expected
    why = trainer_state_problem(state) if isinstance(state, dict) else ("", "not a JSON object")
    if why is not None:
        if not named:
            problems.append(Problem("trainer_state.json", "malformed", f"the Trainer cannot load it: {why[1]}"))
        return expected
    step = state.get("global_step")
    if not isinstance(step, int):
        return expected
    if expected is not None and step != expected:
        problems.append(
            Problem(
                "trainer_state.json",
                "changed",
                f"global_step is {step} but the folder is {folder.name}: not the state saved with this checkpoint",
            )
        )
    return step


def _listing_findings(listing: FolderListing, report: CheckpointReport, *, allow_links_out: bool) -> set[str]:
    """Report what a listing found besides regular files; returns the names that must not be read."""
    blocked: set[str] = set()
    for name, what in sorted(listing.special.items()):
        report.problems.append(
            Problem(name, "special", f"{what}, not a regular file: never opened (planted here, or left by a tool)")
        )
        blocked.add(name)
    if not allow_links_out:
        for name, target in sorted(listing.links_out.items()):
            report.problems.append(
                Problem(
                    name,
                    "link",
                    f"a symbolic link to {display_name(target)}, outside the checkpoint: that file is not part of it "
                    "and can change under it (pass allow_links_out=True to accept such links)",
                )
            )
            blocked.add(name)
    for name in listing.temps:
        report.warnings.append(
            Problem(name, "stale", "a leftover temporary file of an interrupted trainguard write; ignored")
        )
    for name in listing.nested_manifests:
        report.warnings.append(
            Problem(name, "nested", "a commit marker inside a subfolder: another checkpoint copied into this one?")
        )
    return blocked


def _not_a_checkpoint(names: Any) -> Problem | None:
    if describes_checkpoint(names):
        return None
    return Problem(
        "",
        "empty",
        "holds no weights (safetensors, torch, DCP or DeepSpeed files, a PEFT adapter) and no trainer_state.json: "
        "it does not describe a checkpoint",
    )


def _check_with_manifest(
    folder: Path, report: CheckpointReport, workers: int | None, stop_early: bool, allow_links_out: bool
) -> None:
    problems = report.problems
    try:
        expected = parse_sha256_file(folder / MANIFEST_NAME)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problems.append(Problem(MANIFEST_NAME, "unreadable", f"the manifest is damaged ({err})"))
        return
    listing = scan_folder(folder)
    blocked = _listing_findings(listing, report, allow_links_out=allow_links_out)
    actual = {n: size for n, size in listing.files.items() if n not in blocked}
    empty = _not_a_checkpoint(n for n in expected if n != METADATA_NAME)
    if empty is not None:
        problems.append(Problem(MANIFEST_NAME, empty.kind, f"the manifest {empty.detail}"))

    sizes: dict[str, int] = {}
    if METADATA_NAME in expected and METADATA_NAME in actual:
        meta_digest = hash_many(folder, [METADATA_NAME], actual, 1).get(METADATA_NAME)
        report.hashed_bytes += actual[METADATA_NAME]
        if isinstance(meta_digest, BaseException):
            problems.append(Problem(METADATA_NAME, "unreadable", f"unreadable ({meta_digest})"))
        elif meta_digest != expected[METADATA_NAME]:
            problems.append(Problem(METADATA_NAME, "changed", "the manifest metadata changed since it was written"))
        else:
            meta = read_metadata(folder) or {}
            entries = meta.get("files") if isinstance(meta.get("files"), dict) else {}
            for name, entry in (entries or {}).items():
                if isinstance(entry, dict) and isinstance(entry.get("size"), int):
                    sizes[name] = entry["size"]
    elif METADATA_NAME not in expected:
        report.notes.append(f"{METADATA_NAME} is not listed: sizes unknown, content checked by sha256 only")

    failed: set[str] = {METADATA_NAME} if any(p.file == METADATA_NAME for p in problems) else set()
    for name in sorted(expected):
        if name in blocked:
            failed.add(name)
        elif name not in actual:
            problems.append(Problem(name, "missing", "missing (listed in the manifest)"))
            failed.add(name)
    for name in sorted(set(actual) - set(expected)):
        if name.rsplit("/", 1)[-1] == MANIFEST_NAME:
            continue  # a nested commit marker: named among the warnings already
        special = special_extra(name)
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
        elif loaded_on_resume(name):
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
        issue = check_format(folder / name, actual[name], crc=False)
        if issue is not None:
            suspects[name] = issue
    if suspects:
        # A file can be odd from the start (a ".bin" that is not a torch file): only a file that also differs from
        # its recorded hash is damaged, so hash the suspects first, before the rest.
        suspect_digests = hash_many(folder, suspects, actual, workers)
        for name, issue in suspects.items():
            failed.add(name)
            if suspect_digests.get(name) == expected[name]:
                report.hashed_bytes += actual[name]
                report.notes.append(f"{name}: {issue}, but unchanged since the manifest was written")
            else:
                problems.append(Problem(name, issue_kind(issue), issue))

    if problems and stop_early:
        report.notes.append("sha256 hashing skipped: the structural checks already failed")
        return
    to_hash = [n for n in expected if n in actual and n not in failed and n != METADATA_NAME]
    digests = hash_many(folder, to_hash, actual, workers, expected=expected, stop_early=stop_early)
    for name in sorted(digests):
        value = digests[name]
        if isinstance(value, BaseException):
            problems.append(Problem(name, "unreadable", f"unreadable ({type(value).__name__}: {value})"))
        elif value != expected[name]:
            now, saved = value[:12], expected[name][:12]
            problems.append(Problem(name, "changed", f"content changed: sha256 now {now}…, {saved}… when saved"))
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


def _check_structure_only(folder: Path, report: CheckpointReport, require_state: bool, allow_links_out: bool) -> None:
    problems = report.problems
    listing = scan_folder(folder)
    blocked = _listing_findings(listing, report, allow_links_out=allow_links_out)
    actual = {n: size for n, size in listing.files.items() if n not in blocked}
    if require_state and "trainer_state.json" not in actual:
        problems.append(
            Problem(
                "trainer_state.json",
                "missing",
                "missing: the Trainer writes it last, so the save did not finish (killed mid-save?)",
            )
        )
    elif (empty := _not_a_checkpoint(actual)) is not None:
        problems.append(empty)
    for name in sorted(actual):
        special = special_extra(name)
        if special is not None:
            problems.append(special)
            continue
        issue = check_format(folder / name, actual[name], crc=True)
        if issue is not None:
            problems.append(Problem(name, issue_kind(issue), issue))
    report.notes.append(
        "no manifest (a legacy checkpoint, written without trainguard): structural checks only (sizes, safetensors "
        "headers, JSON, torch zip directories and the CRC-32 of their small members); a changed byte inside tensor "
        "data is not always detectable without a manifest (`trainguard manifest` adopts it)"
    )


def check_checkpoint(
    path: str | os.PathLike[str],
    *,
    require_manifest: bool | None = None,
    workers: int | None = None,
    stop_early: bool = False,
    allow_links_out: bool = False,
) -> CheckpointReport:
    """Check one checkpoint folder and report every problem; never raises for a damaged or crafted checkpoint.

    Besides the files themselves, a folder fails when its manifest (or, without one, the folder) holds no weights
    and no ``trainer_state.json`` (it describes no checkpoint), when it holds an entry that is not a regular file
    (a FIFO, socket, device, a link to a folder or a broken link: never opened), or a symbolic link leading outside
    the folder. Leftover trainguard temporary files and commit markers in subfolders are warnings.

    Args:
        path: The checkpoint folder (``out/checkpoint-50``, a LoRA checkpoint, a ``safe_merge`` version, ...).
        require_manifest: Whether a missing manifest is itself a failure. ``None``/``False`` (default): a folder
            without one is an interrupted save when trainguard's saving marker or a half-written manifest is there,
            else a legacy checkpoint that gets structural checks only (``status`` "unverified (legacy)").
        workers: Threads hashing files in parallel (default: the CPU count, at most 8).
        stop_early: Stop at the first problem (for choosing a checkpoint, where the first reason is enough).
        allow_links_out: Accept symbolic links to regular files outside the folder (hashed like the others). Off by
            default: such a file is not part of the checkpoint, and whoever controls it controls the resume.

    Example::

        report = check_checkpoint("out/checkpoint-50")
        print(report.ok, [p.format() for p in report.problems])
    """
    folder = Path(path)
    start = time.perf_counter()
    report = CheckpointReport(path=folder, ok=False, mode="none", step=checkpoint_step(folder))
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        report.problems.append(Problem("", "missing", f"the checkpoint {display_name(folder)} {what}"))
        return report
    if has_manifest(folder):
        report.mode = "manifest"
        _check_with_manifest(folder, report, workers, stop_early, allow_links_out)
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
            _check_structure_only(
                folder, report, require_state=checkpoint_step(folder) is not None, allow_links_out=allow_links_out
            )
    if report.mode != "none" and (not report.problems or not stop_early):
        state_step = _check_trainer_state(folder, report.problems)
        if report.step is None:
            report.step = state_step
        # Sharded layouts (DCP, DeepSpeed) checked from their own indexes: every rank's shard, a stale latest.
        named = {p.file for p in report.problems}
        record = _lineage.checkpoint_origin(folder).record
        world = record.get("world_size")
        readable = None
        if report.mode == "manifest":
            # A pickled index (DCP .metadata) is parsed only once its bytes are the ones the run committed.
            committed = _committed_names(folder) - named
            readable = committed.__contains__
        report.problems.extend(
            p
            for p in check_layouts(folder, world_size=world if isinstance(world, int) else None, readable=readable)
            if p.file not in named
        )
        report.problems.extend(_node_copy_gaps(folder, record.get("node_copy"), {p.file for p in report.problems}))
    report.files, report.bytes = checkpoint_totals(folder)
    report.ok = not report.problems
    report.seconds = time.perf_counter() - start
    return report


def _committed_names(folder: Path) -> set[str]:
    try:
        return set(parse_sha256_file(folder / MANIFEST_NAME))
    except (OSError, UnicodeDecodeError, ValueError, TrainGuardError):
        return set()


def _node_copy_gaps(folder: Path, node_copy: Any, named: set[str]) -> list[Problem]:
    """One node's copy of a node-local save (``save_on_each_node=True``, each node its own disk): the files its
    commit recorded it would lack, still absent, keep it from being resumed on that node alone."""
    if not isinstance(node_copy, dict) or not isinstance(node_copy.get("lacks"), list):
        return []
    problems = []
    tags = [p.name for p in folder.glob("global_step*") if p.is_dir()] or ["global_stepN"]
    where = f"node {node_copy.get('node')} of {node_copy.get('nodes')}"
    for gap in node_copy["lacks"]:
        if not isinstance(gap, dict) or not isinstance(gap.get("path"), str):
            continue
        candidates = [gap["path"].replace("global_stepN", tag) for tag in tags]
        relative = candidates[0]
        if relative in named or any((folder / c).exists() for c in candidates):
            continue  # named already, or copied in from the other nodes since
        problems.append(
            Problem(
                relative, "missing",
                f"not in this copy ({where}, saved on its own disk with save_on_each_node=True): {gap.get('why')}; "
                "this copy cannot be resumed on its own: gather every node's copy into one folder first",
            )
        )  # fmt: skip
    return problems


def _older_verified(folder: Path, workers: int | None, allow_links_out: bool = False) -> Path | None:
    step = checkpoint_step(folder)
    if step is None:
        return None
    origin = _lineage.checkpoint_origin(folder)
    scope = (
        _lineage.LineageScope(origin.lineage, True, "given")
        if origin.lineage is not None
        else _lineage.current_scope(folder.parent)
    )
    older = [d for d in checkpoint_dirs(folder.parent) if (checkpoint_step(d) or 0) < step]
    for candidate in reversed(older):
        if not scope.admits(_lineage.checkpoint_origin(candidate)):
            continue
        if check_checkpoint(candidate, workers=workers, stop_early=True, allow_links_out=allow_links_out).ok:
            return candidate
    return None


# Problems an intended edit also leaves (a file re-saved, converted or resharded), unlike a truncation or a kill.
_MODIFIED = frozenset({"changed", "size", "extra", "missing"})


def integrity_error(report: CheckpointReport, *, alternative: Path | None = None) -> CheckpointIntegrityError:
    """The :class:`CheckpointIntegrityError` for a failed report: every problem named, the next step concrete.

    A folder that is not there at all gives a :class:`CheckpointNotFoundError` (also a ``ValueError``, like the
    plain Trainer's error for that path): most often a typo, not damage, so the advice is to check the path.
    """
    folder = report.path
    if not folder.is_dir():
        return not_found_error(folder, alternative=alternative)
    error_type = CheckpointIntegrityError if holds_weights(folder) else CheckpointIncompleteError
    named = [p.file for p in report.problems if p.file]
    what = f"{folder.name} failed verification ({len(report.problems)} problem(s)): " + "; ".join(
        p.format() for p in report.problems
    )
    # A problem with the folder as a whole (nothing a checkpoint holds, an interrupted save) names the folder.
    where: dict[str, Any] = {"file": display_name(folder / named[0])} if named else {"folder": display_name(folder)}
    if len(set(named)) > 1:
        where["files"] = ", ".join(display_name(n) for n in dict.fromkeys(named))
    if named:
        where["checkpoint"] = display_name(folder)
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
    if error_type is CheckpointIncompleteError:
        what = f"{folder.name} holds no model weights (a save that never wrote them, or an empty folder); " + what
    if any(p.kind in _MODIFIED for p in report.problems):
        next_step += (
            f" If {folder.name} was modified after its save on purpose (resharded, converted, a file re-saved), "
            f"vouch for it as it is now with `trainguard manifest {display_name(folder)} --force`."
        )
    return error_type(
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


# The files whose presence makes the Trainer's _load_from_checkpoint accept a folder (any subfolder too: FSDP
# shards, one adapter per subfolder); without one it raises ValueError("Can't find a valid checkpoint at ...").
_TRAINER_WEIGHT_NAMES = frozenset(
    {
        "pytorch_model.bin",
        "model.safetensors",
        "pytorch_model.bin.index.json",
        "model.safetensors.index.json",
        "adapter_model.bin",
        "adapter_model.safetensors",
        "pytorch_model_fsdp.bin",
    }
)


def holds_weights(folder: Path) -> bool:
    """Whether ``folder`` holds anything the Trainer would load weights from (a weights file or a subfolder)."""
    try:
        with os.scandir(folder) as entries:
            return any(entry.is_dir(follow_symlinks=False) or entry.name in _TRAINER_WEIGHT_NAMES for entry in entries)
    except OSError:
        return True  # unreadable: not ours to classify; the verification's own problems say what is wrong


def not_found_error(folder: Path, *, alternative: Path | None = None) -> CheckpointNotFoundError:
    """The error for a checkpoint path that does not exist (or is not a folder): it names the path, says to check its
    spelling, and lists the checkpoint folders beside it (listed, not hashed: a typo should not cost a verification).
    """
    what = "does not exist" if not folder.exists() else "is not a folder"
    beside = [d.name for d in checkpoint_dirs(folder.parent)][-3:]
    nearby = f" Beside it in {display_name(folder.parent)}: {', '.join(beside)}." if beside else ""
    if alternative is not None:
        nearby += f" {display_name(alternative)} is the newest older checkpoint that verifies."
    return CheckpointNotFoundError(
        f"the checkpoint {display_name(folder)} {what}",
        where={"folder": display_name(folder)},
        next_step=CheckpointNotFoundError.default_next_step + nearby,
        evidence={
            "checkpoint": str(folder),
            "beside": beside,
            "older_verified": str(alternative) if alternative is not None else None,
        },
    )


def verify_checkpoint(
    path: str | os.PathLike[str],
    *,
    require_manifest: bool | None = None,
    workers: int | None = None,
    allow_links_out: bool = False,
) -> CheckpointReport:
    """Verify a checkpoint folder; raise naming every missing, truncated or changed file.

    Cheap structural checks run first (every listed file present with its recorded size, safetensors headers,
    JSON files, torch zip archives), then the sha256 of every file, in parallel threads. Without a manifest in the
    whole run, only the structural checks run (``report.mode == "structural"``, and ``report.notes`` says so).

    Args:
        path: The checkpoint folder.
        require_manifest: See :func:`check_checkpoint`.
        workers: Threads hashing files in parallel (default: the CPU count, at most 8).
        allow_links_out: See :func:`check_checkpoint` (off: a link leading outside the folder fails).

    Returns:
        The :class:`CheckpointReport` (``ok`` is True).

    Raises:
        CheckpointIntegrityError: Anything failed; ``where["file"]`` names the first file, ``what`` every problem,
            ``evidence["problems"]`` all of them, ``next_step`` the newest older checkpoint that verifies.

    Example::

        verify_checkpoint("out/checkpoint-50")
    """
    report = check_checkpoint(path, require_manifest=require_manifest, workers=workers, allow_links_out=allow_links_out)
    if not report.ok:
        raise integrity_error(report, alternative=_older_verified(report.path, workers, allow_links_out))
    return report
