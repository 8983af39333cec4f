"""The one display function (``trainguard.display.printable``) on any text: what it shows can never drive a
terminal, it never raises, it is idempotent, clean text passes unchanged, and two names that differ in a dangerous
character never look alike. The properties are checked with hypothesis over all of Unicode, lone surrogates
included, and over the characters crafted names use."""

from __future__ import annotations

import io
import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainguard.display import PrintableWriter, printable, printable_tree, terminal_of

# No example database (it would write a .hypothesis folder into the repository); the function is pure and fast.
FUZZ = settings(max_examples=300, deadline=timedelta(seconds=2), database=None)

# Every code point, lone surrogates (Python's form of undecodable bytes) included.
ANY_CHAR = st.characters(exclude_categories=())
# What crafted names are made of: controls, DEL, C1, bidi overrides and isolates, surrogates, zero-width and
# separator characters, a backslash, and ordinary letters between them.
DANGEROUS = st.sampled_from(
    [chr(c) for c in range(0x20)]
    + ["\x7f", "\x85", "\x9b", "\x9d", "\u00a0", "\u00ad", "\u200b", "\u200d", "\u2028", "\u2029", "\ufeff"]
    + [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
    + ["\ud800", "\udc80", "\udcff", "\udfff", "\U000e0001", "\U0010fffd"]
)
CRAFTED = st.text(st.one_of(DANGEROUS, st.sampled_from("abc.-/ []0;x")), max_size=40)
TEXT = st.one_of(st.text(ANY_CHAR, max_size=60), CRAFTED)

# Everything the issue names: C0, DEL, C1, bidi overrides and isolates, lone surrogates.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _unescape(shown: str) -> str:
    """The inverse of :func:`printable` on text that held no backslash: proof that no information is lost."""
    named = {"t": "\t", "n": "\n", "r": "\r"}

    def one(match: re.Match[str]) -> str:
        name, byte, bmp, wide = match.groups()
        if name:
            return named[name]
        if byte:
            code = int(byte, 16)
            return chr(code) if code < 0x80 else chr(0xDC00 + code)  # >= 0x80: an undecodable byte
        return chr(int(bmp or wide, 16))

    return re.sub(r"\\(?:([tnr])|x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8}))", one, shown)


@FUZZ
@given(TEXT)
def test_the_output_of_any_text_is_printable_and_holds_no_control_bidi_or_surrogate(text: str) -> None:
    shown = printable(text)
    assert shown.isprintable()
    assert not _FORBIDDEN.search(shown)
    shown.encode("utf-8")  # strict: no lone surrogate is left for a stream to choke on


@FUZZ
@given(TEXT)
def test_printable_is_idempotent_and_leaves_clean_text_unchanged(text: str) -> None:
    shown = printable(text)
    assert printable(shown) == shown  # safe to apply to a name, then to the line holding it
    if text.isprintable():
        assert shown is text  # clean text: no copy, no change


@FUZZ
@given(TEXT.filter(lambda t: "\\" not in t))
def test_no_information_is_lost_so_distinct_names_never_look_alike(text: str) -> None:
    assert _unescape(printable(text)) == text


@FUZZ
@given(CRAFTED.filter(lambda t: "\\" not in t), CRAFTED.filter(lambda t: "\\" not in t))
def test_two_distinct_crafted_names_are_shown_differently(a: str, b: str) -> None:
    if a != b:
        assert printable(a) != printable(b)


@FUZZ
@given(st.lists(TEXT, max_size=5))
def test_keep_newlines_keeps_the_callers_line_breaks_and_escapes_everything_else(lines: list[str]) -> None:
    text = "\n".join(lines)
    shown = printable(text, keep_newlines=True)
    assert shown.split("\n") == [printable(line) for line in text.split("\n")]
    assert all(line.isprintable() for line in shown.split("\n"))


@FUZZ
@given(TEXT, st.lists(st.integers(min_value=0, max_value=60), max_size=6))
def test_the_writer_shows_the_same_text_however_it_is_split_into_writes(text: str, cuts: list[int]) -> None:
    out = io.StringIO()
    writer = PrintableWriter(out)
    start = 0
    for cut in [*sorted(cuts), len(text)]:
        writer.write(text[start:cut])
        start = max(start, cut)
    assert out.getvalue() == printable(text, keep_newlines=True)
    assert terminal_of(writer) is out and terminal_of(out) is out


@FUZZ
@given(
    st.recursive(
        TEXT | st.integers() | st.booleans() | st.none(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
        max_leaves=10,
    )
)
def test_every_string_of_a_report_tree_is_made_printable_and_nothing_else_changes(tree: object) -> None:
    shown = printable_tree(tree)

    def walk(original: object, result: object) -> None:
        if isinstance(original, str):
            assert result == printable(original)
        elif isinstance(original, dict):
            if len({printable(k) for k in original}) < len(original):
                return  # two keys only a literal backslash escape apart merge: see the backslash test below
            assert isinstance(result, dict) and list(result) == [printable(k) for k in original]
            for v, w in zip(original.values(), result.values(), strict=True):
                walk(v, w)
        elif isinstance(original, list):
            assert isinstance(result, list) and len(result) == len(original)
            for v, w in zip(original, result, strict=True):
                walk(v, w)
        else:
            assert result is original

    walk(tree, shown)


# ------------------------------------------------------------------------------------------- the escapes shown
@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("ok\rcheckpoint-1 verified.bin", "ok\\rcheckpoint-1 verified.bin"),
        ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
        ("\x1b[2J", "\\x1b[2J"),
        ("a\nb\tc", "a\\nb\\tc"),
        ("\x00\x7f", "\\x00\\x7f"),
        ("\x9b2J", "\\u009b2J"),  # a C1 CSI: one character, same effect as ESC [
        ("txt.\u202eexe", "txt.\\u202eexe"),
        ("\u2066a\u2069", "\\u2066a\\u2069"),
        ("runs-\udcff", "runs-\\xff"),  # an undecodable byte, as display_name shows it
        ("te\ud800xt", "te\\ud800xt"),
        ("tag\U000e0001", "tag\\U000e0001"),
        ("café ✓ 日本", "café ✓ 日本"),
        ("C:\\dir", "C:\\dir"),
    ],
)
def test_each_dangerous_character_is_shown_as_its_escape(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_a_path_is_shown_by_its_name() -> None:
    assert printable(Path("a\x1b[2J")) == "a\\x1b[2J"


def test_backslash_is_left_as_is_so_only_json_tells_a_literal_escape_from_the_real_character() -> None:
    # The decision (see trainguard.display): idempotence over full injectivity. A name holding the four characters
    # "\x1b" looks like one holding ESC in text output; --json keeps both exact and tells them apart.
    literal, real = "a\\x1bb", "a\x1bb"
    assert printable(literal) == printable(real) == "a\\x1bb"
    assert json.dumps(literal) != json.dumps(real)
    assert printable(printable(real)) == printable(real)  # never shown as a\\x1bb, however many layers apply it
