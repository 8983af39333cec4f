"""Several nodes: whether they share ``output_dir``, what each node's copy of a checkpoint will hold, and which step
every node can resume from. Plain inputs; the callback runs the collectives.

- **Shared or node-local.** Each node's writer leaves a probe file in ``output_dir``; a node that sees every node's
  probe shares the folder with them (:func:`write_probe`, :func:`seen_probes`, :func:`storage_groups`).
- **What a node's copy lacks** (:func:`node_copy_gaps`), measured with transformers 5.24 / accelerate 1.15 /
  DeepSpeed 0.19 and ``save_on_each_node=True`` on node-local folders: every layout writes some files only on global
  rank 0 (DCP ``.metadata``, DeepSpeed ``latest``, FSDP full-state weights and optimizer, and in transformers 5 the
  ``save_pretrained`` weights of a plain run) and each rank's shards only on its own node. Only gaps of other ranks'
  RNG files are harmless (each rank loads its own). A copy with any other gap cannot be resumed on that node alone.
- **Agreeing on a step** (:func:`agreed_step`): the newest step every node verified.

Example::

    gaps = node_copy_gaps("fsdp_sharded", node_ranks=[1], world_size=2)
    [g.path for g in gaps]   # ['pytorch_model_fsdp_0/.metadata', 'pytorch_model_fsdp_0/__0_0.distcp', ...]
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PROBE_PREFIX",
    "Gap",
    "agreed_step",
    "blocking",
    "describe_gaps",
    "node_copy_gaps",
    "remove_probe",
    "seen_probes",
    "storage_groups",
    "write_probe",
]

PROBE_PREFIX = ".trainguard-node-probe-"
_PROBE = re.compile(r"^\.trainguard-node-probe-([0-9a-f]+)-(\d+)$")


@dataclass(frozen=True)
class Gap:
    """A file a node's copy of a checkpoint will not hold, and why; ``harmless`` when resuming does not need it."""

    path: str
    why: str
    harmless: bool = False


def write_probe(output_dir: str | os.PathLike[str], token: str, node: int) -> Path:
    """Leave this node's probe in ``output_dir`` (created if needed); remove it with :func:`remove_probe`."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f"{PROBE_PREFIX}{token}-{node}"
    probe.write_bytes(b"")
    return probe


def seen_probes(output_dir: str | os.PathLike[str], token: str) -> list[int]:
    """The nodes whose probe for ``token`` this node sees in ``output_dir``."""
    try:
        names = os.listdir(output_dir)
    except OSError:
        return []
    return sorted(int(m.group(2)) for n in names if (m := _PROBE.match(n)) and m.group(1) == token)


def remove_probe(probe: Path | None) -> None:
    if probe is not None:
        with contextlib.suppress(OSError):
            probe.unlink()


def storage_groups(seen: dict[int, Sequence[int]]) -> list[list[int]]:
    """Nodes grouped by the folder they really write to, from what each node's writer saw (node -> nodes seen)."""
    groups: list[list[int]] = []
    for node in sorted(seen):
        group = sorted(set(seen[node]) | {node})
        if group not in groups:
            groups.append(group)
    return groups


def node_copy_gaps(
    engine: str,
    *,
    node_ranks: Sequence[int],
    world_size: int,
    zero_stage: int | None = None,
    weights_on_rank0_only: bool = True,
) -> list[Gap]:
    """The files a node's copy of a checkpoint will lack when each node saves into its own folder.

    Args:
        engine: What writes the checkpoint: ``plain`` (DDP or one process), ``fsdp_sharded``, ``fsdp_full`` or
            ``deepspeed`` (see ``_trainer_compat.engine_layout``).
        node_ranks: The global ranks that run on this node.
        world_size: All ranks of the job.
        zero_stage: DeepSpeed's ZeRO stage (3 also shards the model states).
        weights_on_rank0_only: ``save_pretrained`` writes only on global rank 0 (transformers 5; transformers 4
            wrote on every node's main process).
    """
    ranks = set(node_ranks)
    others = [r for r in range(world_size) if r not in ranks]
    rank0_here = 0 in ranks
    gaps = [Gap(f"rng_state_{r}.pth", f"rank {r}'s RNG state, written on its own node", harmless=True) for r in others]
    only_rank0 = "written on global rank 0 only"
    if engine == "plain":
        if not rank0_here and weights_on_rank0_only:
            gaps += [Gap(n, f"{only_rank0} (save_pretrained)") for n in ("model.safetensors", "config.json")]
    elif engine == "fsdp_full":
        if not rank0_here:
            gaps += [
                Gap(n, f"{only_rank0} (the full state dict is gathered there)")
                for n in ("model.safetensors", "pytorch_model_fsdp.bin", "optimizer.bin")
            ]
    elif engine == "fsdp_sharded":
        for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
            if not rank0_here:
                gaps.append(Gap(f"{folder}/.metadata", f"the shard index, {only_rank0} (DCP's coordinator)"))
            gaps += [Gap(f"{folder}/__{r}_0.distcp", f"rank {r}'s shard, written on its own node") for r in others]
    elif engine == "deepspeed":
        if not rank0_here:
            gaps.append(Gap("latest", f"the tag DeepSpeed loads, {only_rank0}"))
            if weights_on_rank0_only:  # DeepSpeed resumes from global_stepN/, not from these
                gaps.append(Gap("model.safetensors", f"{only_rank0} (save_pretrained)", harmless=True))
        kinds = ("optim", "model") if zero_stage == 3 else ("optim",)
        gaps += [
            Gap(f"global_stepN/zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt", f"rank {r}'s {kind} state partition")
            for r in others
            for kind in kinds
        ]
    return gaps


def blocking(gaps: Sequence[Gap]) -> list[Gap]:
    """The gaps that keep a node from resuming on its own copy."""
    return [g for g in gaps if not g.harmless]


def describe_gaps(gaps: Sequence[Gap], limit: int = 4) -> str:
    shown = "; ".join(f"{g.path} ({g.why})" for g in gaps[:limit])
    return shown + (f"; and {len(gaps) - limit} more" if len(gaps) > limit else "")


def agreed_step(proposals: Sequence[int | None]) -> int | None:
    """The step every node can resume from, if their proposals (each node's newest verified step at or below the
    last bound) already agree; otherwise None (ask again with the smallest as the bound)."""
    steps = list(proposals)
    if steps and all(s is not None for s in steps) and len(set(steps)) == 1:
        return steps[0]
    return None
