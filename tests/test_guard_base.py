"""The base every guard stands on: it finds its Trainer and can act before a resume loads anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trainguard.callbacks import GuardCallback
from trainguard.errors import PreflightError

from _rig import make_trainer, run_trainer

# Touches Trainer internals (finding the Trainer, the train() wrapper): also run on the oldest supported releases.
pytestmark = pytest.mark.compat


class _SeesResume(GuardCallback):
    guard_name = "sees_resume"

    def __init__(self, redirect: str | None = None) -> None:
        super().__init__()
        self.redirect = redirect
        self.calls: list[tuple[Any, int]] = []

    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> Any:
        # global_step is still 0: nothing of the checkpoint has been loaded yet
        self.calls.append((resume_from_checkpoint, trainer.state.global_step))
        return self.redirect if self.redirect is not None else resume_from_checkpoint


def test_guard_finds_its_trainer_at_init(output_dir: Path):
    guard = _SeesResume()
    trainer = make_trainer(output_dir, callbacks=[guard])
    assert guard.trainer is trainer


def test_before_train_runs_before_the_checkpoint_loads_and_can_redirect_the_resume(output_dir: Path):
    run_trainer(output_dir, max_steps=4, save_strategy="steps", save_steps=2)
    first, second = _SeesResume(), _SeesResume(redirect=str(output_dir / "checkpoint-2"))
    trainer = make_trainer(output_dir, callbacks=[first, second], max_steps=6, save_strategy="no")
    output = trainer.train(resume_from_checkpoint=True)
    assert first.calls == [(True, 0)]
    assert second.calls == [(True, 0)]
    # the redirect took effect: training resumed at step 2, not at the newest checkpoint (step 4)
    assert output.global_step == 6
    # the restored log history is checkpoint-2's (steps 1-2), then this run logs steps 3-6
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]


def test_one_wrapper_serves_every_guard(output_dir: Path):
    guards = [_SeesResume(), _SeesResume()]
    trainer = make_trainer(output_dir, callbacks=guards, max_steps=1)
    trainer.train()
    assert [g.calls for g in guards] == [[(None, 0)], [(None, 0)]]  # each called once, not once per wrapper


class _StopsThenRaises(GuardCallback):
    guard_name = "stops_then_raises"

    def __init__(self) -> None:
        super().__init__()
        self.ended = False

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.ended = True
        return super().on_train_end(args, state, control, **kwargs)

    def after_train(self, trainer: Any, output: Any) -> None:
        raise PreflightError("stopped on purpose", where={"step": output.global_step})


def test_after_train_raises_only_once_every_callback_has_finished(output_dir: Path):
    first, second = _StopsThenRaises(), _SeesResume()
    trainer = make_trainer(output_dir, callbacks=[first, second], max_steps=2)
    with pytest.raises(PreflightError, match="stopped on purpose") as info:
        trainer.train()
    assert first.ended  # the Trainer finished cleanly before the error reached the user
    assert info.value.where == {"step": 2}
