"""``GracefulStop``: on SIGTERM/SIGUSR1 finish the step, save a checkpoint, stop, on every rank at the same step."""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any

from .. import distributed
from ..alerts import AlertSink, get_logger
from ..bounds import seconds, whole_number, yes_no
from ..checks import last_save as _last_save
from ..checks.nan.values import nonfinite_parameters
from ..redact import redact_text
from . import _trainer_compat
from ._base import GuardCallback
from ._context import GuardContext

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["GracefulStop"]

_Handler = Any  # what signal.signal returns: a callable, SIG_DFL, SIG_IGN or None

#: ``train()`` calls in this process: every rank runs the same script, so the n-th call is the same call on every
#: rank, and its store keys never meet those of an earlier call.
_TRAIN_CALLS = itertools.count()


def _store_prefix(call: int) -> str:
    # torchrun's agent store outlives a restart of the workers: the restart count keeps an earlier attempt's
    # reports from being read as this one's.
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"trainguard/last_save/{run}/{restart}/{call}"


def _signal_number(value: int | str | signal.Signals) -> int:
    if isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            raise ValueError(f"GracefulStop: unknown signal {value!r}") from None
    return int(value)


def _cpu_flag_group() -> Any:
    """A gloo process group for the per-step flag, so sharing it never waits on the GPU.

    ``any_rank`` on NCCL reduces a CUDA tensor and reads it back: a host-device sync every step that stops the CPU
    from queueing the next step's work. A 4-byte all-reduce over gloo on the CPU costs a network round trip and
    no sync. Creating a group is a collective: every rank calls this at the same event. Returns None to use the
    default group (already gloo), or False to fall back to ``any_rank`` where no gloo group can be made.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return False
    if dist.get_backend() == "gloo":
        return None
    try:
        return dist.new_group(backend="gloo")
    except Exception as exc:  # no gloo in this build: correct but slower
        get_logger().warning("GracefulStop: no gloo group for the stop flag (%s); using the default group", exc)
        return False


class GracefulStop(GuardCallback):
    """Turn a termination signal into "finish this step, save a checkpoint, stop" on every rank.

    The handler only records the signal (nothing else is safe inside a signal handler). At the next
    ``on_step_end`` every rank shares the flag with one tiny all-reduce on the CPU (only when there is more than
    one rank; over gloo, also when training uses NCCL, so it never waits on the GPU), so a signal that reached a
    single rank stops all of them after the same step. Then ``control.should_save`` and
    ``control.should_training_stop`` are set: the Trainer writes ``checkpoint-N`` through its normal path (so
    ``on_save`` fires and :class:`~trainguard.CheckpointVerifier` writes and checks the manifest), runs
    ``on_train_end`` and returns from ``train()`` normally; a script that ends there exits 0. :attr:`stopped` tells
    the script that the run was stopped rather than finished.

    A second signal while the stop is pending exits at once with status ``128 + signal number`` (143 for SIGTERM)
    via ``os._exit``: no cleanup that could hang in a collective; the run is recorded as interrupted, not crashed.

    Handlers are installed at ``on_train_begin`` (a signal during model or checkpoint loading keeps its previous
    behaviour) and the previous ones restored at ``on_train_end`` or when training raises.

    **The last good save** (``save_on_error=True``): when ``train()`` raises something that is not a numeric failure
    (an out-of-memory error in evaluation, a data error, a callback's exception) while the state in memory is known
    to be that of the last completed step (during a step's forward/backward, or between steps: logging, evaluation)
    and every weight is finite, ``checkpoint-N`` of that step is saved through the Trainer's own save and ``on_save``
    (so CheckpointVerifier commits it with its manifest) before the error propagates, unchanged. Never inside the
    optimizer update, never when the error came from a save or a full disk, never twice for one step: an alert
    says why. Recording the phase costs an attribute write per event.

    With several processes (DDP, FSDP; DeepSpeed is refused) a save is a collective, and a failing rank cannot
    call one (the others may be inside another collective, or gone). Each failing rank posts where it failed
    to the c10d store (a side channel, no collective) and waits up to ``save_on_error_wait`` seconds for every rank
    to post; the ranks save together only when all reported, at the same step, after the same number of
    collectives, all eligible (one atomic verdict in the store, so they all act alike). Otherwise nothing is saved,
    a warning names the ranks that did not report or disagreed, and the error propagates. A rank that does not
    fail never waits for anything; a rank whose own error rules out the save posts it and does not wait either.
    See ``docs/graceful-stop.md``.

    Args:
        signals: Signals to catch, as numbers or names. Default SIGTERM (Slurm, Kubernetes, torchrun, spot
            preemption) and SIGUSR1 (Slurm ``--signal=USR1@120`` warnings that leave SIGTERM free).
        sync_every: With several ranks, share the flag every this many steps (default 1: a preemption grace period
            can be shorter than a few steps; raise it when steps are very short).
        save_on_error: Save the last completed step when training raises (see above). Default True.
        save_on_error_wait: With several ranks, how many seconds a failing rank waits for the others to report
            their failure before giving up the save (default 30; the error propagates after at most this long).
        alert_sinks: Replace the default alert sinks.
        webhook_url: Also POST warnings and worse to this URL.

    Example::

        stop = trainguard.GracefulStop()
        trainer = Trainer(..., callbacks=[stop]); trainer.train()   # kill -TERM <pid>: saves and returns
    """

    guard_name = "graceful_stop"

    def __init__(
        self,
        *,
        signals: Iterable[int | str | signal.Signals] = (signal.SIGTERM, signal.SIGUSR1),
        sync_every: int = 1,
        save_on_error: bool = True,
        save_on_error_wait: float = 30.0,
        alert_sinks: list[AlertSink] | None = None,
        webhook_url: str | None = None,
    ) -> None:
        super().__init__(alert_sinks=alert_sinks, webhook_url=webhook_url)
        self.signals = tuple(dict.fromkeys(_signal_number(s) for s in signals))
        if not self.signals:
            raise ValueError("GracefulStop(signals=...) needs at least one signal")
        self.sync_every = whole_number("sync_every", sync_every, low=1, owner="GracefulStop")
        self.save_on_error = yes_no("save_on_error", save_on_error, owner="GracefulStop")
        self.save_on_error_wait = seconds(
            "save_on_error_wait", save_on_error_wait, allow_zero=True, owner="GracefulStop"
        )
        self._store_prefix = _store_prefix(-1)
        #: Where in the loop training is (one of ``trainguard.checks.last_save.PHASES``), from the events.
        self._phase: str = "idle"
        #: What the last failed ``train()`` decided about saving (None before any failure).
        self.last_save: _last_save.LastSaveDecision | None = None
        #: The folder saved on the way out of the last failed ``train()``, or None.
        self.saved_on_error: str | None = None
        self._previous: dict[int, _Handler] = {}
        self._received: int | None = None
        self._world_size = 1
        self._flag_group: Any = None
        #: The signal that stopped training (a ``signal.Signals``), or None when the run was not stopped by one.
        self.stop_signal: signal.Signals | None = None
        #: The step after which training stopped and the checkpoint was saved.
        self.stopped_at_step: int | None = None

    @property
    def stopped(self) -> bool:
        """True when this run was stopped by a signal (on every rank, also those that did not receive it)."""
        return self.stopped_at_step is not None

    # --------------------------------------------------------------------------------------------- handlers
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._received is None:
            self._received = signum
            return
        # Second signal: the user (or the scheduler) wants out now.
        try:
            os.write(2, f"\ntrainguard: second signal {signal.Signals(signum).name}: exiting at once\n".encode())
            GuardContext.mark_every_open_run_interrupted(f"second signal {signal.Signals(signum).name}")
        finally:
            os._exit(128 + signum)

    def _install(self) -> None:
        if self._previous:
            return  # already installed (auto_find_batch_size re-runs on_train_begin)
        if threading.current_thread() is not threading.main_thread():
            self.alert(
                "warning",
                "GracefulStop is inactive: training runs outside the main thread, where Python cannot install "
                "signal handlers",
            )
            return
        jit = []
        for signum in self.signals:
            previous = signal.signal(signum, self._handle)
            self._previous[signum] = previous
            if signum == signal.SIGTERM and _trainer_compat.is_jit_sigterm_handler(previous):
                jit.append(signum)
        if jit:
            # transformers' enable_jit_checkpoint installed its own SIGTERM handler in Trainer.__init__. Ours
            # replaces it while training: the save goes through on_save (so it is verified) at a step boundary
            # agreed by every rank, and only once. JIT restores its original handler at on_train_end.
            get_logger().info("GracefulStop replaces the enable_jit_checkpoint SIGTERM handler during training")
        self._received = None

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            try:
                if signal.getsignal(signum) == self._handle:
                    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            except (ValueError, OSError):  # not the main thread any more: nothing we can restore
                pass
        self._previous.clear()

    # ------------------------------------------------------------------------------------------------ events
    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> Any:
        self._phase = "idle"
        self.last_save = None
        self.saved_on_error = None
        self._store_prefix = _store_prefix(next(_TRAIN_CALLS))
        return resume_from_checkpoint

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        self._phase = "between"
        self.stop_signal = None
        self.stopped_at_step = None
        self._world_size = distributed.world_size()  # read once: on_step_end must cost next to nothing
        if self._world_size > 1 and self._flag_group is None:
            self._flag_group = _cpu_flag_group()
        self._install()
        return control

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        self._phase = "step"
        return control

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        self._phase = "update"
        return control

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        self._phase = "after_update"
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        self._phase = "between"
        local = self._received is not None
        if self._world_size > 1:
            if state.global_step % self.sync_every:
                return control
            stop = self._share(local)
        else:
            stop = local
        if not stop or self.stopped_at_step is not None:
            return control
        step = int(state.global_step)
        # A scheduled evaluation would spend the preemption grace period, and with save_strategy="best" its result
        # would overwrite should_save: the stop saves first; evaluate the checkpoint after the restart.
        self.request_save(control, "stop signal", step=step, event="on_step_end", skip_evaluation=True)
        self.request_stop(control, "stop signal", step=step, event="on_step_end")
        self.stopped_at_step = int(state.global_step)
        received = self._received
        self.stop_signal = signal.Signals(received) if received is not None else None
        name = f"{self.stop_signal.name} received" if self.stop_signal is not None else "another rank got a stop signal"
        self.alert(
            "warning",
            f"{name}: saving checkpoint-{state.global_step} and stopping after step {state.global_step}; "
            "a second signal exits at once",
            step=state.global_step,
            evidence={"signal": name, "output_dir": str(args.output_dir)},
        )
        return control

    def _share(self, local: bool) -> bool:
        if self._flag_group is False:
            return distributed.any_rank(local)
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._flag_group)
        return bool(flag.item())

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        self._phase = "ended"
        self._restore()
        return super().on_train_end(args, state, control, **kwargs)

    def on_train_error(self, trainer: Any, exc: BaseException) -> None:
        self._restore()
        phase, self._phase = self._phase, "idle"
        if not self.save_on_error or trainer is None:
            return
        try:
            self._save_last_good(trainer, exc, phase)
        except Exception as err:  # the training error is what the user must see; the save's failure is logged
            self.alert(
                "error",
                f"the last good save after {type(exc).__name__} failed ({type(err).__name__}: {err}); the original "
                "error propagates",
                step=int(trainer.state.global_step),
                evidence={"error": type(exc).__name__, "save_error": f"{type(err).__name__}: {err}"},
            )

    # ------------------------------------------------------------------------------------- last good save
    def _save_last_good(self, trainer: Any, exc: BaseException, phase: str) -> None:
        step = int(trainer.state.global_step)
        control = trainer.control
        folder = str(_trainer_compat.checkpoint_layout(trainer).folder_for(step))
        world_size = distributed.world_size()
        decision = _last_save.decide(
            exc,
            phase,
            step=step,
            should_save=bool(getattr(control, "should_save", False)),
            should_evaluate=bool(getattr(control, "should_evaluate", False)),
            existing=_last_save.checkpoint_status(folder),
            world_size=world_size,
            engine=_trainer_compat.engine_layout(trainer),
        )
        if decision.save:
            bad = nonfinite_parameters(trainer.model.named_parameters())
            if bad:
                decision = _last_save.LastSaveDecision(
                    save=False, step=step, reason=f"non-finite weights in memory ({', '.join(bad)})"
                )
        if world_size > 1:
            decision = self._agree(decision, phase)
        self.last_save = decision
        # Redact before cutting: a secret cut in two is no longer recognised by the alert's own redaction.
        error = redact_text(f"{type(exc).__name__}: {exc}")[:300]
        evidence = {"error": type(exc).__name__, "phase": phase, "reason": decision.reason, "checkpoint": folder}
        if not decision.save:
            self.alert(
                "warning" if world_size > 1 else "info",
                f"training raised {error}; no last save of step {step}: {decision.reason}",
                step=step,
                evidence=evidence,
            )
            return
        get_logger().warning(
            "[graceful_stop] training raised %s after step %d; saving checkpoint-%d before it propagates",
            type(exc).__name__,
            step,
            step,
        )
        try:
            saved = _trainer_compat.save_checkpoint_as_at_save_step(trainer)
            self.wait_for_other_guards()  # the manifest is written before the error reaches the caller
        except BaseException as err:
            if world_size > 1:
                self._post_done(redact_text(f"failed: {type(err).__name__}: {err}")[:300])
            raise
        if world_size > 1:
            # Only the writing rank commits the manifest, after the others have left the save: every rank waits
            # for every other's "done" so the error reaches no caller before the checkpoint is committed.
            problem = self._post_done("done") or self._wait_done(world_size)
            if problem is not None:
                self.alert(
                    "error",
                    f"training raised {error}; the ranks saved checkpoint-{step} together but {problem}: verify it "
                    "(trainguard verify) before resuming from it",
                    step=step,
                    evidence={**evidence, "problem": problem},
                )
                return
        self.saved_on_error = saved
        self.alert(
            "warning",
            f"training raised {error}; saved checkpoint-{step} (the last completed step) before the error "
            f"propagates: resume with resume_from_checkpoint={saved!r}",
            step=step,
            evidence=evidence,
        )

    def _post_done(self, outcome: str) -> str | None:
        """Tell the other ranks how this rank's part of the save ended; a sentence when the store failed."""
        try:
            distributed.store_set(f"{self._store_prefix}/done{distributed.rank()}", outcome)
        except Exception as err:
            return f"the c10d store failed ({type(err).__name__}: {err})"
        return None

    def _wait_done(self, world_size: int) -> str | None:
        """Wait up to ``save_on_error_wait`` for every rank's part of the save (the writing rank's commit among
        them); None when all are done, otherwise what is missing or failed."""
        started, pause = time.monotonic(), 0.005
        outcomes: dict[int, str] = {}
        try:
            while True:
                for other in range(world_size):
                    if other not in outcomes:
                        text = distributed.store_get(f"{self._store_prefix}/done{other}")
                        if text is not None:
                            outcomes[other] = text
                failed = {r: o for r, o in outcomes.items() if o != "done"}
                if failed:
                    return "; ".join(f"rank {r}'s part of the save {o}" for r, o in sorted(failed.items()))
                if len(outcomes) == world_size:
                    return None
                waited = time.monotonic() - started
                if waited >= self.save_on_error_wait:
                    missing = ", ".join(str(r) for r in range(world_size) if r not in outcomes)
                    return (
                        f"rank(s) {missing} did not confirm their part (the writing rank's is the commit) within "
                        f"{self.save_on_error_wait:g} s"
                    )
                time.sleep(min(pause, self.save_on_error_wait - waited))
                pause = min(pause * 2, 0.1)
        except Exception as err:
            return f"the c10d store failed ({type(err).__name__}: {err})"

    def _agree(self, mine: _last_save.LastSaveDecision, phase: str) -> _last_save.LastSaveDecision:
        """This rank's decision made the ranks' common one, through the c10d store (never a collective)."""
        rank, world_size, prefix = distributed.rank(), distributed.world_size(), self._store_prefix
        report = _last_save.RankReport(
            rank=rank,
            step=mine.step,
            phase=phase,
            save=mine.save,
            reason=mine.reason,
            collectives=distributed.collective_count(),
        )
        try:
            distributed.store_set(f"{prefix}/rank{rank}", report.to_json())
            if not mine.save:
                return mine  # posted: the ranks waiting for it read the refusal and stop waiting
            reports = self._collect(report, world_size)
            proposal = _last_save.agree(reports, waited=self.save_on_error_wait)
            # The first rank to propose wins, atomically: a rank that timed out a moment before the last report
            # arrived and one that saw it cannot act differently (one saving alone would wait in the save's barrier).
            text = json.dumps({"save": proposal.save, "reason": proposal.reason})
            verdict = json.loads(distributed.store_compare_set(f"{prefix}/verdict", text))
        except Exception as err:  # the store is gone (its host died): no agreement, so no save
            return _last_save.LastSaveDecision(
                save=False,
                step=mine.step,
                reason=f"the ranks could not agree through the c10d store ({type(err).__name__}: {err})",
            )
        return _last_save.LastSaveDecision(save=bool(verdict["save"]), step=mine.step, reason=str(verdict["reason"]))

    def _collect(self, report: _last_save.RankReport, world_size: int) -> list[_last_save.RankReport | None]:
        """The reports of every rank in rank order (None for a rank that did not report), waiting up to
        ``save_on_error_wait`` for the missing ones; stops early when one refuses or a verdict is already in."""
        prefix = self._store_prefix
        reports: list[_last_save.RankReport | None] = [None] * world_size
        reports[report.rank] = report
        started = time.monotonic()
        pause = 0.005
        while True:
            for other in range(world_size):
                if reports[other] is None:
                    text = distributed.store_get(f"{prefix}/rank{other}")
                    if text is not None:
                        reports[other] = _last_save.RankReport.from_json(text)
            done = all(r is not None for r in reports) or any(r is not None and not r.save for r in reports)
            waited = time.monotonic() - started
            if done or waited >= self.save_on_error_wait or distributed.store_get(f"{prefix}/verdict") is not None:
                return reports
            time.sleep(min(pause, max(0.0, self.save_on_error_wait - waited)))
            pause = min(pause * 2, 0.1)

    def summary(self) -> str:
        names = "/".join(signal.Signals(s).name for s in self.signals)
        if self.stopped_at_step is not None:
            return (
                f"stopped by {self.stop_signal.name if self.stop_signal else 'a signal'} after step "
                f"{self.stopped_at_step}, checkpoint saved"
            )
        if self.saved_on_error is not None:
            return f"watched {names}; training failed: saved {os.path.basename(self.saved_on_error)} on the way out"
        return f"watched {names}; no stop requested"
