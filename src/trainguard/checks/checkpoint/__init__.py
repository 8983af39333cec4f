"""Checkpoint integrity: sha256 manifests as the "this checkpoint is complete" marker, verification, and the newest
verified checkpoint of a run.

The Trainer writes a checkpoint in place, file by file, with no completion marker and no checksum, and
``get_last_checkpoint`` takes the highest number without looking inside. This module adds both:

- :func:`write_manifest` hashes every file of a finished checkpoint and writes, last and atomically,
  ``trainguard-manifest.sha256`` (GNU ``sha256sum`` format: ``cd checkpoint-N && sha256sum -c
  trainguard-manifest.sha256`` checks it as it is). Its presence is the commit marker. The metadata (sizes, step,
  UTC time, library versions) is in ``trainguard-manifest.json``, written just before it and covered by it.
- :func:`verify_checkpoint` checks a folder against its manifest: cheap structural checks first (every file
  present with its recorded size, safetensors headers, JSON, torch zip archives), then sha256 of every file in
  parallel threads. It raises :class:`~trainguard.errors.CheckpointIntegrityError` naming every problem.
- :func:`latest_verified_checkpoint` is ``get_last_checkpoint`` that skips what does not verify.

A folder without a manifest is either an interrupted save (trainguard's saving marker, a half-written manifest, the
Trainer's JIT sentinel or a safetensors temp file is still there) or a *legacy* checkpoint, written without
trainguard: that one gets structural checks only, is reported "unverified (legacy)", never "interrupted", and
``trainguard manifest`` adopts it. Files the Trainer never loads (``.DS_Store``, ``.ipynb_checkpoints/``, a README)
found beside a manifest are warnings, not failures. Which run wrote which checkpoint, and which of them a resume may
use, is :mod:`trainguard.checks.lineage`'s part.

The package, one concern a module: :mod:`.report` (what a check found), :mod:`.formats` (structural checks of each
file kind), :mod:`.manifest` (the sha256 manifest: format, hashing, writing), :mod:`.verify` (checking one folder),
:mod:`.resume` (choosing the checkpoint a resume loads). Everything public is importable from here.

Imports neither torch nor transformers: the ``trainguard verify`` command uses it as is.

Example::

    from trainguard import latest_verified_checkpoint, verify_checkpoint, write_manifest
    write_manifest("out/checkpoint-50")
    verify_checkpoint("out/checkpoint-50")            # raises CheckpointIntegrityError on any damage
    ckpt = latest_verified_checkpoint("out")          # None when no checkpoint verifies
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
"""

from __future__ import annotations

from .._layout import (
    ARCHIVE_DIR,
    JIT_SENTINEL,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    METADATA_NAME,
    QUARANTINE_DIR,
    RUN_MARKER,
    SAVING_MARKER,
)
from .manifest import (
    format_sha256_lines,
    has_manifest,
    mark_run_uses_manifests,
    parse_sha256_file,
    run_uses_manifests,
    sha256_file,
    write_manifest,
)
from .report import CheckpointReport, Problem
from .resume import (
    ResumeChoice,
    choose_checkpoint,
    latest_verified_checkpoint,
    resolve_verified_resume,
    resume_choice,
    scan_output_dir,
    set_aside_checkpoint,
)
from .verify import check_checkpoint, integrity_error, verify_checkpoint

__all__ = [
    "ARCHIVE_DIR",
    "JIT_SENTINEL",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "METADATA_NAME",
    "QUARANTINE_DIR",
    "RUN_MARKER",
    "SAVING_MARKER",
    "CheckpointReport",
    "Problem",
    "ResumeChoice",
    "check_checkpoint",
    "choose_checkpoint",
    "format_sha256_lines",
    "has_manifest",
    "integrity_error",
    "latest_verified_checkpoint",
    "mark_run_uses_manifests",
    "parse_sha256_file",
    "resolve_verified_resume",
    "resume_choice",
    "run_uses_manifests",
    "scan_output_dir",
    "set_aside_checkpoint",
    "sha256_file",
    "verify_checkpoint",
    "write_manifest",
]
