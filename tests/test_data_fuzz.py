"""Fuzzing the readers: random bytes and mutated JSON Lines give a report with errors, never an exception."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainguard.checks.data import DataReport, validate_data

from _rig import make_tokenizer

# No example database: it would write a .hypothesis folder into the repository.
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SUFFIXES = [".jsonl", ".json", ".csv", ".parquet", ".txt"]
GOOD = [
    {"prompt": "what is two plus two", "completion": "four"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"instruction": "add", "input": "2 and 2", "output": "4"},
    {"text": "the run resumed from the newest verified checkpoint"},
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
]
TOKENIZER = make_tokenizer()


@contextmanager
def written(data: bytes, suffix: str) -> Iterator[Path]:
    # hypothesis reruns the body many times: a fresh folder each time, not pytest's per-test tmp_path.
    folder = tempfile.mkdtemp(prefix="trainguard-fuzz-")
    try:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(data)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check(report: DataReport) -> None:
    """Whatever the input, a complete report comes back: it renders, it serialises, ok matches the errors."""
    assert isinstance(report, DataReport)
    assert report.ok == (not report.errors)
    json.loads(report.to_json())
    str(report)
    for issue in report.issues:
        assert issue.level in ("error", "warning") and issue.count >= 0


@FUZZ
@given(data=st.binary(max_size=3000), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_never_raise(data: bytes, suffix: str):
    with written(data, suffix) as path:
        check(validate_data(path))


def _jsonl(rows: list[Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


@st.composite
def mutated_jsonl(draw: st.DrawFn) -> bytes:
    data = bytearray(_jsonl(draw(st.lists(st.sampled_from(GOOD), min_size=1, max_size=12))))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "newline"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
        else:
            data[at:at] = b"\n"
    return bytes(data)


@FUZZ
@given(data=mutated_jsonl())
def test_mutated_json_lines_never_raise_even_with_a_tokenizer(data: bytes):
    with written(data, ".jsonl") as path:
        check(validate_data(path, tokenizer=TOKENIZER, max_length=16))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
FIELDS = st.sampled_from(
    [
        "prompt",
        "completion",
        "messages",
        "role",
        "content",
        "instruction",
        "input",
        "output",
        "text",
        "input_ids",
        "labels",
    ]
)
RECORDS = st.dictionaries(FIELDS, JSON_VALUES | st.lists(st.dictionaries(FIELDS, JSON_VALUES, max_size=3)), max_size=4)


@FUZZ
@given(rows=st.lists(RECORDS | JSON_VALUES, max_size=12), fmt=st.sampled_from(["auto", "chat", "tokenized"]))
def test_records_of_any_shape_give_a_report(rows: list[Any], fmt: str):
    check(validate_data(rows, tokenizer=TOKENIZER, max_length=8, format=fmt))


def test_an_unreadable_file_is_an_error_in_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "locked.jsonl"
    path.write_text('{"text": "x"}\n')
    path.chmod(0)
    if os.geteuid() == 0:
        # Root reads files whatever their mode (and CI runs as root): make opening this one file fail as it does
        # for anyone else, so the report's handling of it is tested everywhere.
        import trainguard.checks.data.parts as parts

        real_open = parts.open_read

        def refuse(target: Any, *args: Any, **kwargs: Any) -> Any:
            if Path(target) == path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
            return real_open(target, *args, **kwargs)

        monkeypatch.setattr(parts, "open_read", refuse)
    first = validate_data(path).errors[0]
    assert first.code == "unreadable_file" and first.file == str(path)
    assert first.message == f"cannot open the file: {os.strerror(errno.EACCES)}"
