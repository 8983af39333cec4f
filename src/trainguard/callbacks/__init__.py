"""Trainer callbacks: thin adapters from Trainer events to trainguard's checks. One module per callback."""

from __future__ import annotations

from typing import Any

from ._base import GuardCallback

__all__ = ["GuardCallback", "all_guards"]

# Guard classes in the order they should run, as (keyword, "module:Class"); each keyword is the class's guard_name.
# all_guards() builds one of each; a hand-built list is put into this order when the Trainer is built
# (_base.put_in_order). Save requests and vetoes go through the Trainer's GuardContext, where a veto wins whatever
# the order; the order still matters for what a guard reads and when it acts, as said below.
_GUARDS: tuple[tuple[str, str], ...] = (
    # First: refuse at Trainer(...) before any other guard does work or writes into an output_dir another run owns.
    ("run_lock", "trainguard.callbacks.run_lock:RunLock"),
    # Refuse a start that would repeat the same crash, before anything loads; records how each run ends.
    ("crash_loop_guard", "trainguard.callbacks.crash_loop_guard:CrashLoopGuard"),
    # Sets control.should_save at on_step_end on a stop signal: guards that inspect or veto a pending save
    # (free-space check, NaN guard) must come after it so they see that save.
    # Before checkpoint_verifier: its last good save on a failed train() must run before
    # CheckpointVerifier.on_train_error shuts down its committer.
    ("graceful_stop", "trainguard.callbacks.graceful_stop:GracefulStop"),
    # Before step 1: refuse a run whose checkpoints cannot fit on disk (or short of RAM); before each save
    # (including a stop-signal save set above): cancel a save that cannot fit and stop cleanly.
    ("preflight_guard", "trainguard.callbacks.preflight_guard:PreflightGuard"),
    # Redirects resume_from_checkpoint=True to the newest verified checkpoint (setting failed ones aside) before the
    # guards below read the checkpoint; after run_lock, so it never renames inside an output_dir another run owns.
    ("checkpoint_verifier", "trainguard.callbacks.checkpoint_verifier:CheckpointVerifier"),
    # Run identity: refuse in before_train, before the checkpoint loads. After any guard that redirects the resume
    # (checkpoint verification), so they check the checkpoint that will actually be loaded.
    ("dataset_guard", "trainguard.callbacks.dataset_guard:DatasetGuard"),
    ("lora_config_guard", "trainguard.callbacks.lora_config_guard:LoraConfigGuard"),
    # Refuse in before_train a tokenized train set with rows that teach nothing; needs nothing from the checkpoint.
    ("data_guard", "trainguard.callbacks.data_guard:DataGuard"),
    # Stops a LoRA run whose adapters get no gradient (first optimizer step) or never move (check_step), raising from
    # on_pre_optimizer_step / on_step_end; before nan_guard and hang_watchdog so a stopped step schedules no save or
    # budget; needs nothing from the before_train guards above.
    ("adapter_guard", "trainguard.callbacks.adapter_guard:AdapterGuard"),
    # Judges each step's loss and grad norm before its update (skip drops it); a rollback clears should_save at
    # on_step_end, so after every guard that schedules a save, and before nan_guard and hang_watchdog, which read
    # the final flags.
    ("spike_guard", "trainguard.callbacks.spike_guard:SpikeGuard"),
    # Vetoes the save of a non-finite step and stops every rank at the same step: after every guard that schedules
    # a save (graceful_stop, preflight_guard), before hang_watchdog, which must see the save it cancelled.
    ("nan_guard", "trainguard.callbacks.nan_guard:NanGuard"),
    # Last: its on_step_end reads the final should_evaluate/should_save flags (after every guard that sets or
    # clears them) to pick the budget of the evaluation or save that follows.
    ("hang_watchdog", "trainguard.callbacks.hang_watchdog:HangWatchdog"),
    # After every guard (events at train begin and end only): publishes what they established (fingerprints,
    # lineage, budgets) to the W&B config, MLflow tags and TensorBoard.
    ("run_reporter", "trainguard.callbacks.run_reporter:RunReporter"),
)


def all_guards(**overrides: Any) -> list[GuardCallback]:
    """One of every trainguard guard, with careful defaults, in a working order.

    Settings can also come without code (see :mod:`trainguard.config` and docs/integrations.md): ``TRAINGUARD_*``
    environment variables and a ``trainguard.toml`` file. For each option the first of these wins: ``overrides``,
    the environment, the file, the guard's default. ``TRAINGUARD_DISABLE=1`` makes this return no guards.

    Args:
        **overrides: For each guard, by its keyword (``checkpoint_verifier=``, ...): a dict of options for it,
            an instance to use as is, or ``False`` to leave it out.

    Raises:
        TypeError: A keyword names no guard.
        trainguard.config.ConfigError: An environment variable or the configuration file names an unknown guard or
            option, or holds a value the guard refuses.

    Example::

        trainer = Trainer(..., callbacks=trainguard.all_guards())
        trainer = Trainer(..., callbacks=trainguard.all_guards(checkpoint_verifier=False))
    """
    from ..config import build_guards
    from ..errors import TrainGuardError, at_call_site

    try:
        return build_guards(_GUARDS, overrides, guard_type=GuardCallback)
    except TrainGuardError as err:  # a ConfigError names the file, line and option: the frames below add nothing
        raise at_call_site(err)  # noqa: B904 - trainguard refused: the message below says why
