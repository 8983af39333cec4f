"""Fuzzing the DCP ``.metadata`` reader: random bytes, damaged real metadata and crafted pickles naming any global
give a DcpIndex or a reason string, never an exception, and never call anything a file names.

A sentinel module registered under ``torch.distributed.checkpoint`` records every call: the reader's old prefix rule
admitted it, so the property "nothing named by the file runs" fails on c3327cb.
"""

from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from trainguard.checks.checkpoint import layouts

from _fuzz import fuzz_settings

FUZZ = fuzz_settings(80)
pytestmark = pytest.mark.timeout(600)

SENTINEL = "torch.distributed.checkpoint._trainguard_fuzz_sentinel"
CALLS: list[tuple] = []


def _record(*args: object) -> None:
    CALLS.append(args)


@pytest.fixture(autouse=True, scope="module")
def _sentinel_module():
    import torch.distributed.checkpoint.filesystem as filesystem

    module = types.ModuleType(SENTINEL)
    module.boom = _record  # type: ignore[attr-defined]
    sys.modules[SENTINEL] = module
    filesystem._trainguard_fuzz_boom = _record  # type: ignore[attr-defined]  # reachable by a dotted name
    yield
    del sys.modules[SENTINEL]
    del filesystem._trainguard_fuzz_boom  # type: ignore[attr-defined]


def _real_metadata() -> bytes:
    import warnings

    import torch.distributed.checkpoint as dcp

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.zeros(4), "b": torch.ones(2, dtype=torch.bfloat16), "n": 3}, checkpoint_id=folder)
        return (Path(folder) / ".metadata").read_bytes()


REAL = _real_metadata()

GLOBALS = st.sampled_from(
    [
        (SENTINEL, "boom"),
        ("torch.distributed.checkpoint.filesystem", "_trainguard_fuzz_boom"),
        ("torch.distributed.checkpoint.filesystem", "os.system"),
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "Metadata.__init__"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch", "Size"),
        ("torch", "float32"),
        ("torch", "load"),
        ("torch", "Size.__new__"),
        ("builtins", "eval"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "Path.unlink"),
        ("os", "system"),
    ]
) | st.tuples(st.text(max_size=40), st.text(max_size=40))


def _unicode(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + len(raw).to_bytes(4, "little") + raw  # BINUNICODE


def _call(module: str, name: str, arg: str) -> bytes:
    return _unicode(module) + _unicode(name) + b"\x93" + _unicode(arg) + b"\x85R"


def _read(tmp: Path, data: bytes) -> object:
    (tmp / ".metadata").write_bytes(data)
    return layouts.read_dcp_metadata(tmp)


def _check(result: object) -> None:
    assert isinstance(result, (layouts.DcpIndex, str)), result
    assert CALLS == [], f"the reader called what the file named: {CALLS}"


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_give_a_reason_or_an_index(data: bytes):
    with tempfile.TemporaryDirectory() as folder:
        _check(_read(Path(folder), data))


@FUZZ
@given(st.data())
def test_damaged_real_metadata_gives_a_reason_or_an_index(data: st.DataObject):
    raw = bytearray(REAL)
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    with tempfile.TemporaryDirectory() as folder:
        _check(_read(Path(folder), bytes(raw[:cut])))


@FUZZ
@given(st.lists(st.tuples(GLOBALS, st.text(max_size=20)), min_size=1, max_size=4), st.booleans())
def test_a_crafted_pickle_naming_any_global_runs_nothing(calls: list, nested: bool):
    body = b"".join(_call(module, name, arg) for (module, name), arg in calls)
    # Calls one after another (each result left on the stack), optionally built inside a dict as metadata would be.
    data = b"\x80\x04" + (b"}" + _unicode("state_dict_metadata") if nested else b"") + body
    data += (b"s" if nested and len(calls) == 1 else b"") + b"."
    with tempfile.TemporaryDirectory() as folder:
        _check(_read(Path(folder), data))


def test_the_sentinel_is_reachable_by_a_plain_unpickler():
    # Without this the properties above could pass by the sentinel never being reachable at all.
    import pickle

    pickle.loads(b"\x80\x04" + _call(SENTINEL, "boom", "x") + b".")
    pickle.loads(b"\x80\x04" + _call("torch.distributed.checkpoint", "filesystem._trainguard_fuzz_boom", "y") + b".")
    assert CALLS == [("x",), ("y",)]
    CALLS.clear()
