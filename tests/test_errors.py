"""Every error is a TrainGuardError that says what, where and what next, and survives pickling."""

from __future__ import annotations

import json
import pickle

import pytest

import trainguard
from trainguard import errors

SUBCLASSES = [
    "RunLockedError",
    "PreflightError",
    "DatasetMismatchError",
    "LoraConfigMismatchError",
    "CheckpointIntegrityError",
    "CheckpointNotFoundError",
    "CheckpointIncompleteError",
    "NonFiniteError",
    "HangError",
    "DataValidationError",
    "UnsafeFileError",
    "MalformedFileError",
    "WebhookConfigError",
]


@pytest.mark.parametrize("name", SUBCLASSES)
def test_every_design_error_is_importable_from_package_and_errors_module(name):
    cls = getattr(trainguard, name)
    assert cls is getattr(errors, name)
    assert issubclass(cls, trainguard.TrainGuardError)
    assert cls.default_next_step  # each subclass says what to do next by default


@pytest.mark.parametrize("name", SUBCLASSES)
def test_message_names_what_where_and_next_step(name):
    cls = getattr(errors, name)
    err = cls(
        "model.safetensors changed since it was saved",
        where={"rank": 1, "file": "out/checkpoint-50/model.safetensors", "step": 50, "line": 3, "field": "r"},
    )
    text = str(err)
    assert text.splitlines()[0] == "model.safetensors changed since it was saved"
    # locations render in a fixed, readable order whatever order they were given in
    assert "where: file=out/checkpoint-50/model.safetensors, line=3, field=r, step=50, rank=1" in text
    assert "next: " + cls.default_next_step in text


def test_raise_site_can_override_next_step_and_attach_evidence():
    err = errors.DatasetMismatchError(
        "the checkpoint was trained on other data",
        where={"step": 50},
        next_step="call trainguard.start_fresh(trainer)",
        evidence={"checkpoint": "aaa", "current": "bbb", "values": {3, 1, 2}},
    )
    assert err.next_step == "call trainguard.start_fresh(trainer)"
    assert "next: call trainguard.start_fresh(trainer)" in str(err)
    doc = err.to_dict()
    assert doc["error"] == "DatasetMismatchError"
    assert doc["evidence"]["values"] == [1, 2, 3]
    json.dumps(doc)  # JSON-ready for --json output and alert evidence


def test_errors_survive_pickling_with_their_fields():
    err = errors.NonFiniteError("loss is nan", where={"step": 7, "rank": 1}, evidence={"value": "nan"})
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is errors.NonFiniteError
    assert (clone.what, clone.where, clone.next_step, clone.evidence) == (
        err.what,
        err.where,
        err.next_step,
        err.evidence,
    )
    assert str(clone) == str(err)


def test_catching_the_base_class_catches_every_trainguard_error():
    with pytest.raises(trainguard.TrainGuardError):
        raise errors.HangError("no progress for 600 s", where={"step": 10})


def test_a_message_quoting_a_hostile_name_is_printable_lines_and_the_fields_stay_exact():
    name = "out/\x1b]0;pwned\x07ok\r\x1b[2J\nfake: verified\u202e.bin"
    err = errors.CheckpointIntegrityError(f"{name} changed", where={"file": name, "step": 5}, next_step="Look\x1b[2J.")
    lines = str(err).split("\n")
    assert len(lines) == 3  # what, where, next: a newline in the name forged no line
    assert all(line.isprintable() for line in lines)
    assert lines[0] == "out/\\x1b]0;pwned\\x07ok\\r\\x1b[2J\\nfake: verified\\u202e.bin changed"
    assert lines[1] == "  where: file=" + lines[0].removesuffix(" changed") + ", step=5"
    assert lines[2] == "  next: Look\\x1b[2J."
    assert err.what == f"{name} changed" and err.to_dict()["where"]["file"] == name  # exact for code and JSON


def test_a_missing_checkpoint_is_both_a_checkpoint_integrity_error_and_the_value_error_the_trainer_raises():
    err = errors.CheckpointNotFoundError("the checkpoint out/chekpoint-5 does not exist", where={"file": "out"})
    assert isinstance(err, errors.CheckpointIntegrityError) and isinstance(err, ValueError)
    assert str(err).startswith("the checkpoint out/chekpoint-5 does not exist\n") and "typo" in err.next_step
    clone = pickle.loads(pickle.dumps(err))  # it crosses ranks by broadcast_object
    assert type(clone) is errors.CheckpointNotFoundError and str(clone) == str(err)
    with pytest.raises(ValueError, match="does not exist"):
        raise clone
