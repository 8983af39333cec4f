"""One display function for every piece of human-readable text trainguard prints: :func:`printable`.

A file name, a data field, a lock holder's command line or a crash message is chosen by whoever could write the
folder. Printed raw, ``ESC [2J`` clears the screen, ``ESC ] 0;... BEL`` retitles the window, a carriage return
overwrites a ``FAILED`` line with ``verified``, a newline forges a whole line, and a bidi override (U+202E) shows
``exe.txt`` for ``txt.exe``. :func:`printable` shows every such character as a visible escape instead:

======================================================= ===================================================
what                                                    shown as
======================================================= ===================================================
tab, newline, carriage return                           ``\\t`` ``\\n`` ``\\r``
other C0 controls (U+0000-U+001F), DEL                  ``\\x1b``, ``\\x7f``, ...
a byte that is not UTF-8 (Python's U+DC80-U+DCFF)       ``\\xff`` (as :func:`~trainguard.safe_fs.display_name`)
C1 controls (U+0080-U+009F), bidi overrides and         ``\\u009b``, ``\\u202e``, ``\\u2066``, ``\\ud800``, ...
isolates, other lone surrogates, zero-width and other
format characters, line/paragraph separators, spaces
other than " ", unassigned and private-use code points
(everything ``str.isprintable`` rejects)
the same beyond U+FFFF                                  ``\\U000e0001``
======================================================= ===================================================

Backslash itself is left as it is, on purpose: the function is idempotent (``printable(printable(t)) ==
printable(t)`` for every ``t``), so it can be applied at every layer -- to a name, to a message holding names
already escaped (trainguard's own ``\\xff`` for undecodable bytes), and again to the whole line where the command
writes it -- without ever showing ``\\\\x1b``. The price: a name holding the four characters ``\\x1b`` looks like one
holding ESC; two names that differ in a dangerous character never look alike (on text without backslashes the
escaping is reversible), and ``--json`` output, which keeps every name exact, tells all of them apart.

``--json`` output never goes through this module: JSON strings escape control characters themselves.

Example::

    from trainguard.display import printable
    printable("ok\\rcheckpoint-1 verified.bin")   # 'ok\\\\rcheckpoint-1 verified.bin' (a visible \\r)
    printable("line one\\nline two", keep_newlines=True)   # unchanged: the caller's own line breaks
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from typing import IO, Any

__all__ = ["PrintableWriter", "printable", "printable_tree", "terminal_of"]

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(ch: str) -> str:
    code = ord(ch)
    named = _NAMED.get(ch)
    if named is not None:
        return named
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte (surrogateescape), shown as the byte it was
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str | os.PathLike[str], *, keep_newlines: bool = False) -> str:
    """``text`` with every character a terminal could act on shown as a visible escape (the table above).

    ``keep_newlines=True`` keeps ``"\\n"`` as a line break: for whole output whose lines the caller wrote itself
    (escape each untrusted piece in it first, so a newline inside a name is still shown as ``\\n``). Never raises
    on a ``str`` (a path is shown by its name); clean text is returned unchanged (the same object), at the cost of
    one ``str.isprintable`` scan.
    """
    if not isinstance(text, str):
        text = os.fsdecode(text) if isinstance(text, os.PathLike) else str(text)
    if text.isprintable():
        return text
    if keep_newlines:
        return "\n".join(printable(line) for line in text.split("\n"))
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def map_strings(value: Any, convert: Callable[[str], str]) -> Any:
    """``value`` (a JSON-like tree) with every string, path and key in it passed through ``convert``; numbers,
    booleans and ``None`` are left as they are, tuples become lists."""
    if isinstance(value, str):
        return convert(value)
    if isinstance(value, os.PathLike):
        return convert(os.fsdecode(value))
    if isinstance(value, dict):
        return {convert(k) if isinstance(k, str) else k: map_strings(v, convert) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [map_strings(v, convert) for v in value]
    return value


def printable_tree(value: Any) -> Any:
    """``value`` (a JSON-like tree) with every string, path and key in it passed through :func:`printable`.

    For a command that formats a whole report for the terminal: each field then fits on its line, whatever the
    files it came from held."""
    return map_strings(value, printable)


# ------------------------------------------------------------------------------------------- the output boundary
class PrintableWriter(io.TextIOBase):
    """A text stream that passes everything written to it through :func:`printable` (line breaks kept).

    The ``trainguard`` command writes its text output and its messages through one of these, so no code path can
    print a raw control character; text the stream underneath cannot encode is written ``\\\\u``-escaped instead of
    raising mid-report. A renderer that escapes its own content and must emit styling (``rich``) writes to
    :func:`terminal_of` instead.

    Example::

        import io
        screen = io.StringIO()
        PrintableWriter(screen).write("\\x1b[2J done\\n")
        assert screen.getvalue() == "\\\\x1b[2J done\\n"   # shown as text; the screen is not cleared
    """

    def __init__(self, stream: IO[str]) -> None:
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        shown = printable(text, keep_newlines=True)
        try:
            self.stream.write(shown)
        except UnicodeEncodeError:  # a stream that is not UTF-8 (PYTHONIOENCODING=ascii, a latin-1 locale)
            encoding = getattr(self.stream, "encoding", None) or "ascii"
            self.stream.write(shown.encode(encoding, "backslashreplace").decode(encoding))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:  # validate-data draws a rich table on a terminal
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", None) or "utf-8"


def terminal_of(stream: IO[str]) -> IO[str]:
    """The stream under a :class:`PrintableWriter` (``stream`` itself otherwise).

    Only for a renderer whose every untrusted piece already went through :func:`printable` and that must write
    escape sequences of its own: ``rich``'s colours and its progress bar's cursor movements."""
    return stream.stream if isinstance(stream, PrintableWriter) else stream


# --------------------------------------------------------------------------------------------------- logging
class _PrintableRecords(logging.Filter):
    """Makes each record of the ``trainguard`` logger printable before any handler formats it.

    A record whose text is clean is left untouched (its ``msg`` and ``args`` stay as logged, so log aggregators
    still group by the format string). Otherwise each string or path argument is escaped whole (a newline in a
    file name cannot forge a log line) and then the message, keeping the line breaks trainguard wrote."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            args = record.args
            if isinstance(args, tuple):
                shown_args = tuple(_shown_arg(a) for a in args)
                if any(shown is not arg for shown, arg in zip(shown_args, args, strict=True)):
                    record.args = shown_args
            message = record.getMessage()
            shown = printable(message, keep_newlines=True)
            if shown != message:
                record.msg, record.args = shown, None
        except Exception:  # a bad format string: left for the handler to report, as logging always does
            pass
        return True


def _shown_arg(value: object) -> object:
    # Strings and paths (names, mostly) are escaped whole; clean ones, and every other argument, stay the same object.
    if isinstance(value, (str, os.PathLike)):
        text = os.fsdecode(value)
        if not text.isprintable():
            return printable(text)
    return value


def _install_log_filter() -> None:
    logger = logging.getLogger("trainguard")
    if not any(isinstance(f, _PrintableRecords) for f in logger.filters):
        logger.addFilter(_PrintableRecords())


_install_log_filter()
