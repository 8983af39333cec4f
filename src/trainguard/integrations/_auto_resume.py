"""Shared by the tool integrations: a tool's own auto-resume pick becomes CheckpointVerifier's verified pick."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..callbacks._base import GuardCallback

__all__ = ["AutoResumeToVerified"]


class AutoResumeToVerified(GuardCallback):
    """Turn a resume path the tool picked by number (axolotl's ``auto_resume_from_checkpoints``, LLaMA-Factory's
    resume of a non-empty ``output_dir``) into ``resume_from_checkpoint=True``, which
    :class:`~trainguard.CheckpointVerifier` resolves to the newest *verified* checkpoint, setting a damaged newer one
    aside. Put it before the verifier; add it only when the user did not name the checkpoint.

    Args:
        output_dir: The run's output_dir: only a pick inside it is replaced.
        tool: The tool's name, for the alert.
    """

    guard_name = "auto_resume"

    def __init__(self, output_dir: str, tool: str) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.tool = tool

    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> Any:
        if not isinstance(resume_from_checkpoint, (str, Path)):
            return resume_from_checkpoint
        picked = Path(resume_from_checkpoint)
        if picked.parent.resolve() != Path(self.output_dir).resolve():
            return resume_from_checkpoint
        self.alert(
            "info",
            f"{self.tool} auto-resume picked {picked.name}; resuming from the newest verified checkpoint instead",
            evidence={"picked": str(picked)},
        )
        return True
