"""One policy for every file trainguard reads or writes in a user's folder.

Output folders are often on shared, group-writable storage: a file trainguard expects may be a FIFO, a device, a link
planted by someone else, or a crafted file. This module is the only way the rest of trainguard touches such paths:

- **Regular files only.** Opens use ``O_NONBLOCK`` (a FIFO never blocks the open) and ``fstat`` the descriptor: a
  FIFO, socket, device or folder is refused with :class:`~trainguard.errors.UnsafeFileError` naming the path and
  what it is, before one byte is read or written.
- **No writes through links.** Appends and in-place writes use ``O_NOFOLLOW``; folders trainguard creates inside
  ``output_dir`` (archive, quarantine) must be real folders (:func:`ensure_dir`), so nothing is moved out of
  ``output_dir`` through a planted link. Whole-file writes go through :mod:`trainguard.atomic`, which renames over
  the path (replacing a link, never writing through it).
- **Bounded reads and parses.** Every read has a size limit; JSON is parsed with finite numbers only (no
  ``NaN``/``Infinity``, no ``1e999``) and a nesting limit, and any failure is a
  :class:`~trainguard.errors.MalformedFileError` naming the file, never a ``RecursionError`` or ``OverflowError``.
- **Names that are not UTF-8** are shown escaped (:func:`display_name`), never crash a report.

Example::

    from trainguard.safe_fs import load_json
    state = load_json("out/checkpoint-50/trainer_state.json")
    state["global_step"]   # 50
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .display import map_strings
from .errors import MalformedFileError, UnsafeFileError

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "describe_kind",
    "display_json",
    "display_name",
    "display_text",
    "ensure_dir",
    "iter_files",
    "load_json",
    "nesting_depth",
    "open_append",
    "open_read",
    "open_write",
    "parse_json",
    "read_bytes",
    "read_tail_lines",
    "read_text",
    "remove_tree",
    "walk_tree",
]

PathLike = str | os.PathLike[str]

#: JSON state files trainguard reads (manifests, trainer_state.json, records) are far below this.
MAX_JSON_BYTES = 256 << 20
#: The deepest JSON trainguard or the Trainer writes is under 10 levels; 64 leaves room and stops a crafted one.
MAX_JSON_DEPTH = 64

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def describe_kind(mode: int) -> str:
    """What a file is, in words, from its ``st_mode``."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def walk_tree(top: PathLike) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk`` without recursion: ``(folder, subfolders, other entries)`` top-down, each list sorted.

    A crafted checkpoint can nest folders thousands deep (still under ``PATH_MAX``); ``os.walk`` and
    ``Path.rglob`` recurse once a level before Python 3.12 and die with ``RecursionError``. Links to folders are
    never followed (they are listed with the other entries), folders that vanish or cannot be listed are passed
    over, and removing a name from ``subfolders`` prunes it, as with ``os.walk``.

    Example::

        for folder, subfolders, files in walk_tree("out/checkpoint-50"):
            ...
    """
    todo = [Path(top)]
    while todo:
        folder = todo.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:
            continue  # removed while we walked, or not ours to read
        subfolders: list[str] = []
        others: list[str] = []
        for entry in entries:
            try:
                is_folder = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_folder = False
            (subfolders if is_folder else others).append(entry.name)
        subfolders.sort()
        others.sort()
        yield folder, subfolders, others
        todo.extend(folder / name for name in reversed(subfolders))


def iter_files(top: PathLike) -> Iterator[Path]:
    """Every entry under ``top`` that is not a folder (regular files, links, special files), at any depth, without
    recursion (:func:`walk_tree`); callers still check what each one is before opening it."""
    for folder, _subfolders, others in walk_tree(top):
        for name in others:
            yield folder / name


def remove_tree(path: PathLike) -> None:
    """``shutil.rmtree(path, ignore_errors=True)`` that also removes a tree nested deeper than the recursion limit.

    ``shutil.rmtree`` (its link-safe, descriptor-based walk) is used first; it recurses once a level before Python
    3.12, so a planted 1,500-deep folder would end a rotation with ``RecursionError``. What it left is then removed
    bottom-up from :func:`walk_tree` (links are removed, never followed).
    """
    try:
        shutil.rmtree(path, ignore_errors=True)
        return
    except RecursionError:
        pass
    folders = [folder for folder, _subfolders, _others in walk_tree(path)]
    for folder in reversed(folders):  # deepest first: walk_tree yields parents before their children
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                with contextlib.suppress(OSError):
                    if not os.path.isdir(folder / name) or os.path.islink(folder / name):
                        os.unlink(folder / name)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def display_name(name: str | os.PathLike[str]) -> str:
    """A path as text that is always printable and JSON-safe: bytes that are not UTF-8 (kept by Python as lone
    surrogates) are shown as ``\\xNN``."""
    return display_text(os.fspath(name))


def _unsafe(path: PathLike, what: str, *, action: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"trainguard will not {action} {display_name(path)}: it is {what}, not a regular file trainguard wrote",
        where={"file": display_name(path)},
    )


def _open(path: PathLike, flags: int, mode: int, *, action: str) -> int:
    try:
        fd = os.open(os.fspath(path), flags | _CLOEXEC | _NONBLOCK, mode)
    except OSError as err:
        if err.errno == errno.ELOOP and flags & _NOFOLLOW:
            raise _unsafe(path, "a symbolic link", action=action) from None
        if err.errno == errno.ENXIO:  # a FIFO opened for writing with no reader
            raise _unsafe(path, "a FIFO (named pipe)", action=action) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _unsafe(path, describe_kind(st.st_mode), action=action)
        if _NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_read(path: PathLike, *, follow: bool = True) -> int:
    """A read-only descriptor of ``path``, a regular file (a FIFO, device or socket is refused without blocking).

    ``follow=False`` also refuses a symbolic link. Raises ``FileNotFoundError`` as ``open`` does."""
    return _open(path, os.O_RDONLY | (0 if follow else _NOFOLLOW), 0, action="read")


def open_append(path: PathLike, *, mode: int = 0o666) -> int:
    """An ``O_APPEND`` descriptor of ``path`` (created with ``mode`` if missing), never through a link."""
    return _open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | _NOFOLLOW, mode, action="append to")


def open_write(path: PathLike, *, mode: int = 0o600, truncate: bool = True) -> int:
    """A read-write descriptor of ``path`` (created with ``mode`` if missing), never through a link.

    With ``truncate`` the file is emptied once it is known to be a regular file trainguard may write; the mode of a
    file that already existed is narrowed to ``mode`` (it may hold a command line)."""
    fd = _open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, mode, action="write")
    try:
        if truncate:
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):  # not the owner: the existing mode stays
            if stat.S_IMODE(os.fstat(fd).st_mode) & ~mode:
                os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: PathLike, *, limit: int, follow: bool = True) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes (:class:`MalformedFileError` if larger)."""
    fd = open_read(path, follow=follow)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise MalformedFileError(
            f"{display_name(path)} is larger than the {limit:,} bytes trainguard reads from such a file",
            where={"file": display_name(path)},
        )
    return data


def read_tail_lines(path: PathLike, *, limit: int, follow: bool = True) -> list[str]:
    """The lines of an append-only log (a regular file), only from its last ``limit`` bytes: a line cut by that
    bound is dropped. Bytes that are not UTF-8 are replaced (one bad line must not hide the others)."""
    fd = open_read(path, follow=follow)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            fh.seek(size - limit)
            fh.readline()  # cut mid-line: the first line read is partial
        data = fh.read(limit)
    return data.decode("utf-8", errors="replace").split("\n")


def read_text(path: PathLike, *, limit: int = MAX_JSON_BYTES, follow: bool = True) -> str:
    """A UTF-8 text file, bounded like :func:`read_bytes`; bytes that are not UTF-8 are a
    :class:`MalformedFileError` giving the byte offset."""
    data = read_bytes(path, limit=limit, follow=follow)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MalformedFileError(
            f"{display_name(path)} is not UTF-8 text (byte {err.start})",
            where={"file": display_name(path)},
        ) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range")
    return value


def nesting_depth(value: Any, limit: int) -> int:
    """How deeply lists and mappings nest in ``value`` (parsed JSON or TOML, possibly crafted), counted without
    recursion; counting stops as soon as it passes ``limit``."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        node, level = todo.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            if deepest > limit:
                return deepest
            children = node.values() if isinstance(node, dict) else node
            # only containers are queued: a manifest of 20k files holds 80k leaves (#28)
            todo.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json(data: str | bytes, *, source: PathLike | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON with finite numbers only and at most ``max_depth`` levels of nesting.

    Any failure is a :class:`MalformedFileError` naming ``source`` (and the line, where the parser knows it)."""
    where: dict[str, Any] = {"file": display_name(source)}
    try:
        value = json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as err:
        where["line"] = err.lineno
        raise MalformedFileError(f"{display_name(source)} is not valid JSON: {err.msg}", where=where) from None
    except RecursionError:
        raise MalformedFileError(
            f"{display_name(source)} nests JSON deeper than trainguard reads", where=where
        ) from None
    except (ValueError, OverflowError, UnicodeDecodeError) as err:
        raise MalformedFileError(f"{display_name(source)} is not valid JSON: {err}", where=where) from None
    if nesting_depth(value, max_depth) > max_depth:
        raise MalformedFileError(
            f"{display_name(source)} nests JSON deeper than {max_depth} levels (a crafted or corrupted file)",
            where=where,
        )
    return value


def load_json(path: PathLike, *, limit: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Read and parse a JSON file under this module's policy (regular file, bounded, finite, shallow)."""
    return parse_json(read_bytes(path, limit=limit), source=path, max_depth=max_depth)


def ensure_dir(path: PathLike, *, inside: PathLike | None = None) -> Path:
    """Create ``path`` (and its parents) if missing and make sure it is a real folder, not a link or a file planted
    in its place; with ``inside``, also that it resolves to a place under ``inside``. Returns the path."""
    folder = Path(path)
    if not os.path.lexists(folder):
        folder.mkdir(parents=True, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise _unsafe(folder, describe_kind(st.st_mode), action="use the folder")
    if inside is not None:
        root = Path(inside).resolve()
        if not folder.resolve().is_relative_to(root):
            raise UnsafeFileError(
                f"trainguard will not use the folder {display_name(folder)}: it leads outside {display_name(root)}",
                where={"file": display_name(folder)},
            )
    return folder


def display_text(text: str) -> str:
    """Any text as printable, JSON-safe UTF-8: what Python holds as lone surrogates is shown escaped.

    Undecodable bytes that Python keeps as U+DC80..U+DCFF (a file name, a command-line argument) are shown as
    ``\\xNN``, as :func:`display_name` shows them; any other lone surrogate (a ``"\\ud800"`` escape in a JSON data
    file, which ``json.loads`` accepts) as ``\\uXXXX``. Text that is valid UTF-8 is returned unchanged.

    Example::

        from trainguard.safe_fs import display_text
        display_text("a\\ud800b")   # 'a\\\\ud800b'
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def display_json(value: Any) -> Any:
    """A JSON-ready value with every string and path in it (keys too) passed through :func:`display_text`, so
    ``json.dumps(..., ensure_ascii=False)`` of it always encodes as UTF-8. Other values are left as they are."""
    return map_strings(value, display_text)
