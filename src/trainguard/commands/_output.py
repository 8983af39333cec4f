"""What every subcommand shares with the ``trainguard`` command: the exit statuses and the ``--json`` output.

It lives below :mod:`trainguard.cli` so that a subcommand never imports the CLI that imports it (arrows point down
only); :mod:`trainguard.cli` re-exports these names.

Example::

    from trainguard.commands._output import EXIT_OK, emit_json
    emit_json({"ok": True}); status = EXIT_OK
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ..safe_fs import display_json, display_text

__all__ = ["EXIT_ERROR", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "dumps", "emit_json"]

EXIT_OK = 0
EXIT_FAILED = 1
#: Usage, I/O or internal error.
EXIT_ERROR = 2
EXIT_USAGE = EXIT_ERROR
EXIT_INTERRUPTED = 130


def emit_json(document: Any) -> None:
    """Print ``document`` as JSON on stdout (the ``--json`` output of every subcommand).

    Every string in it is made printable first (:func:`~trainguard.safe_fs.display_json`): a file name that is not
    UTF-8 or a lone surrogate from a data file is shown escaped instead of failing the whole document."""
    sys.stdout.write(dumps(document) + "\n")


def dumps(document: Any) -> str:
    """``document`` as the indented, printable JSON text :func:`emit_json` writes."""
    return json.dumps(display_json(document), indent=2, ensure_ascii=False, default=lambda o: display_text(str(o)))
