"""``trainguard inspect PATH``: what trainguard knows about a run's ``output_dir``, without touching it.

Shows the run lock (held or free, and who holds or last held it), the recorded runs and crashes (and a crash loop
if the next start would be refused), the checkpoints (verified with ``trainguard.checks.checkpoint`` where that
module is installed), merged versions (``v001``, ``v002``, … with their ``trainguard-version.json``) and the run
identity the guards recorded (``stateful_callbacks`` of the newest checkpoint's ``trainer_state.json``) and which
run lineage wrote each checkpoint. Reads only; never imports torch. Exit status 0, or 2 when PATH is not a folder.

Hostile or broken records never hang or crash it: a FIFO, device or link at the lock, its holder record or the
crash log is reported (never opened through, never blocked on), a holder record that cannot be parsed or has
fields of the wrong type is shown as unreadable, malformed crash-log lines are skipped and counted, and the
command line and exception text it shows are redacted (``--hub_token ***``). Every field of the text output is
passed through :func:`~trainguard.display.printable` first: a holder record, crash message or file name holding ESC
or a newline is shown escaped, on its own line; ``--json`` keeps the exact text.

Example::

    trainguard inspect out
    trainguard inspect out --json | jq .lock
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path
from typing import Any

from ..checks import crash_loop
from ..checks import lineage as _lineage
from ..checks._layout import ARCHIVE_DIR, QUARANTINE_DIR
from ..checks._resume import checkpoint_dirs, checkpoint_step
from ..checks.checkpoint.manifest import checkpoint_totals
from ..checks.preflight import format_bytes
from ..checks.run_lock import lock_status
from ..display import printable, printable_tree
from ..errors import TrainGuardError
from ..safe_fs import load_json

__all__ = ["inspect_output_dir", "register"]

_VERSION_RE = re.compile(r"^v(\d{3,})$")
_VERSION_METADATA = "trainguard-version.json"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show a run's lock, crashes, checkpoints, versions and recorded identity",
        description="Show what trainguard knows about an output_dir (read only). Exit 0, or 2 if PATH is missing.",
    )
    parser.add_argument("path", metavar="PATH", help="the run's output_dir")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--no-verify", action="store_true", help="list checkpoints without verifying them (fast on huge runs)"
    )
    parser.set_defaults(func=run)


def _read_json(path: Path) -> Any:
    try:
        return load_json(path)
    except TrainGuardError as exc:  # not JSON, too deep, 1e999, a FIFO: say so, never raise
        return {"unreadable": f"{type(exc).__name__}: {exc.what}"}
    except OSError as exc:
        return {"unreadable": f"{type(exc).__name__}: {exc}"}


def _verifier() -> Any:
    """``check_checkpoint`` (returns a report) or ``verify_checkpoint`` (raises) from the checkpoint module, if any."""
    try:
        module = importlib.import_module("trainguard.checks.checkpoint")
    except ImportError:
        return None
    return getattr(module, "check_checkpoint", None) or getattr(module, "verify_checkpoint", None)


def _verify(verify: Any, path: Path) -> dict[str, Any]:
    try:
        result = verify(path)
    except Exception as exc:  # a TrainGuardError names the damage; anything else is reported, not raised
        lines = str(exc).splitlines()
        what = getattr(exc, "what", None) or (lines[0] if lines else "")
        return {"verified": False, "status": "FAILED", "problem": f"{type(exc).__name__}: {what}"}
    if result is False:
        return {"verified": False, "status": "FAILED", "problem": "verification failed"}
    detail: dict[str, Any] = {"verified": True, "status": "verified"}
    if result is None or result is True:
        return detail
    to_dict = getattr(result, "to_dict", None)
    detail["report"] = to_dict() if callable(to_dict) else result if isinstance(result, dict) else str(result)
    if getattr(result, "ok", True) is False:
        detail["verified"] = False
        describe = getattr(result, "describe", None)
        detail["problem"] = describe() if callable(describe) else "verification failed"
    status = getattr(result, "status", None)
    if isinstance(status, str):
        detail["status"] = status
    return detail


def _checkpoints(folder: Path, verify: bool) -> list[dict[str, Any]]:
    found = [(checkpoint_step(p) or 0, p) for p in checkpoint_dirs(folder)]
    verifier = _verifier() if verify else None
    out: list[dict[str, Any]] = []
    for step, path in found:
        files, total = checkpoint_totals(path)  # the count `trainguard verify` shows
        entry: dict[str, Any] = {"name": path.name, "step": step, "path": str(path), "files": files, "bytes": total}
        origin = _lineage.checkpoint_origin(path)
        entry["origin"] = origin.to_dict()
        entry["written_by"] = origin.describe()
        if verifier is not None:
            entry.update(_verify(verifier, path))
        else:
            entry["verified"] = None
            entry["status"] = "unverified"
            entry["problem"] = "--no-verify" if not verify else "trainguard.checks.checkpoint is not installed"
        out.append(entry)
    return out


def _versions(folder: Path) -> list[dict[str, Any]]:
    # safe_merge's versions folder may be the output_dir itself or any folder directly inside it.
    places = [folder, *sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))]
    out: list[dict[str, Any]] = []
    for place in places:
        try:
            children = sorted(
                (int(m.group(1)), p) for p in place.iterdir() if (m := _VERSION_RE.match(p.name)) and p.is_dir()
            )
        except OSError:
            continue
        for _number, path in children:
            meta_file = path / _VERSION_METADATA
            out.append(
                {
                    "name": path.name,
                    "path": str(path),
                    "metadata": _read_json(meta_file) if meta_file.is_file() else None,
                }
            )
    return out


def _identity(folder: Path, checkpoints: list[dict[str, Any]]) -> dict[str, Any]:
    identity: dict[str, Any] = {"checkpoint": None, "stateful_callbacks": {}}
    if checkpoints:
        newest = Path(checkpoints[-1]["path"])
        state = _read_json(newest / "trainer_state.json") if (newest / "trainer_state.json").is_file() else {}
        callbacks = state.get("stateful_callbacks") if isinstance(state, dict) else None
        identity["checkpoint"] = newest.name
        if isinstance(callbacks, dict):
            # TrainerControl is the Trainer's own; the rest are guards' records (DatasetGuard, LoraConfigGuard...).
            identity["stateful_callbacks"] = {k: v for k, v in callbacks.items() if k != "TrainerControl"}
    return identity


def _lineages(folder: Path, checkpoints: list[dict[str, Any]]) -> dict[str, Any]:
    registry = _lineage.read_registry(folder)
    scope = _lineage.current_scope(folder)
    runs = registry.get("runs") if isinstance(registry.get("runs"), list) else []
    lineages = registry.get("lineages") if isinstance(registry.get("lineages"), dict) else {}
    return {
        "current": scope.lineage,
        "source": scope.source,
        "adopts_unrecorded": scope.adopts_unrecorded,
        "lineages": lineages,
        "runs": runs,
        "checkpoints": {c["name"]: c["origin"].get("lineage") for c in checkpoints},
    }


def _moved(folder: Path, name: str) -> list[str]:
    place = folder / name
    try:
        return sorted(p.name for p in place.iterdir() if not p.name.endswith(".reason.json"))
    except OSError:
        return []


def inspect_output_dir(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Everything ``trainguard inspect`` shows, as one JSON-ready dict (reads only).

    Args:
        path: The run's output_dir.
        verify: Verify each checkpoint with ``trainguard.checks.checkpoint.verify_checkpoint`` when available.

    Raises:
        FileNotFoundError: ``path`` is not a folder.

    Example::

        report = inspect_output_dir("out"); report["lock"]["held"]
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    crash_log: dict[str, Any] = {"path": str(crash_loop.crash_log_path(folder)), "problem": None, "skipped_lines": []}
    try:
        runs, crash_log["skipped_lines"] = crash_loop.load_run_history(folder)
    except TrainGuardError as err:  # a FIFO or link at the log's name: report it, read nothing through it
        runs, crash_log["problem"] = [], err.what
    loop = crash_loop.find_crash_loop(folder, max_repeats=3, runs=runs)
    checkpoints = _checkpoints(folder, verify)
    return {
        "ok": True,
        "path": str(folder),
        "lock": lock_status(folder),
        "runs": [r.to_dict() for r in runs],
        "crash_log": crash_log,
        "crash_loop": loop.to_dict() if loop is not None else None,
        "checkpoints": checkpoints,
        "lineage": _lineages(folder, checkpoints),
        "set_aside": _moved(folder, QUARANTINE_DIR),
        "archived": _moved(folder, ARCHIVE_DIR),
        "versions": _versions(folder),
        "identity": _identity(folder, checkpoints),
    }


def _print(report: dict[str, Any]) -> None:
    w = sys.stdout.write
    w(f"{report['path']}\n")
    lock = report["lock"]
    holder = lock.get("holder") or {}
    if holder:
        who = (
            f"PID {holder.get('pid')} on {holder.get('host')}, started {holder.get('started_utc')}, "
            f"command: {holder.get('command')}"
        )
    elif lock.get("holder_error"):
        who = f"an unknown holder (no readable .trainguard.lock.json: {lock['holder_error']})"
    else:
        who = "an unknown holder (no readable .trainguard.lock.json)"
    if lock.get("problem"):
        w(f"lock:        unknown: {lock['problem']}\n")
        if holder or lock.get("holder_error"):
            w(f"             last record: {who}\n")
    elif lock["held"] is True:
        pids = lock.get("holder_pids") or []
        extra = f" (kernel: PID {', '.join(map(str, pids))})" if pids and holder.get("pid") not in pids else ""
        w(f"lock:        HELD by {who}{extra}\n")
    elif lock["held"] is None:
        w(f"lock:        unknown (the filesystem cannot tell); last record: {who}\n")
    elif lock["exists"]:
        w(f"lock:        free; last held by {who}\n")
    else:
        w("lock:        free (never taken by RunLock)\n")
    if lock.get("reach") != "ok":
        w(f"             note: {lock.get('note')}\n")

    runs = report["runs"]
    counts: dict[str, int] = {}
    for run in runs:
        counts[run["outcome"]] = counts.get(run["outcome"], 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none recorded"
    crash_log = report["crash_log"]
    if crash_log["problem"]:
        summary = f"unknown: {crash_log['problem']}"
    w(f"runs:        {summary}\n")
    skipped = crash_log["skipped_lines"]
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        w(f"             skipped {len(skipped)} malformed line(s) of {crash_loop.CRASH_LOG} (line {shown})\n")
    for run in runs:
        if run["outcome"] in ("failed", "unknown"):
            start = run["start"]
            if run["failures"]:
                for f in run["failures"]:
                    w(
                        f"  crash      step {f.get('step')}: {f.get('exception')}: {f.get('message')} "
                        f"({f.get('utc')}, {f.get('host')}, rank {f.get('rank')})\n"
                    )
            else:
                w(f"  crash      started at step {start.get('step')}, {crash_loop.UNKNOWN} ({start.get('utc')})\n")
    loop = report["crash_loop"]
    if loop:
        w(
            f"crash loop:  {loop['exception']} at step {loop['step']} ended the last {loop['count']} runs: "
            "the next start with CrashLoopGuard is refused\n"
        )

    checkpoints = report["checkpoints"]
    lineage = report["lineage"]
    current = lineage["current"]
    w(f"checkpoints: {len(checkpoints) or 'none'}\n")
    for c in checkpoints:
        status = c.get("status") or {True: "verified", False: "FAILED", None: "unverified"}[c.get("verified")]
        problem = f" - {c['problem']}" if c.get("problem") else ""
        origin = c["origin"]
        who = (
            f"lineage {origin['lineage']}"
            if origin.get("lineage")
            else ("no trainguard record" if origin.get("state") == "legacy" else "lineage not recorded")
        )
        if origin.get("lineage") and origin["lineage"] == current:
            who += " (current)"
        if origin.get("saved_by"):
            who += f", {origin['saved_by']}"
        w(f"  {c['name']:<20} {c['files']:>4} files {format_bytes(c['bytes']):>10}  {status}{problem}\n")
        w(f"  {'':<20} written by {who}\n")
    if current:
        w(f"lineage:     current {current} (from the {lineage['source']})\n")
        by_lineage: dict[str, int] = {}
        for run in lineage["runs"]:
            if isinstance(run, dict):
                by_lineage[str(run.get("lineage"))] = by_lineage.get(str(run.get("lineage")), 0) + 1
        for name, count in by_lineage.items():
            w(f"             {name}: {count} run(s)\n")
    else:
        w("lineage:     none recorded\n")
    for key, label in (("set_aside", "set aside"), ("archived", "archived")):
        if report[key]:
            w(f"{label + ':':<13}{', '.join(report[key])}\n")

    versions = report["versions"]
    w(f"versions:    {len(versions) or 'none'}\n")
    for v in versions:
        meta = v.get("metadata")
        if isinstance(meta, dict):
            keys = ("created_utc", "utc", "source_checkpoint", "dataset_fingerprint")
            facts = ", ".join(f"{k}={meta[k]}" for k in keys if k in meta and not isinstance(meta[k], dict))
            w(f"  {v['path']}  {facts or 'metadata: ' + ', '.join(sorted(meta))}\n")
        else:
            w(f"  {v['path']}  (no {_VERSION_METADATA})\n")

    identity = report["identity"]
    recorded = identity["stateful_callbacks"]
    if recorded:
        w(f"identity:    recorded in {identity['checkpoint']}/trainer_state.json by {', '.join(sorted(recorded))}\n")
    else:
        w("identity:    none recorded\n")


def run(args: argparse.Namespace) -> int:
    from ._output import EXIT_OK, EXIT_USAGE, emit_json

    folder = Path(args.path)
    if not folder.is_dir():
        what = f"no such folder: {folder}" if not folder.exists() else f"not a folder: {folder}"
        if args.json:
            emit_json({"ok": False, "error": "FileNotFoundError", "what": what})
        else:
            sys.stderr.write(f"trainguard inspect: {printable(what)}\n")
        return EXIT_USAGE
    report = inspect_output_dir(folder, verify=not args.no_verify)
    if args.json:
        emit_json(report)
    else:
        # Every string of the report came from files anyone with write access could craft: one printable line each.
        _print(printable_tree(report))
    return EXIT_OK
