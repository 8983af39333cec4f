"""``trainguard validate-data PATH``: validate a dataset file or folder, every problem with its file and line.

Exit status: 0 no error (warnings allowed), 1 the data has errors, 2 usage or I/O error (PATH or the tokenizer
folder missing or unusable; PATH a FIFO, device or socket, refused without blocking) or an internal error. Bad
*content* is never a traceback: it is a report with errors. Without ``--tokenizer`` the command imports neither torch
nor transformers.

Example::

    trainguard validate-data train.jsonl --tokenizer ./my-model --max-length 2048
    trainguard validate-data data/ --eval eval.jsonl --json | jq .stats.tokens
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from typing import Any

from ..checks.data import FORMATS, load_tokenizer, sniff_format, validate_data
from ..display import printable
from ..errors import UnsafeFileError
from ..safe_fs import describe_kind, display_name, display_text, open_read

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "validate-data",
        help="validate a training data file or folder (JSON, JSONL, CSV, Parquet)",
        description=(
            "Validate training data in one streaming pass: unreadable files, invalid UTF-8 and JSON (with line "
            "numbers), missing or empty fields, wrong types, token lengths and truncation (with --tokenizer), "
            "duplicates, diversity, contradictory labels and train/eval overlap. "
            "Exit status: 0 no error (warnings allowed), 1 the data has errors, 2 usage or I/O error."
        ),
    )
    parser.add_argument("path", metavar="PATH", help="a data file or a folder of them")
    parser.add_argument("--tokenizer", metavar="DIR", help="a local folder holding the tokenizer training uses")
    parser.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help="the length training truncates to (default: the tokenizer's model_max_length)",
    )
    parser.add_argument(
        "--format",
        choices=["auto", *FORMATS],
        default="auto",
        help="the record format (default: detected from the first records)",
    )
    parser.add_argument(
        "--eval", metavar="PATH", dest="eval_path", help="eval data: validated too, and its overlap with PATH reported"
    )
    parser.add_argument(
        "--min-unique-ratio",
        type=float,
        default=0.5,
        metavar="R",
        help="error below this fraction of distinct rows (default 0.5; 0 turns it off)",
    )
    parser.add_argument(
        "--max-answer-cut-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="error above this fraction of rows whose whole answer is truncated away (default 0)",
    )
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(func=run)


def _usage_error(message: str, as_json: bool) -> int:
    if as_json:
        from ._output import emit_json

        emit_json({"ok": False, "error": "UsageError", "what": display_text(message)})
    else:
        sys.stderr.write(f"trainguard validate-data: {printable(message)}\n")
    return 2


def _check_readable(path: str | None) -> None:
    """Refuse PATH before any read when it is a FIFO, device or socket (opening a FIFO to read blocks until a writer
    comes, which may be never), and raise PermissionError for a folder or file the user may not read (a folder's
    walk would otherwise skip it silently and report no data)."""
    if path is None or not os.path.exists(path):
        return  # validate_data names a missing path
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        with os.scandir(path):
            return
    if not stat.S_ISREG(mode):
        name = display_name(path)
        raise UnsafeFileError(
            f"{name} is {describe_kind(mode)}, not a data file: trainguard reads regular files only",
            where={"file": name},
            next_step="Give a data file or a folder of them; to validate a stream, save it to a file first.",
        )
    os.close(open_read(path))


def _max_length_without_tokenizer(args: argparse.Namespace) -> str | None:
    """Why ``--max-length`` cannot be applied, or None. Rows of token ids are measured without a tokenizer; text
    rows are not (only characters are counted), so there the limit would be ignored without a word."""
    if args.max_length is None or args.tokenizer:
        return None
    try:
        fmt = args.format if args.format != "auto" else sniff_format(args.path)
    except (OSError, TypeError, ValueError):
        return None  # the pass below names what is wrong with PATH
    if fmt in ("tokenized", "unknown"):  # unknown: the pass reports the format problem itself
        return None
    return (
        f"--max-length {args.max_length} needs --tokenizer DIR: {display_name(args.path)} is read as {fmt} rows, whose "
        "length in tokens only the tokenizer training uses can count (without it only characters are counted). "
        "Pass --tokenizer, or leave out --max-length."
    )


def run(args: argparse.Namespace) -> int:
    if args.max_length is not None and args.max_length <= 0:
        return _usage_error(f"--max-length must be positive, not {args.max_length}", args.json)
    _check_readable(args.path)
    _check_readable(args.eval_path)
    refused = _max_length_without_tokenizer(args)
    if refused is not None:
        return _usage_error(refused, args.json)
    tokenizer = None
    if args.tokenizer:
        try:
            tokenizer = load_tokenizer(args.tokenizer)
        except OSError as err:  # missing folder, or no tokenizer transformers can load there
            return _usage_error(str(err), args.json)
    try:
        report = validate_data(
            args.path,
            tokenizer=tokenizer,
            max_length=args.max_length,
            format=args.format,
            eval_source=args.eval_path,
            min_unique_ratio=args.min_unique_ratio or None,
            max_answer_cut_fraction=args.max_answer_cut_fraction,
            progress=False if args.no_progress else None,
        )
    except FileNotFoundError as err:
        return _usage_error(str(err), args.json)
    if args.json:
        from ._output import emit_json

        emit_json(report.to_dict())
    else:
        report.print()
    return 0 if report.ok else 1
