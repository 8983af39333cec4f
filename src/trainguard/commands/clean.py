"""``trainguard clean OUTPUT_DIR``: list what trainguard set aside (``trainguard-archive/``,
``trainguard-quarantine/``) with sizes; remove it only with ``--yes``.

trainguard never deletes a checkpoint on its own, so set-aside folders grow with every resume from an early
checkpoint and every checkpoint that failed verification. Without ``--yes`` this is a dry run. Only entries inside
those two folders are ever removed: never a ``checkpoint-N`` the run may still resume from, never a file of yours.
Removal is refused while a run holds ``OUTPUT_DIR``'s run lock (it may be setting something aside right now).

Exit status: 0 listed (or removed), 1 removal refused (a live run holds the lock) or incomplete, 2 usage or I/O
error (OUTPUT_DIR missing, a link or special file at a set-aside folder's name).

Example::

    trainguard clean out             # what would be removed, and how much space it takes
    trainguard clean out --yes       # remove it
    trainguard clean out --json | jq .total_bytes
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..checks.preflight import format_bytes
from ..checks.run_lock import LOCK_NAME, lock_status
from ..checks.set_aside import SET_ASIDE_DIRS, list_set_aside, remove_set_aside
from ..display import printable
from ..errors import RunLockedError
from ..safe_fs import display_name

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "clean",
        help="list what trainguard set aside (archive, quarantine) with sizes; remove it with --yes",
        description=(
            f"List the checkpoints trainguard set aside in OUTPUT_DIR ({', '.join(SET_ASIDE_DIRS)}) with their "
            "sizes; remove them only with --yes (a dry run otherwise). Nothing outside those folders is touched. "
            "Exit status: 0 listed or removed, 1 removal refused or incomplete, 2 usage or I/O error."
        ),
    )
    parser.add_argument("path", metavar="OUTPUT_DIR", help="the run's output_dir")
    parser.add_argument("--yes", action="store_true", help="remove what is listed (default: only list it)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    output_dir = Path(args.path)
    if not output_dir.is_dir():
        raise FileNotFoundError(2, "not a folder", os.fspath(output_dir))  # exit 2, naming the path
    items = list_set_aside(output_dir)
    total = sum(item.size_bytes for item in items)
    removed = []
    if args.yes and items:
        lock = lock_status(output_dir)
        if lock["held"] and not lock["held_by_this_process"]:
            raise RunLockedError(
                f"a run holds the lock on {display_name(output_dir)}: it may be setting a checkpoint aside now, "
                f"so nothing was removed ({len(items)} item(s), {format_bytes(total)} set aside)",
                where={"file": display_name(output_dir / LOCK_NAME)},
                next_step="Run `trainguard clean` again with --yes once that run has ended (`trainguard inspect` "
                "shows who holds the lock).",
            )
        removed = remove_set_aside(output_dir, items)
    left = [item for item in items if item not in removed]
    incomplete = bool(args.yes and left)
    if args.json:
        from ._output import emit_json

        emit_json(
            {
                "ok": not incomplete,
                "output_dir": display_name(output_dir),
                "dry_run": not args.yes,
                "items": [item.to_dict() for item in items],
                "total_bytes": total,
                "removed": [item.to_dict() for item in removed],
                "removed_bytes": sum(item.size_bytes for item in removed),
            }
        )
        return 1 if incomplete else 0
    if not items:
        print(f"{printable(display_name(output_dir))}: nothing set aside by trainguard")
        return 0
    for item in items:
        mark = "removed" if item in removed else ("left" if args.yes else "would remove")
        print(f"{mark:>12}  {format_bytes(item.size_bytes):>10}  {printable(display_name(item.path))}")
    if not args.yes:
        print(
            f"{len(items)} item(s), {format_bytes(total)} set aside by trainguard; nothing removed "
            f"(dry run). Remove them with: trainguard clean {printable(display_name(output_dir))} --yes"
        )
        return 0
    freed = format_bytes(sum(item.size_bytes for item in removed))
    print(f"removed {len(removed)} of {len(items)} item(s), {freed} freed")
    if incomplete:
        print(f"{len(left)} item(s) could not be removed (permissions, or in use): see the list above")
        return 1
    return 0
