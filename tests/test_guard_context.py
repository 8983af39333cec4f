"""The guards on one Trainer talk through one GuardContext: alerter, background work, open runs, save decisions,
key figures and their order."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import TrainerCallback, TrainerControl

from trainguard import CrashLoopGuard, GracefulStop, HangWatchdog, NanGuard
from trainguard.callbacks import GuardCallback, _trainer_compat
from trainguard.callbacks._context import GuardContext, context_of
from trainguard.checks import crash_loop
from trainguard.errors import HangError
from trainguard.integrations.reporting import key_figures

from _rig import make_trainer

pytestmark = pytest.mark.compat  # the callback order and the train() wrapper touch the Trainer


def _guard_names(trainer: Any) -> list[str]:
    return [cb.guard_name for cb in trainer.callback_handler.callbacks if isinstance(cb, GuardCallback)]


# ------------------------------------------------------------------------------------------------ one per Trainer
def test_every_guard_on_a_trainer_shares_one_context_and_its_alerter(output_dir: Path):
    nan, watchdog = NanGuard(), HangWatchdog()
    trainer = make_trainer(output_dir, callbacks=[nan, watchdog])
    other = make_trainer(output_dir / "other", callbacks=[NanGuard()])
    assert nan.context is watchdog.context is context_of(trainer)
    assert context_of(other) is not context_of(trainer)
    # the one redaction choke point: both guards emit through the context's alerter
    assert nan.alerter is watchdog.alerter is context_of(trainer).alerter is not None


# ---------------------------------------------------------------------------------------------------- open runs
class _RecordsOpenRuns(TrainerCallback):
    def __init__(self, context: GuardContext) -> None:
        self.context = context
        self.seen: list[list[str]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.seen.append(self.context.open_runs.ids())
        return control


def test_the_watchdog_records_a_hang_abort_into_the_open_runs_of_its_own_trainer(output_dir: Path):
    guard, watchdog = CrashLoopGuard(), HangWatchdog()
    trainer = make_trainer(output_dir, callbacks=[guard, watchdog], max_steps=2, save_strategy="no")
    probe = _RecordsOpenRuns(context_of(trainer))
    trainer.add_callback(probe)
    bystander = context_of(make_trainer(output_dir / "bystander", callbacks=[CrashLoopGuard()]))
    bystander.open_runs.open("bystander-run", output_dir / "bystander", lambda: 0)
    trainer.train()
    assert probe.seen == [[guard.run_id], [guard.run_id]]  # open while training, in the context
    assert context_of(trainer).open_runs.ids() == []  # closed at the end

    # while the run is open, an abort is counted against it, and not against another Trainer's run
    context_of(trainer).open_runs.open("hung-run", output_dir, lambda: 7)
    report = SimpleNamespace(step=7, rank=0, error=lambda: HangError("step 8 hung", where={"step": 8}))
    watchdog._record_failure(report)  # type: ignore[arg-type]
    runs = {r.run_id: r for r in crash_loop.load_runs(output_dir)}
    assert runs["hung-run"].failures[0]["exception"].endswith("HangError")
    assert not (output_dir / "bystander" / crash_loop.CRASH_LOG).exists()


def test_a_hard_exit_marks_every_open_run_of_the_process_interrupted(output_dir: Path):
    first, second = GuardContext(), GuardContext()
    first.open_runs.open("a", output_dir / "a", lambda: 3)
    second.open_runs.open("b", output_dir / "b", lambda: 5)
    assert {"a", "b"} <= GuardContext.open_run_ids()
    GuardContext.mark_every_open_run_interrupted("second signal SIGTERM")
    [a] = crash_loop.load_runs(output_dir / "a", open_runs=GuardContext.open_run_ids())
    [b] = crash_loop.load_runs(output_dir / "b", open_runs=GuardContext.open_run_ids())
    assert (a.outcome, a.end["step"], b.outcome, b.end["step"]) == ("interrupted", 3, "interrupted", 5)
    assert first.open_runs.ids() == second.open_runs.ids() == []


# --------------------------------------------------------------------------------------------- save decisions
def test_a_save_veto_wins_over_a_request_of_the_same_event_in_either_order():
    for order in (("veto", "request"), ("request", "veto")):
        context, control = GuardContext(), TrainerControl()
        for what in order:
            if what == "veto":
                context.veto_save(control, "nan_guard", "non-finite loss", step=4, event="on_step_end")
            else:
                context.request_save(control, "graceful_stop", "SIGTERM", step=4, event="on_step_end")
        assert control.should_save is False, order
        decision = context.decision(4, "on_step_end")
        assert decision.save is False
        assert decision.vetoes == (("nan_guard", "non-finite loss"),)
        assert decision.requests == (("graceful_stop", "SIGTERM"),)


def test_a_veto_holds_for_its_own_event_only_and_stops_are_recorded():
    context, control = GuardContext(), TrainerControl()
    context.veto_save(control, "preflight_guard", "disk full", step=4, event="on_step_end")
    context.request_stop(control, "preflight_guard", "disk full", step=4, event="on_step_end")
    assert control.should_training_stop is True
    assert context.request_save(control, "graceful_stop", "SIGTERM", step=5, event="on_step_end") is True
    assert control.should_save is True
    assert context.decision(4, "on_step_end").stop is True
    assert context.decision(5, "on_step_end").save is True
    assert context.decision(6, "on_step_end").save is None  # the guards left it to the Trainer


class _VetoesAt(GuardCallback):
    guard_name = "vetoes_at"

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == self.step:
            self.veto_save(control, "test veto", step=state.global_step, event="on_step_end")
        return control


class _RequestsAt(GuardCallback):
    guard_name = "requests_at"

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == self.step:
            self.request_save(control, "test request", step=state.global_step, event="on_step_end")
        return control


def test_a_guard_earlier_in_the_list_vetoes_a_save_a_later_guard_requests(output_dir: Path):
    trainer = make_trainer(output_dir, callbacks=[_VetoesAt(2), _RequestsAt(2), _RequestsAt(3)], max_steps=4)
    trainer.train()
    saved = sorted(p.name for p in output_dir.glob("checkpoint-*"))
    assert "checkpoint-2" not in saved
    assert "checkpoint-3" in saved  # a request with no veto is honoured


# ------------------------------------------------------------------------------------------------------ order
def test_a_hand_built_list_in_a_wrong_order_is_put_into_the_working_order_with_a_log_line(
    output_dir: Path, caplog: pytest.LogCaptureFixture
):
    theirs = TrainerCallback()
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        trainer = make_trainer(output_dir, callbacks=[HangWatchdog(), theirs, NanGuard(), GracefulStop()])
    assert _guard_names(trainer) == ["graceful_stop", "nan_guard", "hang_watchdog"]
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("TrainerCallback") < names.index("NanGuard")  # a callback of the user's keeps its place
    [line] = [r.getMessage() for r in caplog.records if "run in this order" in r.getMessage()]
    assert "graceful_stop, nan_guard, hang_watchdog" in line
    assert "hang_watchdog, nan_guard, graceful_stop" in line


def test_a_list_in_the_working_order_is_left_as_it_is(output_dir: Path, caplog: pytest.LogCaptureFixture):
    guards = [GracefulStop(), NanGuard(), HangWatchdog()]
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        trainer = make_trainer(output_dir, callbacks=guards)
    assert [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GuardCallback)] == guards
    assert not [r for r in caplog.records if "run in this order" in r.getMessage()]


def test_a_guard_added_after_the_trainer_was_built_is_put_in_order_before_training(output_dir: Path):
    trainer = make_trainer(output_dir, callbacks=[NanGuard()], max_steps=1, save_strategy="no")
    trainer.add_callback(GracefulStop())
    trainer.train()
    assert _guard_names(trainer) == ["graceful_stop", "nan_guard"]


def test_every_guard_keyword_of_all_guards_is_its_guard_name():
    import importlib

    from trainguard.callbacks import _GUARDS

    for keyword, target in _GUARDS:
        module, name = target.split(":")
        assert getattr(importlib.import_module(module), name).guard_name == keyword


# ------------------------------------------------------------------------------------------- figures and seam
class _Figures(GuardCallback):
    guard_name = "figures"

    def key_figures(self) -> dict[str, Any]:
        return {"answer": 42}


def test_reporting_reads_each_guards_key_figures_through_the_context(output_dir: Path):
    trainer = make_trainer(output_dir, callbacks=[_Figures(), HangWatchdog()])
    figures = key_figures(trainer)
    assert figures == context_of(trainer).key_figures()
    assert figures["trainguard/figures/answer"] == 42
    assert isinstance(figures["trainguard/hang_watchdog/step_budget_s"], float)


def test_the_train_wrapper_is_one_removable_handle(output_dir: Path):
    trainer = make_trainer(output_dir, max_steps=1, save_strategy="no")
    calls: list[Any] = []

    def make(original: Any) -> Any:
        def train(resume_from_checkpoint: Any = None) -> str:
            calls.append(resume_from_checkpoint)
            return "wrapped"

        return train

    handle = _trainer_compat.wrap_train(trainer, make)
    assert _trainer_compat.wrap_train(trainer, make) is handle  # once per instance
    assert trainer.train(resume_from_checkpoint="x") == "wrapped"
    assert calls == ["x"]
    handle.remove()
    assert "train" not in vars(trainer)  # the class's own train() again
