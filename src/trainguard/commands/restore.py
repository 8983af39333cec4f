"""``trainguard restore PATH``: bring a checkpoint trainguard set aside (``trainguard-quarantine/``,
``trainguard-archive/``) back into its output_dir as ``checkpoint-N``. The rules live in
:mod:`trainguard.checks.restore`; this module only translates.

Exit status: 0 restored, 1 refused (its name is taken, a live run holds the lock, or its damage needs
``--accept-inexact`` / ``--force``; nothing was moved), 2 usage or I/O error (PATH is not a set-aside checkpoint).

Example::

    trainguard restore out/trainguard-quarantine/checkpoint-6.20261207T194409Z
    trainguard restore out/trainguard-quarantine/checkpoint-6.20261207T194409Z --accept-inexact   # RNG state missing
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..checks.restore import locate_set_aside, restore_checkpoint
from ..display import printable
from ..safe_fs import display_name

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "restore",
        help="bring a set-aside checkpoint (quarantine, archive) back into its output_dir",
        description=(
            "Move a checkpoint trainguard set aside (OUTPUT_DIR/trainguard-quarantine/checkpoint-N.<time>, or one "
            "in trainguard-archive/) back to OUTPUT_DIR/checkpoint-N, after verifying it again. Refused when that "
            "name is taken, while a run holds the lock, and when it fails verification: --accept-inexact for a "
            "checkpoint missing only its RNG state (resumable, not bit-exact; recorded in its manifest), --force "
            "for anything else (moved back as it is). Exit 0 restored, 1 refused, 2 usage or I/O error."
        ),
    )
    parser.add_argument("path", metavar="PATH", help="the set-aside checkpoint folder (`trainguard clean` lists them)")
    parser.add_argument(
        "--accept-inexact",
        action="store_true",
        help="bring back a checkpoint missing only its RNG state: the resume works but is not bit-exact",
    )
    parser.add_argument(
        "--force", action="store_true", help="bring back a damaged or modified checkpoint as it is (it still fails)"
    )
    parser.add_argument("--workers", type=int, default=None, help="hashing threads (default: CPUs, at most 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ._output import EXIT_OK, EXIT_USAGE, emit_json

    what = None
    path = Path(args.path)
    if locate_set_aside(path) is not None and (path.is_symlink() or not path.is_dir()):
        what = f"not a folder: {display_name(path)}" + (" (a link, never followed)" if path.is_symlink() else "")
    elif locate_set_aside(path) is None:
        what = (
            f"not a checkpoint trainguard set aside: {display_name(args.path)} "
            "(`trainguard clean OUTPUT_DIR` lists them)"
        )
    elif args.workers is not None and args.workers < 1:
        what = f"--workers must be 1 or more, not {args.workers}"
    if what is not None:
        if args.json:
            emit_json({"ok": False, "error": "UsageError", "what": what})
        else:
            sys.stderr.write(f"trainguard restore: {printable(what)}\n")
        return EXIT_USAGE
    result = restore_checkpoint(args.path, accept_inexact=args.accept_inexact, force=args.force, workers=args.workers)
    target = display_name(result.target)
    if result.damage == "inexact" and args.accept_inexact:
        step = (
            f"train(resume_from_checkpoint=True) resumes from {result.target.name}; it says 'not bit-exact' once "
            f"({', '.join(result.missing_rng)} missing: random draws differ from the uninterrupted run)."
        )
    elif result.damage == "none":
        step = (
            "train(resume_from_checkpoint=True) resumes from it when it is the newest that verifies "
            f"(`trainguard verify {display_name(result.output_dir)}` shows which)."
        )
    else:
        step = (
            f"It still fails verification, so a resume sets it aside again: if you changed it on purpose, vouch for "
            f"it as it is now with `trainguard manifest {target} --force`; otherwise restore it from a backup."
        )
    if args.json:
        emit_json({"ok": True, **result.to_dict(), "next_step": step})
        return EXIT_OK
    print(f"{result.action}: {printable(display_name(result.source))} -> {printable(target)}")
    if result.reason:
        print(f"  it was set aside because: {printable(result.reason)}")
    if result.damage == "damaged":
        for problem in result.report.problems:
            print(f"  still fails: {problem.format()}")
    print(f"next: {printable(step)}")
    return EXIT_OK
