"""The ``trainguard`` command: a thin adapter from argv to trainguard's checks.

Exit status: 0 all good, 1 a check failed, 2 usage or I/O error. ``--json`` prints one JSON document on stdout.
The command never imports torch unless a subcommand needs it, so it answers in well under a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ._version import __version__
from .errors import TrainGuardError

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# Each subcommand module exposes ``register(subparsers)``, which adds its parser and sets ``func``: a callable
# taking the parsed namespace and returning an exit status.
_SUBCOMMANDS: tuple[str, ...] = (
    "trainguard.commands.inspect",
    "trainguard.commands.validate_data",
    "trainguard.commands.verify",
)


class _Parser(argparse.ArgumentParser):
    #: Set by :func:`main` when ``--json`` is on the command line: usage errors are then JSON too.
    json_errors: bool = False

    def error(self, message: str) -> Any:  # argparse's own exit code for usage errors is already 2
        if _Parser.json_errors:
            emit_json({"ok": False, "error": "UsageError", "what": f"{self.prog}: {message}"})
            self.exit(EXIT_USAGE)
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="trainguard",
        description=(
            "Safeguards for Hugging Face Trainer runs. Exit status: 0 all good, 1 a check failed, 2 usage or I/O error."
        ),
    )
    parser.add_argument("--version", action="version", version=f"trainguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    import importlib

    for module_name in _SUBCOMMANDS:
        importlib.import_module(module_name).register(sub)
    return parser


def emit_json(document: Any) -> None:
    """Print ``document`` as JSON on stdout (the ``--json`` output of every subcommand)."""
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n")


def _report_error(err: BaseException, as_json: bool, status: int) -> int:
    if as_json:
        if isinstance(err, TrainGuardError):
            emit_json({"ok": False, **err.to_dict()})
        else:
            emit_json({"ok": False, "error": type(err).__name__, "what": str(err)})
    else:
        sys.stderr.write(f"trainguard: {err}\n")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trainguard`` command and return its exit status."""
    parser = build_parser()
    _Parser.json_errors = "--json" in (sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    as_json = bool(getattr(args, "json", False))
    try:
        return func(args)
    except TrainGuardError as err:
        return _report_error(err, as_json, EXIT_FAILED)
    except OSError as err:
        return _report_error(err, as_json, EXIT_USAGE)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
