"""The ``trainguard`` command: a thin adapter from argv to trainguard's checks.

Exit status, the same for every subcommand (scripts rely on it; ``trainguard --help`` shows it too):

==== ==========================================================================================================
0    all good (warnings allowed)
1    a check failed: a damaged or refused checkpoint, data with errors, any other ``TrainGuardError`` finding --
     including a :class:`~trainguard.errors.MalformedFileError` (a file the command examined is corrupted)
2    usage error (a bad subcommand or option, a missing argument), I/O error (a missing, unreadable or unwritable
     path: any ``OSError``; a FIFO, device or link trainguard refused to use: an
     :class:`~trainguard.errors.UnsafeFileError`), or an internal error in trainguard (any other exception: a bug,
     reported on one line with where to report it; ``--debug`` shows the traceback)
130  interrupted (Ctrl-C)
==== ==========================================================================================================

An internal error is never exit 1, so "the check failed" always means the check ran and found something.

``--json`` (before or after the subcommand) prints exactly one JSON document on stdout on every path: the result,
a usage error, an I/O error, an internal error, even ``--help``. Errors are ``{"ok": false, "error": <name>,
"what": ..., ...}``. ``--debug`` (before or after the subcommand) prints the full traceback of an error on stderr.
Text that is not valid UTF-8 (a file name with undecodable bytes, a lone surrogate in data) is printed escaped
(``\\xff``, ``\\ud800``), never crashing the output. Every text output and message passes one display function,
:func:`trainguard.display.printable`, where it is written: a control character, bidi override or line break in a
file name, a data field or an argument is shown as ``\\x1b``, ``\\u202e``, ``\\n``, never obeyed by the terminal;
``--json`` output keeps the exact text (JSON escapes it). The command never imports torch unless a subcommand needs
it, so it answers in well under a second.

Example::

    trainguard verify out --json; echo $?      # 0 ok, 1 a check failed, 2 usage / I/O / internal error
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import IO, Any, TextIO

from ._version import __version__
from .atomic import TEMP_MARKER
from .commands._output import EXIT_ERROR, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, emit_json
from .commands._output import dumps as _dumps
from .display import PrintableWriter, printable
from .errors import TrainGuardError, UnsafeFileError
from .redact import redact_text
from .safe_fs import display_text

__all__ = ["EXIT_ERROR", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "ISSUES_URL", "main"]


#: Where an internal error asks to be reported (``[project.urls] Issues`` in pyproject.toml).
ISSUES_URL = "https://github.com/trainguard/trainguard/issues"

EXIT_STATUS_HELP = """\
exit status:
  0    all good (warnings allowed)
  1    a check failed (damaged or refused checkpoint, data with errors, a corrupted file)
  2    usage error, I/O error (missing or unreadable path, a FIFO/device/link trainguard
       refused), or an internal error in trainguard (a bug: please report it)
  130  interrupted

--json and --debug may come before or after COMMAND."""

# Each subcommand module exposes ``register(subparsers)``, which adds its parser and sets ``func``: a callable
# taking the parsed namespace and returning an exit status.
_SUBCOMMANDS: tuple[str, ...] = (
    "trainguard.commands.clean",
    "trainguard.commands.inspect",
    "trainguard.commands.restore",
    "trainguard.commands.validate_data",
    "trainguard.commands.verify",
)

_MAX_MESSAGE = 1000


class _Formatter(argparse.HelpFormatter):
    # Keep text that has its own line breaks (the exit-status table) as written; wrap the rest as usual.
    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    #: Set by :func:`build_parser`: usage errors and ``--help`` are then JSON on stdout too.
    json_output: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # argparse's own exit code for usage errors is already 2
        if self.json_output:
            emit_json({"ok": False, "error": "UsageError", "what": f"{self.prog}: {message}"})
            self.exit(EXIT_USAGE)
        self.print_usage(sys.stderr)
        # The message may quote an argument (a PATH holding ESC or a newline): one escaped line.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {printable(message)}\n")

    def _print_message(self, message: str, file: Any = None) -> None:
        # --help and --version print to stdout; with --json that stdout must still be one JSON document.
        if self.json_output and message and (file is None or file is sys.stdout):
            emit_json({"ok": True, "text": message})
            return
        super()._print_message(message, file)


def build_parser(*, json_output: bool = False) -> argparse.ArgumentParser:
    """The ``trainguard`` argument parser; with ``json_output`` its usage errors and help are JSON."""
    parser = _Parser(
        prog="trainguard",
        description=(
            "Safeguards for Hugging Face Trainer runs. Exit status: 0 all good, 1 a check failed, 2 usage or I/O "
            "error, or an internal error in trainguard (the table below)."
        ),
        epilog=EXIT_STATUS_HELP,
    )
    parser.add_argument("--version", action="version", version=f"trainguard {__version__}")
    # Also accepted before the subcommand: ``main`` finds both in argv before parsing (a usage error needs them).
    parser.add_argument("--json", action="store_true", dest="json_first", help="print one JSON document")
    parser.add_argument("--debug", action="store_true", dest="debug_first", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module_name in _SUBCOMMANDS:
        importlib.import_module(module_name).register(sub)
    parsers: list[argparse.ArgumentParser] = [parser, *sub.choices.values()]
    for each in parsers:
        if isinstance(each, _Parser):
            each.json_output = json_output
        if each is parser:
            continue
        # Central, so that every subcommand (whoever writes it) takes the same --debug and shows the same table.
        with contextlib.suppress(argparse.ArgumentError):  # a subcommand that defines its own --debug keeps it
            each.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        if each.epilog is None:
            each.epilog = EXIT_STATUS_HELP
    return parser


def _write_escaped(stream: IO[str], text: str) -> None:
    # Outside main()'s redirection (an error reported after it ends): the same display function, by hand.
    PrintableWriter(stream).write(text)


def _write_json_text(stream: IO[str], text: str) -> None:
    try:
        stream.write(text)
    except UnicodeEncodeError:
        # Characters outside ASCII occur only inside JSON strings, where \\uXXXX is the same character.
        stream.write("".join(ch if ord(ch) < 128 else json.dumps(ch)[1:-1] for ch in text))


# ------------------------------------------------------------------------------------------------------ main
def _flag_given(tokens: Sequence[str], flag: str) -> bool:
    # argparse accepts unique prefixes (--js for --json); a usage error must already know the output form.
    for token in tokens:
        if token == "--":
            return False
        if len(token) >= 3 and flag.startswith(token):
            return True
    return False


def _command_of(tokens: Sequence[str]) -> str | None:
    return next((t for t in tokens if not t.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trainguard`` command and return its exit status; see the module docstring for the codes.

    As argparse does, ``--help``, ``--version`` and a usage error in the arguments raise ``SystemExit`` (0, 0, 2)
    once their output is printed; every other outcome, an internal error included, is returned. With ``--json``
    stdout receives exactly one JSON document, whatever happens."""
    tokens = [str(t) for t in (sys.argv[1:] if argv is None else argv)]
    as_json = _flag_given(tokens, "--json")
    debug = _flag_given(tokens, "--debug")
    stdout = sys.stdout
    # JSON output is held until the command ends, so an error after partial output still leaves one document.
    buffer = io.StringIO()
    # Every text the command writes passes the one display function here, at the boundary, so no subcommand, no
    # argparse message and no warning can print a raw control character; --json output stays exact.
    target: TextIO = buffer if as_json else PrintableWriter(stdout)  # type: ignore[assignment]
    errors: TextIO = PrintableWriter(sys.stderr)  # type: ignore[assignment]
    with contextlib.redirect_stdout(target), contextlib.redirect_stderr(errors):
        status, error, parse_exit = _dispatch(tokens, as_json)
    if error is not None:
        return _report_error(error, as_json=as_json, debug=debug, command=_command_of(tokens), stdout=stdout)
    if as_json:
        text = buffer.getvalue() or _dumps({"ok": status == EXIT_OK}) + "\n"
        with contextlib.suppress(OSError):  # stdout closed by the reader (`| head`): nothing left to tell it
            _write_json_text(stdout, text)
    if parse_exit:
        raise SystemExit(status)
    return status


def _dispatch(tokens: list[str], as_json: bool) -> tuple[int, BaseException | None, bool]:
    """Parse and run; returns ``(status, the error that ended it or None, whether argparse exited)``."""
    try:
        parser = build_parser(json_output=as_json)
        try:
            args = parser.parse_args(tokens)
        except SystemExit as stop:  # --help, --version, or a usage error argparse has already printed
            return _exit_status(stop), None, True
        func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
        if func is None:
            if as_json:
                emit_json({"ok": False, "error": "UsageError", "what": "trainguard: no COMMAND given"})
            else:
                parser.print_help(sys.stderr)
            return EXIT_USAGE, None, False
        if getattr(args, "json_first", False):
            args.json = True
        try:
            return int(func(args)), None, False
        except SystemExit as stop:
            return _exit_status(stop), None, False
    except (Exception, KeyboardInterrupt) as err:
        return EXIT_ERROR, err, False


def _exit_status(stop: SystemExit) -> int:
    if stop.code is None:
        return EXIT_OK
    return stop.code if isinstance(stop.code, int) else EXIT_ERROR


def _one_line(text: str) -> str:
    line = " | ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 3] + "..."


def _file_of(err: OSError) -> str | None:
    if err.filename is None:
        return None
    name = os.fsdecode(err.filename) if isinstance(err.filename, (str, bytes, os.PathLike)) else str(err.filename)
    # A failed atomic write names its temporary file; the user knows the file it was to become.
    return display_text(name.split(TEMP_MARKER, 1)[0])


def _report_error(err: BaseException, *, as_json: bool, debug: bool, command: str | None, stdout: IO[str]) -> int:
    """Tell the user about ``err`` (one JSON document on stdout, or text on stderr) and return the exit status."""
    prefix = f"trainguard {command}" if command else "trainguard"
    document: dict[str, Any]
    if isinstance(err, KeyboardInterrupt):
        status, document = EXIT_INTERRUPTED, {"ok": False, "error": "Interrupted", "what": "interrupted"}
        text = f"{prefix}: interrupted"
    elif isinstance(err, TrainGuardError):
        # A planted FIFO or link the command refused is an I/O problem; any other finding is a failed check.
        status = EXIT_ERROR if isinstance(err, UnsafeFileError) else EXIT_FAILED
        document = {"ok": False, **err.to_dict()}
        text = f"{prefix}: {err}"
    elif isinstance(err, OSError):
        status = EXIT_ERROR
        what = display_text(err.strerror or str(err) or type(err).__name__)
        file = _file_of(err)
        if file is not None:
            what = f"{what}: {file}"
        next_step = (
            "Check that the path exists, is what the command expects, and that you may read it "
            "(and, for `trainguard manifest`, write in it)."
        )
        document = {"ok": False, "error": type(err).__name__, "what": what, "next_step": next_step}
        if file is not None:
            document["where"] = {"file": file}
        text = f"{prefix}: {printable(what)}"  # one line, even for a file name holding a newline
    else:
        status = EXIT_ERROR
        detail = _one_line(redact_text(f"{type(err).__name__}: {err}"))
        what = f"internal error in trainguard (a bug, not a problem with your files): {detail}"
        next_step = f"Please report it at {ISSUES_URL} with the output of the same command run with --debug."
        document = {
            "ok": False,
            "error": "InternalError",
            "exception": type(err).__name__,
            "what": what,
            "next_step": next_step,
        }
        text = f"{prefix}: {what}. {next_step}"
    if debug:
        trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        _write_escaped(sys.stderr, redact_text(trace))
    with contextlib.suppress(OSError):
        if as_json:
            _write_json_text(stdout, _dumps(document) + "\n")
        else:
            _write_escaped(sys.stderr, text + "\n")
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
