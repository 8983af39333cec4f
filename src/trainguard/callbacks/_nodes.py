"""The collectives behind a job on several nodes: which ranks share a node, whether the nodes share ``output_dir``,
and deciding about checkpoints on each node's own folder while every rank agrees.

Single-node jobs (every rank on one node, the common case) pay one small all-gather at the start of ``train()``.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import distributed
from ..checks.checkpoint import nodes as _nodes
from ..errors import TrainGuardError

__all__ = ["NodeView", "decide_on_every_node", "node_gaps", "on_writers_then_share", "storage_notes", "survey"]


@dataclass
class NodeView:
    """Where this rank stands among the job's nodes (only built for two nodes or more)."""

    #: global ranks of each node, node 0 first
    ranks: list[list[int]]
    #: this rank's node
    node: int
    #: groups of nodes writing into the same folder (one group: a shared output_dir)
    groups: list[list[int]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.ranks)

    @property
    def shared(self) -> bool:
        return len(self.groups) == 1

    def node_of(self, rank: int) -> int:
        return next(i for i, ranks in enumerate(self.ranks) if rank in ranks)


def survey(output_dir: str | None) -> NodeView | None:
    """Collective: the job's nodes and whether they share ``output_dir`` (None when every rank is on one node).

    Each node's first rank leaves a probe file in ``output_dir``; after a barrier it lists which nodes' probes it
    sees; after a second barrier it removes its own. One all-gather for the node layout, one for what was seen.
    """
    if not distributed.is_distributed():
        return None
    firsts = distributed.gather_object(distributed.rank() - distributed.local_rank())
    order = sorted(set(firsts))
    if len(order) < 2:
        return None
    ranks = [[r for r, first in enumerate(firsts) if first == f] for f in order]
    node = order.index(distributed.rank() - distributed.local_rank())
    token = distributed.broadcast_object(uuid.uuid4().hex if distributed.is_main_process() else None)
    probe = None
    if distributed.is_local_main_process() and output_dir:
        try:
            probe = _nodes.write_probe(output_dir, token, node)
        except OSError:
            probe = None  # an unwritable folder: this node sees no one, not even itself
    distributed.barrier()
    seen = _nodes.seen_probes(output_dir, token) if distributed.is_local_main_process() and output_dir else None
    everyone = distributed.gather_object(seen)
    distributed.barrier()
    _nodes.remove_probe(probe)
    by_node = {order.index(firsts[r]): s for r, s in enumerate(everyone) if s is not None}
    return NodeView(ranks=ranks, node=node, groups=_nodes.storage_groups(by_node))


def on_writers_then_share(view: NodeView, fn: Callable[[], Any]) -> list[Any]:
    """Collective: run ``fn()`` on each node's first rank (the writer of a node-local folder) and give every rank
    every node's result, node 0 first. An error on any node is raised on every rank (trainguard's errors as they
    are, others as text naming the node)."""
    payload: tuple[str, Any] | None = None
    local_error: BaseException | None = None
    if distributed.is_local_main_process():
        try:
            payload = ("ok", fn())
        except Exception as err:
            local_error = err
            sent = err if isinstance(err, TrainGuardError) else RuntimeError(f"{type(err).__name__}: {err}")
            payload = ("error", sent)
    everyone = distributed.gather_object(payload)
    results = [everyone[ranks[0]] for ranks in view.ranks]
    for node, (kind, value) in enumerate(results):
        if kind == "error":
            if local_error is not None:
                raise local_error
            if isinstance(value, TrainGuardError):
                raise value
            raise RuntimeError(f"on node {node}: {value}")
    return [value for _, value in results]


# ------------------------------------------------------------------------------------------ before step 1
def node_gaps(view: NodeView, trainer: Any) -> list[list[_nodes.Gap]]:
    """What each node's copy of a ``save_on_each_node`` checkpoint will lack, node 0 first."""
    from . import _trainer_compat

    engine = _trainer_compat.engine_layout(trainer)
    stage = _trainer_compat.zero_stage(trainer)
    world, on_rank0 = sum(len(r) for r in view.ranks), _trainer_compat.weights_on_rank0_only()
    return [
        _nodes.node_copy_gaps(engine, node_ranks=r, world_size=world, zero_stage=stage, weights_on_rank0_only=on_rank0)
        for r in view.ranks
    ]


def storage_notes(view: NodeView, trainer: Any, gaps: list[list[_nodes.Gap]]) -> list[tuple[str, str]]:
    """What to tell the user before step 1 about where this job's checkpoints will land: ``(level, text)``."""
    args = trainer.args
    output_dir = str(getattr(args, "output_dir", ""))
    each_node = bool(getattr(args, "save_on_each_node", False))
    if view.shared:
        if each_node:
            return [
                (
                    "warning",
                    f"save_on_each_node=True, but all {view.count} nodes write into the same folder ({output_dir}): "
                    "the Trainer's main process on every node writes the same files at once; set "
                    "save_on_each_node=False (trainguard writes its own files once, from rank 0)",
                )
            ]
        return []
    groups = ", ".join("+".join(str(n) for n in g) for g in view.groups)
    if not each_node:
        return [
            (
                "error",
                f"the {view.count} nodes do not share {output_dir} (each node sees its own folder: nodes {groups}), "
                "and save_on_each_node=False: node 0 gets the checkpoints, the other nodes only their ranks' own "
                "files, so no node can resume alone; use a folder every node sees, or save_on_each_node=True",
            )
        ]
    stuck = [(n, _nodes.blocking(g)) for n, g in enumerate(gaps) if _nodes.blocking(g)]
    if not stuck:
        return [
            (
                "info",
                f"node-local checkpoints (save_on_each_node=True, nodes {groups}): each node writes and verifies its "
                "own copy, and a resume takes the newest step verified on every node",
            )
        ]
    lacking = "; ".join(f"node {n} will lack {_nodes.describe_gaps(g, limit=3)}" for n, g in stuck)
    who = "no node can" if len(stuck) == view.count else "node " + ", ".join(str(n) for n, _ in stuck) + " cannot"
    return [
        (
            "error",
            f"node-local checkpoints (save_on_each_node=True, each node its own {output_dir}): {who} resume from its "
            f"own copy: {lacking}. "
            "The saves go ahead, each node's copy committed with what it lacks; to resume, gather every node's "
            "copy into one folder (or use a folder every node sees)",
        )
    ]


def decide_on_every_node(
    view: NodeView, decide: Callable[..., Any], *, resume: Any, bounded: bool, gaps: list[list[_nodes.Gap]]
) -> Any:
    """Collective, for node-local folders: each node decides on its own folder; every rank gets its node's decision.

    For ``resume_from_checkpoint=True`` (``bounded``): each node proposes its newest verified step at or below the
    bound, the bound falls to the smallest proposal, until every node proposes the same step; a node with nothing
    left makes every node refuse together, naming what each node found. ``decide(max_step)`` is the node's own
    decision (``max_step=None`` for a fresh start or an explicit path).
    """
    from ..checks._layout import checkpoint_step
    from ..errors import CheckpointIntegrityError

    def labelled(bound: int | None) -> Any:
        try:
            return decide(bound)
        except TrainGuardError as err:
            raise type(err)(
                f"on node {view.node}: {err.what}",
                where={**err.where, "node": view.node},
                next_step=_next_step(err.next_step, gaps[view.node]),
                evidence=err.evidence,
            ) from err

    bound = _ALL if bounded else None
    notes: list[list[tuple[str, str]]] = [[] for _ in view.ranks]  # every round's findings, per node
    failed: list[list[str]] = [[] for _ in view.ranks]
    first_choice: int | None = None
    while True:
        decisions = on_writers_then_share(view, functools.partial(labelled, bound))
        for n, d in enumerate(decisions):
            notes[n] += [x for x in d.notes if x not in notes[n]]
            failed[n] += [x for x in d.failed if x not in failed[n]]
        if not bounded:
            break
        steps = [checkpoint_step(d.path) if d.path else None for d in decisions]
        if first_choice is None:
            first_choice = steps[view.node]
        if all(s is None for s in steps) and not any(failed):
            break  # no checkpoint on any node: the Trainer raises its own error
        if _nodes.agreed_step(steps) is not None:
            break
        if any(s is None for s in steps):
            found = "; ".join(
                f"node {n}: "
                + (f"newest verified checkpoint-{s}" if s is not None else "no verified checkpoint")
                + (" (" + "; ".join(t for _, t in notes[n]) + ")" if notes[n] else "")
                for n, s in enumerate(steps)
            )
            raise CheckpointIntegrityError(
                f"no checkpoint step verifies on every node of this node-local job: {found}",
                where={"node": view.node, "rank": distributed.rank()},
                next_step=_next_step(
                    "Resume needs the same step on every node: copy a good node's checkpoint to the others, or "
                    "start fresh.",
                    [g for node in gaps for g in node],
                ),
            )
        bound = min(s for s in steps if s is not None)
    mine = decisions[view.node]
    first = decisions[0]
    if mine.path is None or bound is None:
        mine.lineage = first.lineage  # a fresh start: one lineage for every node's folder
    mine.run = first.run
    mine.notes, mine.failed = notes[view.node], failed[view.node]
    chosen = checkpoint_step(mine.path) if mine.path else None
    if first_choice is not None and chosen is not None and first_choice != chosen:
        mine.notes.append(
            (
                "warning",
                f"checkpoint-{first_choice} verifies here but not on every node: every node resumes from "
                f"checkpoint-{chosen} (checkpoint-{first_choice} is left in place)",
            )
        )
    if view.node:
        mine.notes = [(level, f"node {view.node}: {text}") for level, text in mine.notes]
    return mine


_ALL = 1 << 62  # "every step": a bound that makes a node with nothing verified say so instead of raising


def _next_step(original: str, gaps: list[_nodes.Gap]) -> str:
    stuck = _nodes.blocking(gaps)
    if not stuck:
        return original
    return (
        f"{original} This layout's node-local copies cannot be resumed alone ({_nodes.describe_gaps(stuck, limit=2)}): "
        "gather every node's copy of one checkpoint into one folder, or train with a folder every node sees."
    )
