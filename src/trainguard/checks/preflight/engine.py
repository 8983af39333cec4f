"""A run that asked for a sharded engine and is training without it.

accelerate 1.15 builds no FSDP plugin on CPU (``use_cpu=True``) and says nothing: a run configured with
``fsdp="full_shard"`` trains plain DDP, every rank holding the whole model and optimizer. On a GPU the same silent
fallback happens when the launcher's configuration and the Trainer's disagree. The run may fit or not; either way its
memory, speed and checkpoint layout are not what was asked for, and the first sign is an OOM or a resume that finds
files of the wrong layout.

Example::

    engine_fallback("fsdp", active="ddp")     # a message naming both, or None when they agree
"""

from __future__ import annotations

from typing import Any

__all__ = ["engine_fallback", "requested_engine"]


def requested_engine(fsdp: Any, deepspeed: Any, env: dict[str, str] | None = None) -> str | None:
    """The sharded engine a run asked for: ``"fsdp"`` (``TrainingArguments.fsdp`` set, or accelerate's
    ``ACCELERATE_USE_FSDP``), ``"deepspeed"`` (``TrainingArguments.deepspeed`` set, or ``ACCELERATE_USE_DEEPSPEED``),
    or None."""
    env = env or {}
    if deepspeed or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return "deepspeed"
    if (fsdp and str(fsdp).strip() not in ("", "[]", "False")) or env.get("ACCELERATE_USE_FSDP", "").lower() in (
        "1",
        "true",
    ):
        return "fsdp"
    return None


def engine_fallback(requested: str | None, *, active: str, setting: str = "") -> str | None:
    """Why the run is not on the engine it asked for (None when it is, or asked for none).

    Args:
        requested: From :func:`requested_engine`.
        active: What the Trainer set up: ``"fsdp"``, ``"deepspeed"`` or anything else (plain DDP or one process).
        setting: The argument that asked for it, to name in the message.
    """
    if requested is None or requested == active:
        return None
    names = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}
    asked = names.get(requested, requested)
    instead = names.get(active, f"{active}, without {asked}")
    article = "an" if asked == "FSDP" else "a"
    return (
        f"the run asked for {asked}{f' ({setting})' if setting else ''} but the Trainer set up {instead}: "
        "every rank would hold the whole model and optimizer state, and checkpoints would have another layout than "
        f"{article} {asked} run's"
    )
