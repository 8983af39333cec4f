"""Every ``pip install`` line a user can copy from the docs (README.md, docs/*.md, examples/*), parsed into what it
installs. tests/test_docs_install_lines.py holds each line to a form that works before trainguard's first release;
``.ci/run``'s packaging stage asks this module which extras the docs install and installs the built wheel with them:

    python tests/_install_lines.py extras --except axolotl llamafactory dev     # prints e.g. "all,peft,trl"
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# A local install of trainguard itself: the clone (`.`, `./`, `-e .`) or a wheel built from it, with optional extras.
LOCAL = re.compile(r"^(?P<path>\.|\./|dist/[^\[\]]+\.whl)(?:\[(?P<extras>[A-Za-z0-9_,\-]+)\])?$")
# pip options that take a value (the value is not a requirement), and `-e`, whose value is one.
VALUED = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url", "-f", "--find-links"}
VALUED |= {"-t", "--target", "--prefix", "--root", "--report", "--progress-bar"}


@dataclass(frozen=True)
class Requirement:
    """One thing a docs line asks pip for: ``text`` as written; ``path`` for a local install of trainguard (the clone
    or a built wheel) with its ``extras``, else ``None`` (a package from the index, e.g. ``torch==2.13.0``)."""

    text: str
    path: str | None
    extras: tuple[str, ...]


@dataclass(frozen=True)
class InstallLine:
    """A ``pip install`` command in the docs: where (``file``, 1-based ``line``), the command, what it installs."""

    file: str
    line: int
    command: str
    requirements: tuple[Requirement, ...]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def doc_files() -> list[Path]:
    """The files users read and copy commands from."""
    examples = sorted(p for p in (REPO_ROOT / "examples").iterdir() if p.is_file())
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")), *examples]


def _commands(text: str) -> list[str]:
    """The ``pip install`` commands in one line of a doc: inline ones end at their closing backtick; in a code block
    the command runs to a ``#`` comment, ``&&``, ``;`` or ``|``."""
    found = []
    for match in re.finditer(r"pip install", text):
        start = match.start()
        before = text[:start]
        rest = text[start:]
        if before.count("`") % 2 == 1:  # inside inline code: up to the closing backtick
            rest = rest.split("`", 1)[0]
        rest = re.split(r"&&|;|\|", rest, maxsplit=1)[0]
        found.append(rest)
    return found


def _requirement(arg: str) -> Requirement:
    local = LOCAL.match(arg)
    if local:
        extras = tuple(e for e in (local.group("extras") or "").split(",") if e)
        return Requirement(arg, local.group("path"), extras)
    return Requirement(arg, None, ())


def parse(command: str) -> tuple[Requirement, ...]:
    """What ``command`` (starting at ``pip install``) asks pip for, options and their values left out."""
    words = shlex.split(command, comments=True)[2:]  # past "pip install"
    requirements, skip = [], False
    for word in words:
        if skip:
            skip = False
            continue
        if word in VALUED:
            skip = True
            continue
        if word.startswith("-"):  # a flag; -e/--editable too, whose value (the next word) is a requirement
            continue
        requirements.append(_requirement(word))
    return tuple(requirements)


def install_lines() -> list[InstallLine]:
    """Every ``pip install`` line of the docs, in file order."""
    lines = []
    for path in doc_files():
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for command in _commands(text):
                rel = path.relative_to(REPO_ROOT).as_posix()
                lines.append(InstallLine(rel, number, command.strip(), parse(command)))
    return lines


def docs_extras() -> set[str]:
    """Every extra of trainguard that some docs line installs."""
    return {e for line in install_lines() for r in line.requirements if r.path is not None for e in r.extras}


def main(argv: list[str]) -> int:
    if argv[:1] != ["extras"]:
        print("usage: python tests/_install_lines.py extras [--except EXTRA ...]", file=sys.stderr)
        return 2
    left_out = set(argv[2:]) if argv[1:2] == ["--except"] else set()
    print(",".join(sorted(docs_extras() - left_out)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
