"""``trainguard verify PATH`` and ``trainguard manifest PATH``: checkpoint integrity from the shell, without torch.

``verify`` checks one checkpoint folder, every ``checkpoint-N`` of an output_dir (a table: status, run lineage, and
which one a resume would use), or every output_dir and checkpoint found below a folder. ``manifest`` adopts
existing checkpoints: it writes the manifest of each one that has none, after its structural checks pass.
Exit status: 0 all good, 1 a check failed (or a checkpoint was refused), 2 usage or I/O error. Every name in the
text output is one printable line (:func:`~trainguard.display.printable`); ``--json`` keeps names exact.

Example::

    trainguard verify out                  # a table of every checkpoint
    trainguard verify out/checkpoint-50 --json
    trainguard manifest out                # adopt the checkpoints of a run started without trainguard
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..checks import checkpoint as ckpt
from ..checks import lineage as _lineage
from ..checks._layout import ARCHIVE_DIR, TRAINER_STATE, checkpoint_step
from ..checks._resume import checkpoint_dirs
from ..checks.preflight import format_bytes
from ..display import printable
from ..safe_fs import describe_kind, display_name

__all__ = ["adopt", "register"]


def register(subparsers: Any) -> None:
    verify = subparsers.add_parser(
        "verify",
        help="verify a checkpoint, or every checkpoint of an output_dir, against its sha256 manifest",
        description=(
            "Verify a checkpoint folder, or every checkpoint-N in an output_dir: each file present with its size, "
            "safetensors headers, JSON, torch zip archives, then sha256 against trainguard-manifest.sha256. "
            "Exit 0 all verified, 1 a check failed, 2 usage or I/O error."
        ),
    )
    verify.add_argument(
        "path", metavar="PATH", help="a checkpoint folder, a run's output_dir, or a folder holding output_dirs"
    )
    verify.add_argument("--json", action="store_true", help="print one JSON document")
    verify.add_argument(
        "--workers", type=int, default=None, help="hashing threads, 1 or more (default: CPUs, at most 8)"
    )
    verify.set_defaults(func=run_verify)

    manifest = subparsers.add_parser(
        "manifest",
        help="write the sha256 manifest of existing checkpoints (adopt a run started without trainguard)",
        description=(
            "Write trainguard-manifest.sha256 into a checkpoint folder, or into every checkpoint-N of an output_dir "
            "that has none, after its structural checks pass. A checkpoint whose existing manifest fails is refused "
            "unless --force. Exit 0 all done, 1 a checkpoint was refused, 2 usage or I/O error."
        ),
    )
    manifest.add_argument("path", metavar="PATH", help="a checkpoint folder or a run's output_dir")
    manifest.add_argument(
        "--force",
        action="store_true",
        help="also write over a failing manifest and manifest folders that fail the structural checks",
    )
    manifest.add_argument("--json", action="store_true", help="print one JSON document")
    manifest.add_argument(
        "--workers", type=int, default=None, help="hashing threads, 1 or more (default: CPUs, at most 8)"
    )
    manifest.set_defaults(func=run_manifest)


# ------------------------------------------------------------------------------------------------ helpers
def _usage_error(message: str, as_json: bool, command: str) -> int:
    from ._output import EXIT_USAGE, emit_json

    if as_json:
        emit_json({"ok": False, "error": "UsageError", "what": message})
    else:  # one line, whatever the PATH argument holds (ESC, a newline)
        sys.stderr.write(f"trainguard {command}: {printable(message)}\n")
    return EXIT_USAGE


def _not_a_folder(path: Path) -> str:
    # lexists: a dangling link is "not a folder", not "no such folder"; a FIFO is never opened here.
    if not os.path.lexists(path):
        return f"no such folder: {display_name(path)}"
    try:
        kind = describe_kind(os.stat(path).st_mode)
    except OSError as err:
        kind = err.strerror or "unreadable"
    return f"not a folder: {display_name(path)} ({kind})"


# Names that make a folder a checkpoint (or a saved model) rather than a folder that holds them.
_CHECKPOINT_FILES = frozenset(
    {
        ckpt.MANIFEST_NAME,
        ckpt.METADATA_NAME,
        ckpt.SAVING_MARKER,
        TRAINER_STATE,
        "adapter_config.json",
        "adapter_model.safetensors",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
    }
)
_SKIP_DIRS = frozenset({ckpt.QUARANTINE_DIR, ARCHIVE_DIR})
_MAX_DEPTH = 6


def _looks_like_checkpoint(path: Path) -> bool:
    try:
        names = {entry.name for entry in os.scandir(path)}
    except OSError:
        return False
    return bool(names & _CHECKPOINT_FILES) or checkpoint_step(path) is not None


def _targets(path: Path) -> tuple[str, list[tuple[Path | None, Path]]] | None:
    """What PATH holds: ``("output_dir", ...)`` (its ``checkpoint-N``), ``("checkpoint", [PATH])``, or ``("tree",
    ...)`` (the output_dirs and checkpoints found below it, to six levels, not inside set-aside or archived
    folders); each entry is ``(its output_dir or None, the checkpoint)``. None when there is no checkpoint."""
    dirs = checkpoint_dirs(path)
    if dirs:
        return "output_dir", [(path, d) for d in dirs]
    if _looks_like_checkpoint(path):
        return "checkpoint", [(None, path)]
    found: list[tuple[Path | None, Path]] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            children = sorted(c for c in folder.iterdir() if c.is_dir() and not c.is_symlink())
        except OSError:
            return
        for child in children:
            if child.name.startswith(".") or child.name in _SKIP_DIRS:
                continue
            inner = checkpoint_dirs(child)
            if inner:
                found.extend((child, d) for d in inner)
            elif _looks_like_checkpoint(child):
                found.append((None, child))
            elif depth < _MAX_DEPTH:
                walk(child, depth + 1)

    walk(path, 1)
    return ("tree", found) if found else None


def _short(lineage: str | None) -> str:
    return lineage.rsplit("-", 1)[-1] if lineage else "-"


def _print_table(rows: list[dict[str, Any]]) -> None:
    w = sys.stdout.write
    w(f"{'checkpoint':<22} {'step':>7} {'files':>5} {'size':>10} {'time':>8}  {'lineage':<8} status\n")
    for row in rows:
        r: ckpt.CheckpointReport = row["report"]
        origin: _lineage.CheckpointOrigin = row["origin"]
        step = "" if r.step is None else str(r.step)
        # The lineage comes from a file in the checkpoint: anyone who could write there chose it.
        lineage = printable(_short(origin.lineage)) + ("*" if row.get("current") else "")
        w(
            f"{printable(r.path.name):<22} {step:>7} {r.files:>5} {format_bytes(r.bytes):>10} {r.seconds:>7.2f}s  "
            f"{lineage:<8} {r.status}\n"
        )
        for p in r.problems:
            w(f"    {p.format()}\n")
        for p in r.warnings:
            w(f"    warning: {p.format()}\n")
    notes = sorted({n for row in rows for n in row["report"].notes})
    for note in notes:
        w(f"note: {printable(note)}\n")


def _check(path: Path, workers: int | None, require_manifest: bool | None) -> ckpt.CheckpointReport:
    report = ckpt.check_checkpoint(path, require_manifest=require_manifest, workers=workers)
    unreadable = [p for p in report.problems if p.kind == "unreadable" and "Permission" in p.detail]
    if unreadable:
        raise PermissionError(unreadable[0].detail)
    return report


def _verify_output_dir(output_dir: Path, folders: list[Path], workers: int | None) -> dict[str, Any]:
    origins = [_lineage.checkpoint_origin(d) for d in folders]
    scope = _lineage.current_scope(output_dir, origins)
    rows: list[dict[str, Any]] = [
        {"report": _check(d, workers, None), "origin": o, "current": scope.lineage is not None and scope.admits(o)}
        for d, o in zip(folders, origins, strict=True)
    ]
    resume = next(
        (row["report"].path for row in reversed(rows) if row["report"].ok and scope.admits(row["origin"])), None
    )
    return {"output_dir": output_dir, "rows": rows, "scope": scope, "resume": resume}


def _row_json(row: dict[str, Any], output_dir: Path | None) -> dict[str, Any]:
    entry = row["report"].to_dict()
    entry["output_dir"] = display_name(output_dir) if output_dir is not None else None
    entry["origin"] = row["origin"].to_dict()
    entry["current_lineage"] = bool(row.get("current"))
    return entry


# ------------------------------------------------------------------------------------------------- verify
def run_verify(args: argparse.Namespace) -> int:
    from ._output import EXIT_FAILED, EXIT_OK, emit_json

    path = Path(args.path)
    if args.workers is not None and args.workers < 1:
        return _usage_error(f"--workers must be 1 or more, not {args.workers}", args.json, "verify")
    if not path.is_dir():
        return _usage_error(_not_a_folder(path), args.json, "verify")
    found = _targets(path)
    if found is None:
        return _usage_error(f"no checkpoint in or below {display_name(path)}", args.json, "verify")
    kind, entries = found
    groups: list[dict[str, Any]] = []
    for output_dir in dict.fromkeys(o for o, _ in entries if o is not None):
        groups.append(_verify_output_dir(output_dir, [c for o, c in entries if o == output_dir], args.workers))
    loose = [c for o, c in entries if o is None]
    if loose:
        rows = [{"report": _check(c, args.workers, None), "origin": _lineage.checkpoint_origin(c)} for c in loose]
        groups.append({"output_dir": None, "rows": rows, "scope": None, "resume": None})
    ok = all(row["report"].ok for g in groups for row in g["rows"])
    if args.json:
        document: dict[str, Any] = {
            "ok": ok,
            "path": display_name(path),
            "kind": kind,
            "checkpoints": [_row_json(row, g["output_dir"]) for g in groups for row in g["rows"]],
        }
        if kind == "output_dir":
            resume = groups[0]["resume"]
            document["resume_from"] = display_name(resume) if resume is not None else None
            document["lineage"] = groups[0]["scope"].lineage
        elif kind == "tree":
            document["output_dirs"] = [
                {
                    "path": display_name(g["output_dir"]),
                    "lineage": g["scope"].lineage,
                    "resume_from": display_name(g["resume"]) if g["resume"] is not None else None,
                    "ok": all(row["report"].ok for row in g["rows"]),
                }
                for g in groups
                if g["output_dir"] is not None
            ]
        emit_json(document)
        return EXIT_OK if ok else EXIT_FAILED
    for g in groups:
        if kind == "tree":
            name = printable(g["output_dir"]) if g["output_dir"] is not None else "checkpoints"
            sys.stdout.write(f"\n{name}:\n")
        _print_table(g["rows"])
        if g["output_dir"] is not None:
            scope = g["scope"]
            if scope.lineage is not None:
                sys.stdout.write(f"current lineage: {printable(scope.lineage)} (marked *)\n")
            resume = g["resume"]
            name = printable(resume.name) if resume is not None else "none (no checkpoint of it verifies)"
            sys.stdout.write(f"resume from: {name}\n")
    if kind == "tree":
        failed = sum(1 for g in groups for row in g["rows"] if not row["report"].ok)
        total = sum(len(g["rows"]) for g in groups)
        sys.stdout.write(f"\n{total} checkpoint(s) under {printable(path)}: {total - failed} ok, {failed} FAILED\n")
    return EXIT_OK if ok else EXIT_FAILED


# ----------------------------------------------------------------------------------------------- manifest
def adopt(folder: Path, *, force: bool = False, workers: int | None = None) -> dict[str, Any]:
    """Write the manifest of one checkpoint that has none (after its structural checks pass); keep a manifest that
    verifies; refuse one that fails unless ``force``. Returns ``{"action", "report", ...}``.

    ``action`` is ``written``, ``kept`` (already verified), ``rewritten`` (``force``) or ``refused``.
    """
    if ckpt.has_manifest(folder):
        report = _check(folder, workers, True)
        if report.ok:
            return {"action": "kept", "report": report}
        if not force:
            return {
                "action": "refused",
                "report": report,
                "why": "its manifest fails: writing a new one would vouch for damaged files (--force to do so)",
            }
        ckpt.write_manifest(folder, workers=workers, lineage=_adopted(folder))
        return {"action": "rewritten", "report": report}
    report = _check(folder, workers, False)
    if not report.ok and not force:
        return {
            "action": "refused",
            "report": report,
            "why": "the structural checks fail (--force to write a manifest of it as it is)",
        }
    ckpt.write_manifest(folder, workers=workers, lineage=_adopted(folder))
    return {"action": "written", "report": report}


def _adopted(folder: Path) -> dict[str, Any]:
    # Keep whatever lineage the folder records (a forced rewrite); a legacy folder's writer stays unknown.
    origin = _lineage.checkpoint_origin(folder)
    return {
        **origin.record,
        "lineage": origin.lineage,
        "run": origin.run,
        "step": checkpoint_step(folder),
        "saved_by": origin.saved_by or "adopted (trainguard manifest)",
    }


def run_manifest(args: argparse.Namespace) -> int:
    from ._output import EXIT_FAILED, EXIT_OK, emit_json

    path = Path(args.path)
    if args.workers is not None and args.workers < 1:
        return _usage_error(f"--workers must be 1 or more, not {args.workers}", args.json, "manifest")
    if not path.is_dir():
        return _usage_error(_not_a_folder(path), args.json, "manifest")
    found = _targets(path)
    if found is None:
        return _usage_error(f"no checkpoint in or below {display_name(path)}", args.json, "manifest")
    _kind, entries = found
    for output_dir in dict.fromkeys(o for o, _ in entries if o is not None):
        ckpt.mark_run_uses_manifests(output_dir)
    folders = [c for _, c in entries]
    # Oldest first: each write keeps its folder's mtime, so the Trainer's mtime-ordered rotation is unchanged anyway.
    results = [(folder, adopt(folder, force=args.force, workers=args.workers)) for folder in folders]
    ok = all(r["action"] != "refused" for _, r in results)
    if args.json:
        emit_json(
            {
                "ok": ok,
                "path": display_name(path),
                "checkpoints": [
                    {
                        "path": display_name(folder),
                        "action": r["action"],
                        "why": r.get("why"),
                        "before": r["report"].to_dict(),
                    }
                    for folder, r in results
                ],
            }
        )
    else:
        for folder, r in results:
            line = f"{printable(folder.name):<22} {r['action']}"
            if r["action"] == "refused":
                line += f": {r['why']}"
            sys.stdout.write(line + "\n")
            if r["action"] in ("refused", "rewritten"):
                for p in r["report"].problems:
                    sys.stdout.write(f"    {p.format()}\n")
    return EXIT_OK if ok else EXIT_FAILED
