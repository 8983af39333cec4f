"""The last good save on a dying run: whether a failed ``train()`` may save ``checkpoint-N`` before its error
propagates (:class:`~trainguard.GracefulStop`'s ``save_on_error``).

Plain functions on plain inputs: the exception, the phase of the step it came from (recorded from the Trainer's
events), the Trainer's control flags at that moment, and what already is on disk. Three questions, each answered by
a reason not to save (a string) or None:

- :func:`error_reason`: is the error one a save can outlive? A numeric failure (``NonFiniteError``, anything else a
  guard raised on purpose), an interrupt, or a storage failure (a full disk, a read-only or failing filesystem) is
  not; an out-of-memory error, a data error or a callback's exception is.
- :func:`phase_reason`: do the weights, optimizer and scheduler in memory belong to one completed step? They do
  during the forward/backward of a step (nothing of the step is applied yet) and between steps (logging,
  evaluation); they do not inside the optimizer update, after it before the step is counted, or inside a save.
- :func:`decide`: the two above, plus what only the caller knows (engine, the folder already on disk): whether
  this rank may save.
- :func:`agree`: with several ranks, whether they all may save together, from the :class:`RankReport` each failing
  rank posted (through the c10d store, never a collective): only when every rank reported, all at the same step,
  after the same number of collectives, all eligible.

Example::

    from trainguard.checks.last_save import decide
    d = decide(MemoryError("eval"), "between", step=3, should_save=False, should_evaluate=True, existing="absent")
    assert d.save and d.step == 3
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from ..errors import NonFiniteError, TrainGuardError
from ._layout import MANIFEST_NAME, SAVING_MARKER

__all__ = [
    "PHASES",
    "STORAGE_ERRNOS",
    "LastSaveDecision",
    "RankReport",
    "agree",
    "checkpoint_status",
    "decide",
    "error_reason",
    "phase_reason",
]

#: Where in the training loop an error can come from, as recorded from the Trainer's events:
#: ``idle`` (before ``on_train_begin``: loading, the start checks), ``step`` (``on_step_begin`` .. the update:
#: forward, backward, clipping), ``update`` (``on_pre_optimizer_step`` .. ``on_optimizer_step``), ``after_update``
#: (``on_optimizer_step`` .. ``on_step_end``: scheduler, step counter), ``between`` (after ``on_step_end`` or
#: ``on_train_begin``: fetching batches, logging, evaluation, saving), ``ended`` (after ``on_train_end``).
PHASES = ("idle", "step", "update", "after_update", "between", "ended")

Phase = Literal["idle", "step", "update", "after_update", "between", "ended"]

#: ``OSError`` numbers of a storage failure: a save would fail the same way (or make things worse).
STORAGE_ERRNOS = frozenset(
    code
    for code in (
        errno.ENOSPC,
        getattr(errno, "EDQUOT", None),
        errno.EROFS,
        errno.EIO,
        getattr(errno, "ESTALE", None),
    )
    if code is not None
)

CheckpointStatus = Literal["absent", "committed", "uncommitted"]


@dataclass(frozen=True)
class LastSaveDecision:
    """Whether to save ``checkpoint-{step}`` before the error propagates, and why (or why not)."""

    save: bool
    step: int
    reason: str


@dataclass(frozen=True)
class RankReport:
    """What one failing rank posts for the others: where it failed and whether it may save.

    Attributes:
        rank: The global rank.
        step: Its ``state.global_step`` (the last completed step).
        phase: One of :data:`PHASES`.
        save: Its own :func:`decide` (and finiteness check) said yes.
        reason: Why (or why not).
        collectives: How many collectives it had issued on the default group (``distributed.collective_count``),
            or None where the backend does not count them.
    """

    rank: int
    step: int
    phase: str
    save: bool
    reason: str
    collectives: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RankReport:
        data = json.loads(text)
        return cls(
            rank=int(data["rank"]),
            step=int(data["step"]),
            phase=str(data["phase"]),
            save=bool(data["save"]),
            reason=str(data["reason"]),
            collectives=None if data.get("collectives") is None else int(data["collectives"]),
        )


#: Words of a failed collective in the errors gloo, NCCL and c10d raise (gloo raises a bare ``RuntimeError``).
_COLLECTIVE_WORDS = ("connection closed by peer", "connection reset by peer", "gloo", "nccl", "processgroup", "c10d")


def _is_collective_failure(exc: BaseException) -> bool:
    if any(k.__name__ in ("DistError", "DistBackendError", "DistNetworkError") for k in type(exc).__mro__):
        return True
    if type(exc) is RuntimeError:
        text = str(exc).lower()
        return any(word in text for word in _COLLECTIVE_WORDS)
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts (a wrapped error keeps its nature), without loops."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen) and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def error_reason(exc: BaseException) -> str | None:
    """Why ``exc`` rules out a save on the way out, or None when a save may outlive it.

    Args:
        exc: What ``train()`` raised.

    Returns:
        None for an error the state survives (out of memory, a data error, a callback's exception); otherwise one
        sentence: a numeric failure (``NonFiniteError``: the weights may hold NaN), another trainguard error (a guard
        stopped the run on purpose), an interrupt (``KeyboardInterrupt``/``SystemExit``: the user wants out now),
        a storage failure (``OSError`` ENOSPC/EDQUOT/EROFS/EIO/ESTALE anywhere in the chain: a save would fail
        the same way), or a failed collective (a ``DistError``, or gloo's "Connection closed by peer": another rank
        is gone or stuck, and a save under several ranks is a collective too).

    Example::

        from trainguard.checks.last_save import error_reason
        assert error_reason(OSError(28, "No space left on device")).startswith("a storage failure")
        assert error_reason(MemoryError()) is None
    """
    if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        return f"an interrupt ({type(exc).__name__}): the run is wanted stopped now, not saved"
    for link in _chain(exc):
        if isinstance(link, NonFiniteError):
            return "a numeric failure (NonFiniteError): the state may hold NaN or Inf"
        if isinstance(link, TrainGuardError):
            return f"a trainguard guard stopped the run on purpose ({type(link).__name__})"
        if isinstance(link, OSError) and link.errno in STORAGE_ERRNOS:
            name = errno.errorcode.get(link.errno or 0, str(link.errno))
            return f"a storage failure ({name}): a save would fail the same way"
        if _is_collective_failure(link):
            return (
                f"a collective failed ({type(link).__name__}): another rank is gone or stuck, and a save on several "
                "ranks is a collective too"
            )
    return None


def phase_reason(phase: str, *, should_save: bool, should_evaluate: bool) -> str | None:
    """Why the state in memory is not known to be one completed step's, or None when it is.

    Args:
        phase: One of :data:`PHASES`, recorded from the Trainer's events.
        should_save: The Trainer's ``control.should_save`` when the error surfaced. Set at a save step's
            ``on_step_end`` and cleared only when ``on_save`` fires, so between steps it is True from just before a
            save until the save is over.
        should_evaluate: The Trainer's ``control.should_evaluate`` then; cleared when ``on_evaluate`` fires.
            Evaluation runs before the save, so while it is True the save has not begun.

    Example::

        from trainguard.checks.last_save import phase_reason
        assert phase_reason("update", should_save=False, should_evaluate=False) is not None
        assert phase_reason("step", should_save=False, should_evaluate=False) is None
    """
    if phase == "step":
        return None  # forward/backward: weights, optimizer and scheduler are still the last completed step's
    if phase == "between":
        if should_save and not should_evaluate:
            return "the error may come from inside a save (a save was due and evaluation was over)"
        return None
    if phase == "update":
        return "the error came from inside the optimizer update: the weights may be partly updated"
    if phase == "after_update":
        return "the error came after the optimizer update but before the step was counted"
    if phase == "idle":
        return "training had not begun (loading or a start check)"
    if phase == "ended":
        return "training had already ended"
    return f"unknown phase {phase!r}"


def checkpoint_status(folder: str | os.PathLike[str]) -> CheckpointStatus:
    """``absent`` when ``folder`` does not exist; ``committed`` when it holds a trainguard manifest and no saving
    marker; ``uncommitted`` otherwise (a save began there, or a Trainer without CheckpointVerifier saved there).

    Example::

        from trainguard.checks.last_save import checkpoint_status
        assert checkpoint_status("no-such-folder/checkpoint-3") == "absent"
    """
    path = Path(folder)
    if not path.is_dir():
        return "absent"
    if (path / MANIFEST_NAME).is_file() and not (path / SAVING_MARKER).exists():
        return "committed"
    return "uncommitted"


def decide(
    exc: BaseException,
    phase: str,
    *,
    step: int,
    should_save: bool,
    should_evaluate: bool,
    existing: CheckpointStatus,
    world_size: int = 1,
    engine: str = "plain",
) -> LastSaveDecision:
    """Whether to save ``checkpoint-{step}`` before ``exc`` propagates.

    Saves only when every rule says yes: an error a save can outlive (:func:`error_reason`), a state known to be
    one completed step's (:func:`phase_reason`), a step past 0, no folder of that step on disk (never a second save
    of a step: a committed one is the save already; an uncommitted one is a save that began and may have failed),
    and an engine whose update is a phase of its own: plain (one process, DDP) or FSDP on several ranks (its save
    is a collective like DDP's; FSDP in one process is untested and refused), never DeepSpeed (it updates inside
    ``backward``, so its "forward/backward" phase is not consistent). With several processes a yes here is this
    rank's only: the ranks save only when :func:`agree` says all of them may.

    Args:
        exc: What ``train()`` raised.
        phase: One of :data:`PHASES`.
        step: The Trainer's ``state.global_step`` (the last completed step).
        should_save: ``control.should_save`` when the error surfaced.
        should_evaluate: ``control.should_evaluate`` when the error surfaced.
        existing: :func:`checkpoint_status` of ``checkpoint-{step}``.
        world_size: The number of processes (a yes with several is this rank's half of :func:`agree`).
        engine: ``plain``, ``deepspeed``, ``fsdp_full``, ``fsdp_sharded``.

    Example::

        from trainguard.checks.last_save import decide
        d = decide(RuntimeError("x"), "update", step=3, should_save=False, should_evaluate=False, existing="absent")
        assert not d.save and "optimizer update" in d.reason
    """

    def no(reason: str) -> LastSaveDecision:
        return LastSaveDecision(save=False, step=step, reason=reason)

    reason = error_reason(exc)
    if reason is not None:
        return no(reason)
    reason = phase_reason(phase, should_save=should_save, should_evaluate=should_evaluate)
    if reason is not None:
        return no(reason)
    if step <= 0:
        return no("no step has completed yet: there is nothing to save")
    if existing == "committed":
        return no(f"checkpoint-{step} is already saved and committed: nothing to add")
    if existing == "uncommitted":
        return no(f"checkpoint-{step} already exists without a commit: a save of this step began and may have failed")
    if engine == "deepspeed":
        return no("the deepspeed engine: its update runs inside backward, so no phase of its step is consistent")
    if engine != "plain" and not (engine.startswith("fsdp") and world_size > 1):
        return no(f"the {engine} engine in one process: a last save of it is not supported (not tested)")
    if world_size > 1:
        return LastSaveDecision(
            save=True,
            step=step,
            reason=f"the state is that of completed step {step} on this rank; saving needs every rank to agree",
        )
    return LastSaveDecision(save=True, step=step, reason=f"the state is that of completed step {step}")


def agree(reports: Sequence[RankReport | None], *, waited: float) -> LastSaveDecision:
    """Whether the ranks of a failed run save ``checkpoint-N`` together, from what each posted.

    A save under several ranks is a collective (barriers, gathers, the manifest commit), so it is safe only when
    every rank is there to join it, none inside another collective: every rank reported (it is out of training,
    in its ``on_train_error``), all at the same step, all after the same number of collectives (so the save's first
    barrier is not paired with a collective some rank never finished, as after a failure mid-backward), all
    eligible on their own.

    Args:
        reports: One entry per rank, in rank order: its report, or None when it has not posted one.
        waited: Seconds waited for the missing ones (named in the reason).

    Returns:
        ``save`` True only when all agree; otherwise the reason names the ranks that did not report or disagree.

    Example::

        from trainguard.checks.last_save import RankReport, agree
        r0 = RankReport(rank=0, step=3, phase="between", save=True, reason="ok", collectives=40)
        assert not agree([r0, None], waited=30).save          # rank 1 did not report
        assert agree([r0, RankReport(1, 3, "between", True, "ok", 40)], waited=30).save
    """
    posted = [r for r in reports if r is not None]
    step = posted[0].step if posted else 0

    def no(reason: str) -> LastSaveDecision:
        return LastSaveDecision(save=False, step=step, reason=reason)

    refusing = [r for r in posted if not r.save]
    if refusing:
        return no("; ".join(f"rank {r.rank} cannot save: {r.reason}" for r in refusing))
    missing = [rank for rank, r in enumerate(reports) if r is None]
    if missing:
        names = ", ".join(str(m) for m in missing)
        return no(
            f"rank(s) {names} did not report a failure within {waited:g} s: they are still training or inside a "
            "collective, and would never join the save"
        )
    steps = sorted({r.step for r in posted})
    if len(steps) > 1:
        where = ", ".join(f"rank {r.rank} at step {r.step}" for r in posted)
        return no(f"the ranks failed at different steps ({where}): no one step's state is on every rank")
    counts = {r.collectives for r in posted}
    if len(counts) > 1:
        where = ", ".join(f"rank {r.rank} after {r.collectives}" for r in posted)
        return no(
            f"the ranks failed after different numbers of collectives ({where}): one is unfinished, and the "
            "save's collectives would be paired with it"
        )
    return LastSaveDecision(
        save=True, step=step, reason=f"all {len(posted)} ranks failed after completed step {step} and may save it"
    )
