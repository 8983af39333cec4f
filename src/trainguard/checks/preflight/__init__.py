"""Pre-flight checks: will the run's checkpoints fit on disk, is there RAM to run it, and will the next save fit.

Users lose runs to a full disk at the *last* checkpoint of a long run (SimpleTuner #2353, LlamaFactory #5155) and
to merges that die half-written on a full disk (unsloth #534, #1122). The functions here answer "will it fit?"
before the work starts; :class:`~trainguard.PreflightGuard` runs them from a Trainer.

The modules, each one concern:

- ``system``: :func:`check_disk_space`, :func:`check_memory`, :func:`gpu_memory_summary`, :func:`directory_size`,
  :func:`format_bytes`: the machine's disk and memory against what is needed;
- ``sizing``: :func:`param_stats`, :func:`estimate_checkpoint_size`, :func:`optimizer_state_bytes`,
  :func:`planned_checkpoints`, :func:`tokenizer_size`, :func:`describe_args`: what one Trainer checkpoint weighs
  and how many of them are on disk at once, from plain numbers;
- ``plan``: :class:`RunSettings`, :func:`plan_run_disk`, :func:`run_disk_error` and the per-save check
  (:func:`next_save_size`, :func:`check_save_space`, :func:`save_stopped_error`): the run's disk plan, and the
  errors PreflightGuard raises;
- ``engine``: :func:`requested_engine`, :func:`engine_fallback`: a run that asked for FSDP or DeepSpeed and is
  training without it.

Nothing here imports torch or transformers (:func:`gpu_memory_summary` imports torch when called); a model is only
iterated (``named_parameters``).

Example::

    from trainguard import check_disk_space
    check_disk_space("out/", required_bytes=2 * 2**30)   # PreflightError naming needed and free when short
"""

from __future__ import annotations

from .engine import engine_fallback, requested_engine
from .plan import (
    RunDiskPlan,
    RunSettings,
    check_save_space,
    checkpoint_global_step,
    next_save_size,
    plan_run_disk,
    resume_folder,
    run_disk_error,
    save_stopped_error,
    training_schedule,
)
from .sizing import (
    CheckpointEstimate,
    ParamStats,
    describe_args,
    estimate_checkpoint_size,
    optimizer_state_bytes,
    param_stats,
    planned_checkpoints,
    tokenizer_size,
)
from .system import (
    DEFAULT_MARGIN,
    DEFAULT_MARGIN_BYTES,
    DEFAULT_MIN_AVAILABLE_MEMORY,
    DiskSpace,
    MemoryStatus,
    check_disk_space,
    check_memory,
    directory_size,
    disk_space_error,
    format_bytes,
    gpu_memory_summary,
    memory_error,
)

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_MARGIN_BYTES",
    "DEFAULT_MIN_AVAILABLE_MEMORY",
    "CheckpointEstimate",
    "DiskSpace",
    "MemoryStatus",
    "ParamStats",
    "RunDiskPlan",
    "RunSettings",
    "check_disk_space",
    "check_memory",
    "check_save_space",
    "checkpoint_global_step",
    "describe_args",
    "directory_size",
    "disk_space_error",
    "engine_fallback",
    "estimate_checkpoint_size",
    "format_bytes",
    "gpu_memory_summary",
    "memory_error",
    "next_save_size",
    "optimizer_state_bytes",
    "param_stats",
    "plan_run_disk",
    "planned_checkpoints",
    "requested_engine",
    "resume_folder",
    "run_disk_error",
    "save_stopped_error",
    "tokenizer_size",
    "training_schedule",
]
