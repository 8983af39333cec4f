"""Dataset identity: content fingerprints of training data, and the resume check DatasetGuard runs with them.

A fingerprint answers "is this the data the checkpoint was trained on, in the same order?"; the run-identity record
kept in each checkpoint adds the global batch and steps per epoch, so a resume on other data, with another global
batch, or after which nothing would train is refused before the Trainer loads anything.

The modules, each one concern:

- ``fingerprint``: :func:`dataset_fingerprint` and :func:`describe_dataset`: the content fingerprint of a
  ``Dataset``, an Arrow table, data files or a list of rows;
- ``resume``: :func:`plan_resume`: what plain ``Trainer`` does when it resumes at a step with the new run's numbers;
- ``identity``: the run-identity record (:func:`run_identity_record`, :func:`stored_record`), its comparison
  (:func:`check_run_identity`, :func:`check_resume_identity`, :func:`check_checkpoint_resume`) and the
  :class:`~trainguard.DatasetMismatchError` naming both sides and the ways forward.

Importing this package imports neither torch, transformers nor datasets.

Example::

    from trainguard import dataset_fingerprint
    assert dataset_fingerprint("data/train.jsonl") == dataset_fingerprint(Path("data/train.jsonl").resolve())
"""

from __future__ import annotations

from .fingerprint import RECORD_SCHEME, DatasetIdentity, dataset_fingerprint, describe_dataset
from .identity import (
    CHECK_EVAL,
    WAYS_FORWARD,
    check_checkpoint_resume,
    check_resume_identity,
    check_run_identity,
    identify,
    run_identity_record,
    stored_record,
    ways_forward,
)
from .resume import ResumePlan, plan_resume

__all__ = [
    "CHECK_EVAL",
    "RECORD_SCHEME",
    "WAYS_FORWARD",
    "DatasetIdentity",
    "ResumePlan",
    "check_checkpoint_resume",
    "check_resume_identity",
    "check_run_identity",
    "dataset_fingerprint",
    "describe_dataset",
    "identify",
    "plan_resume",
    "run_identity_record",
    "stored_record",
    "ways_forward",
]
