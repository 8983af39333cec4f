"""The names trainguard and the Trainer give to things inside an ``output_dir``: one place, so that every module
(and every reader of an output_dir) agrees on them.

Imports nothing heavy; every check and command may use it.

Where the Trainer puts its ``checkpoint-N`` folders is :class:`CheckpointLayout`'s alone: no other module builds
or parses that name by hand (a test checks it), so a new save path is one change here.

Example::

    from trainguard.checks._layout import CheckpointLayout, MANIFEST_NAME, checkpoint_step
    checkpoint_step("out/checkpoint-50")   # 50
    CheckpointLayout("out").folder_for(50)  # Path("out/checkpoint-50")
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ACCEPTED_INEXACT",
    "ARCHIVE_DIR",
    "CHECKPOINT_PREFIX",
    "CHECKPOINT_RE",
    "JIT_SENTINEL",
    "LINEAGE_FORMAT",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "METADATA_NAME",
    "QUARANTINE_DIR",
    "RECORD_PATTERNS",
    "RUN_MARKER",
    "SAVING_MARKER",
    "TRAINER_STATE",
    "CheckpointLayout",
    "checkpoint_step",
]

#: The commit marker: GNU ``sha256sum`` lines for every file of the checkpoint. Written last.
MANIFEST_NAME = "trainguard-manifest.sha256"
#: Sizes, step, time, versions and the run lineage; written before the marker and listed in it.
METADATA_NAME = "trainguard-manifest.json"
MANIFEST_FORMAT = "trainguard-manifest/1"
#: The format of the lineage registry and of a checkpoint's lineage record.
LINEAGE_FORMAT = "trainguard-lineage/1"
#: Inside ``checkpoint-N`` while a trainguard-watched save is in progress (written before the Trainer writes, removed
#: after the commit marker): a folder that still has it and no marker is an interrupted save, not a legacy one.
SAVING_MARKER = "trainguard-saving.json"
#: In ``output_dir``: the lineage registry (which lineage is current, which runs trained here). Older releases wrote
#: it only to say "this run writes manifests"; such a file is read as a registry with no current lineage.
RUN_MARKER = "trainguard-checkpoints.json"
#: Where failed checkpoints are set aside, inside ``output_dir``. Its name does not start with ``checkpoint-``:
#: the Trainer's rotation globs ``output_dir/checkpoint-*`` and would delete a set-aside folder named like one.
QUARANTINE_DIR = "trainguard-quarantine"
#: Where whole sets of checkpoints (``start_fresh``) and folders replaced by a new save are moved, never deleted.
ARCHIVE_DIR = "trainguard-archive"
#: Every name trainguard writes into ``output_dir`` or a ``checkpoint-N`` folder, as ``fnmatch`` patterns on the path
#: relative to that folder (the way ``huggingface_hub.upload_folder`` applies ``ignore_patterns``). The Trainer's Hub
#: uploads skip them: they name hosts, PIDs and command lines (lock record, crash log, manifests), alerts (events),
#: thread stacks (hang dumps) or are whole set-aside checkpoints (archive, quarantine). Exact names where trainguard
#: writes exact names, so a file of the user's own is never skipped.
RECORD_PATTERNS: tuple[str, ...] = (
    ".trainguard.lock",  # RunLock's kernel lock
    ".trainguard.lock.json",  # its holder record: PID, host, command line
    ".trainguard-*",  # probes and per-rank partial hash files
    "*.trainguard-tmp-*",  # an interrupted atomic write's leftover, in any folder
    RUN_MARKER,
    "trainguard-crashes.jsonl",
    "trainguard-events.jsonl",
    "trainguard-spikes.jsonl",
    "trainguard-hang-rank*",  # hang dumps and the watchdog's live files
    f"{ARCHIVE_DIR}/*",
    f"{QUARANTINE_DIR}/*",
    METADATA_NAME,  # holds the host that wrote the checkpoint
    MANIFEST_NAME,
    SAVING_MARKER,
)
#: The key of a manifest's lineage record holding the user's acceptance of a resume that is not bit-exact (missing RNG
#: state), written by ``trainguard restore --accept-inexact``.
ACCEPTED_INEXACT = "accepted_inexact"
#: Written by the Trainer's JIT checkpointing before a save and removed after it; nothing in transformers reads it.
JIT_SENTINEL = "checkpoint-is-incomplete.txt"
#: The Trainer writes it last in every save.
TRAINER_STATE = "trainer_state.json"
#: The same pattern as ``transformers.trainer_utils._re_checkpoint``: only ``checkpoint-<digits>`` folders count.
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_step(folder: str | os.PathLike[str]) -> int | None:
    """N for a folder named ``checkpoint-N``, else None."""
    match = CHECKPOINT_RE.match(Path(folder).name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class CheckpointLayout:
    """The ``checkpoint-N`` folders of one run folder: where the Trainer saves step N, which step a folder holds,
    and which are there.

    ``root`` is the folder the Trainer saves into: ``args.output_dir``, or a hyper-parameter search trial's own
    ``output_dir/run-<id>`` (callbacks get it from ``_trainer_compat.checkpoint_layout(trainer)``).

    Example::

        layout = CheckpointLayout("out")
        layout.folder_for(6)                    # Path("out/checkpoint-6")
        layout.step_of("out/checkpoint-6")      # 6
        layout.list()                           # [Path("out/checkpoint-2"), Path("out/checkpoint-6")]
    """

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    @staticmethod
    def name_for(step: int) -> str:
        """``checkpoint-N``: the folder name the Trainer gives the save of step ``step``."""
        return f"{CHECKPOINT_PREFIX}{int(step)}"

    def folder_for(self, step: int) -> Path:
        """The folder the Trainer saves step ``step`` into."""
        return self.root / self.name_for(step)

    @staticmethod
    def step_of(folder: str | os.PathLike[str]) -> int | None:
        """N for a folder named ``checkpoint-N`` (the Trainer's own pattern: digits only), else None."""
        return checkpoint_step(folder)

    def list(self) -> list[Path]:
        """The ``checkpoint-N`` folders directly in ``root``, oldest (lowest N) first; [] when there are none."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            step = checkpoint_step(entry)
            if step is not None and entry.is_dir():
                found.append((step, entry))
        return [path for _, path in sorted(found)]
