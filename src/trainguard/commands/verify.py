"""``trainguard verify PATH`` and ``trainguard manifest PATH``: checkpoint integrity from the shell, without torch.

``verify`` checks one checkpoint folder, or every ``checkpoint-N`` of an output_dir (a table, and which one a
resume would use). ``manifest`` adopts existing checkpoints: it writes the manifest of each one that has none, after
its structural checks pass. Exit status: 0 all good, 1 a check failed (or a checkpoint was refused), 2 usage or
I/O error.

Example::

    trainguard verify out                  # a table of every checkpoint
    trainguard verify out/checkpoint-50 --json
    trainguard manifest out                # adopt the checkpoints of a run started without trainguard
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..checks import checkpoint as ckpt
from ..checks._resume import checkpoint_dirs
from ..checks.resources import format_bytes

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
    verify.add_argument("path", metavar="PATH", help="a checkpoint folder or a run's output_dir")
    verify.add_argument("--json", action="store_true", help="print one JSON document")
    verify.add_argument("--workers", type=int, default=None, help="hashing threads (default: CPUs, at most 8)")
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
    manifest.add_argument("--workers", type=int, default=None, help="hashing threads (default: CPUs, at most 8)")
    manifest.set_defaults(func=run_manifest)


# ------------------------------------------------------------------------------------------------ helpers
def _usage_error(message: str, as_json: bool, command: str) -> int:
    from ..cli import EXIT_USAGE, emit_json

    if as_json:
        emit_json({"ok": False, "error": "UsageError", "what": message})
    else:
        sys.stderr.write(f"trainguard {command}: {message}\n")
    return EXIT_USAGE


def _targets(path: Path) -> tuple[str, list[Path]] | None:
    """("output_dir", its checkpoints) or ("checkpoint", [path]); None when PATH holds no checkpoint."""
    dirs = checkpoint_dirs(path)
    if dirs:
        return "output_dir", dirs
    if any(path.iterdir()):
        return "checkpoint", [path]
    return None




def _print_table(reports: list[ckpt.CheckpointReport], extra: dict[str, str] | None = None) -> None:
    w = sys.stdout.write
    w(f"{'checkpoint':<22} {'step':>7} {'files':>5} {'size':>10} {'time':>8}  status\n")
    for r in reports:
        step = "" if r.step is None else str(r.step)
        action = f"  [{extra[str(r.path)]}]" if extra and str(r.path) in extra else ""
        size = format_bytes(r.bytes)
        w(f"{r.path.name:<22} {step:>7} {r.files:>5} {size:>10} {r.seconds:>7.2f}s  {r.status}{action}\n")
        for p in r.problems:
            w(f"    {p.format()}\n")
    notes = sorted({n for r in reports for n in r.notes})
    for note in notes:
        w(f"note: {note}\n")


def _check(path: Path, workers: int | None, require_manifest: bool | None) -> ckpt.CheckpointReport:
    report = ckpt.check_checkpoint(path, require_manifest=require_manifest, workers=workers)
    unreadable = [p for p in report.problems if p.kind == "unreadable" and "Permission" in p.detail]
    if unreadable:
        raise PermissionError(unreadable[0].detail)
    return report


# ------------------------------------------------------------------------------------------------- verify
def run_verify(args: argparse.Namespace) -> int:
    from ..cli import EXIT_FAILED, EXIT_OK, emit_json

    path = Path(args.path)
    if not path.is_dir():
        return _usage_error(f"no such folder: {path}" if not path.exists() else f"not a folder: {path}", args.json,
                            "verify")
    found = _targets(path)
    if found is None:
        return _usage_error(f"no checkpoint in {path} (an empty folder)", args.json, "verify")
    kind, folders = found
    run_has = ckpt.run_uses_manifests(path) if kind == "output_dir" else None
    reports = [_check(d, args.workers, run_has) for d in folders]
    ok = all(r.ok for r in reports)
    resume = next((r.path for r in reversed(reports) if r.ok), None) if kind == "output_dir" else None
    if args.json:
        document: dict[str, Any] = {"ok": ok, "path": str(path), "kind": kind,
                                    "checkpoints": [r.to_dict() for r in reports]}
        if kind == "output_dir":
            document["resume_from"] = str(resume) if resume is not None else None
        emit_json(document)
    else:
        _print_table(reports)
        if kind == "output_dir":
            sys.stdout.write(
                f"resume from: {resume.name if resume is not None else 'none (no checkpoint verifies)'}\n"
            )
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
            return {"action": "refused", "report": report,
                    "why": "its manifest fails: writing a new one would vouch for damaged files (--force to do so)"}
        ckpt.write_manifest(folder, workers=workers)
        return {"action": "rewritten", "report": report}
    report = _check(folder, workers, False)
    if not report.ok and not force:
        return {"action": "refused", "report": report,
                "why": "the structural checks fail (--force to write a manifest of it as it is)"}
    ckpt.write_manifest(folder, workers=workers)
    return {"action": "written", "report": report}


def run_manifest(args: argparse.Namespace) -> int:
    from ..cli import EXIT_FAILED, EXIT_OK, emit_json

    path = Path(args.path)
    if not path.is_dir():
        return _usage_error(f"no such folder: {path}" if not path.exists() else f"not a folder: {path}", args.json,
                            "manifest")
    found = _targets(path)
    if found is None:
        return _usage_error(f"no checkpoint in {path} (an empty folder)", args.json, "manifest")
    kind, folders = found
    if kind == "output_dir":
        ckpt.mark_run_uses_manifests(path)
    # Oldest first: each write keeps its folder's mtime, so the Trainer's mtime-ordered rotation is unchanged anyway.
    results = [(folder, adopt(folder, force=args.force, workers=args.workers)) for folder in folders]
    ok = all(r["action"] != "refused" for _, r in results)
    if args.json:
        emit_json({
            "ok": ok,
            "path": str(path),
            "checkpoints": [
                {"path": str(folder), "action": r["action"], "why": r.get("why"), "before": r["report"].to_dict()}
                for folder, r in results
            ],
        })
    else:
        for folder, r in results:
            line = f"{folder.name:<22} {r['action']}"
            if r["action"] == "refused":
                line += f": {r['why']}"
            sys.stdout.write(line + "\n")
            if r["action"] in ("refused", "rewritten"):
                for p in r["report"].problems:
                    sys.stdout.write(f"    {p.format()}\n")
    return EXIT_OK if ok else EXIT_FAILED
