"""GracefulStop's last good save: a run dying of an OOM, a data error or a callback's exception leaves a committed
checkpoint of its last completed step; never from inside the update or a save, never on NaN, never twice."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Trainer, TrainerCallback

import trainguard
from trainguard.alerts import Alert
from trainguard.callbacks.checkpoint_verifier import CheckpointVerifier
from trainguard.callbacks.graceful_stop import GracefulStop
from trainguard.callbacks.nan_guard import NanGuard
from trainguard.checks import last_save

from _rig import make_lm_dataset, make_tiny_llama, make_trainer, training_args

# Touches Trainer internals: a checkpoint save through _save_checkpoint and on_save.
# Also run on the oldest supported releases (.ci/run).
pytestmark = pytest.mark.compat


class ListSink:
    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def send(self, alert: Alert) -> None:
        self.alerts.append(alert)


def oom(where: str) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 20.00 GiB ({where})")


class RaiseAt(TrainerCallback):
    """Raises ``error`` from event ``event`` when ``state.global_step == step``."""

    def __init__(self, event: str, step: int, error: BaseException) -> None:
        self.step, self.error = step, error
        setattr(self, event, self._maybe_raise)

    def _maybe_raise(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise self.error


class FirstStep(TrainerCallback):
    """Records ``state.global_step`` at the first ``on_step_begin``."""

    def __init__(self) -> None:
        self.first: int | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.first is None:
            self.first = int(state.global_step)


def guards(**kwargs: Any) -> tuple[GracefulStop, CheckpointVerifier, ListSink]:
    sink = ListSink()
    return GracefulStop(alert_sinks=[sink], **kwargs), CheckpointVerifier(background=False), sink


def checkpoints(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.glob("checkpoint-*"))


def eval_args(**overrides: Any) -> dict[str, Any]:
    return {
        "max_steps": 6,
        "eval_strategy": "steps",
        "eval_steps": 3,
        "save_strategy": "steps",
        "save_steps": 100,
        "per_device_eval_batch_size": 4,
        **overrides,
    }


# ------------------------------------------------------------------------------------------ saves it makes
def test_an_oom_in_evaluation_leaves_a_committed_verified_checkpoint_of_the_last_step_that_resumes(
    output_dir: Path,
) -> None:
    stop, verifier, sink = guards()
    error = oom("compute_metrics")

    def compute_metrics(prediction: Any) -> dict[str, float]:
        raise error

    trainer = make_trainer(
        output_dir,
        callbacks=[stop, verifier],
        eval_dataset=make_lm_dataset(8, seed=1),
        **eval_args(),
    )
    trainer.compute_metrics = compute_metrics
    with pytest.raises(torch.OutOfMemoryError) as caught:
        trainer.train()
    assert caught.value is error  # the original exception reached the caller, unchanged
    assert checkpoints(output_dir) == ["checkpoint-3"]
    assert stop.saved_on_error == str(output_dir / "checkpoint-3")
    report = trainguard.verify_checkpoint(output_dir / "checkpoint-3")  # committed, manifest matches
    assert report.ok, report
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert any("saved checkpoint-3" in a.message and a.level == "warning" for a in sink.alerts)

    # resuming from it continues at step 3
    first = FirstStep()
    resumed = make_trainer(output_dir, callbacks=[first, CheckpointVerifier(background=False)], max_steps=5)
    resumed.train(resume_from_checkpoint=str(output_dir / "checkpoint-3"))
    assert first.first == 3 and resumed.state.global_step == 5


def test_with_all_guards_an_oom_in_evaluation_leaves_a_verified_checkpoint(output_dir: Path) -> None:
    trainer = make_trainer(
        output_dir,
        callbacks=[*trainguard.all_guards(hang_watchdog=False), RaiseAt("on_prediction_step", 3, oom("eval"))],
        eval_dataset=make_lm_dataset(8, seed=1),
        **eval_args(),
    )
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train()
    assert checkpoints(output_dir) == ["checkpoint-3"]
    assert trainguard.verify_checkpoint(output_dir / "checkpoint-3").ok
    resumed = make_trainer(output_dir, callbacks=trainguard.all_guards(hang_watchdog=False), max_steps=5)
    resumed.train(resume_from_checkpoint=True)  # CheckpointVerifier and DatasetGuard accept it
    assert resumed.state.global_step == 5


@pytest.mark.parametrize("event", ["on_prediction_step", "on_evaluate"])
def test_an_oom_raised_by_a_callback_during_evaluation_saves_the_last_step(output_dir: Path, event: str) -> None:
    stop, verifier, _ = guards()
    trainer = make_trainer(
        output_dir,
        callbacks=[stop, verifier, RaiseAt(event, 3, oom(event))],
        eval_dataset=make_lm_dataset(8, seed=1),
        **eval_args(),
    )
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train()
    assert checkpoints(output_dir) == ["checkpoint-3"]
    assert trainguard.verify_checkpoint(output_dir / "checkpoint-3").ok


def test_an_oom_in_evaluation_at_a_save_step_saves_because_the_save_had_not_begun(output_dir: Path) -> None:
    # eval and save both due at step 3: evaluation runs first, so control.should_evaluate is still set
    stop, verifier, _ = guards()
    trainer = make_trainer(
        output_dir,
        callbacks=[stop, verifier, RaiseAt("on_prediction_step", 3, oom("eval"))],
        eval_dataset=make_lm_dataset(8, seed=1),
        **eval_args(save_steps=3),
    )
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train()
    assert checkpoints(output_dir) == ["checkpoint-3"]
    assert trainguard.verify_checkpoint(output_dir / "checkpoint-3").ok


class FailingRows(torch.utils.data.Dataset):  # type: ignore[misc]
    """A map-style dataset whose rows from ``bad_from`` on raise, as a corrupt shard would."""

    def __init__(self, rows: Any, bad_from: int) -> None:
        self.rows, self.bad_from = rows, bad_from

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        if index >= self.bad_from:
            raise ValueError(f"corrupt row {index}")
        return self.rows[index]


def test_a_data_error_saves_the_last_completed_step(output_dir: Path) -> None:
    stop, verifier, _ = guards()
    completed: list[int] = []

    class Completed(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            completed.append(int(state.global_step))

    # batch size 2, no shuffling: rows 6.. belong to step 4
    trainer = make_trainer(
        output_dir,
        callbacks=[stop, verifier, Completed()],
        train_dataset=FailingRows(make_lm_dataset(), bad_from=6),
        max_steps=8,
        save_strategy="steps",
        save_steps=100,
    )
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    with pytest.raises(ValueError, match="corrupt row 6"):
        trainer.train()
    # accelerate's loader reads one batch ahead: step 4's rows are read while step 3's batch is handed out, so the
    # error surfaces after step 2, and step 2 is the last completed step
    assert completed == [1, 2] and trainer.state.global_step == 2
    assert checkpoints(output_dir) == ["checkpoint-2"]
    assert trainguard.verify_checkpoint(output_dir / "checkpoint-2").ok
    assert stop.last_save is not None and stop.last_save.step == 2


def test_a_callback_error_in_a_step_saves_the_previous_step(output_dir: Path) -> None:
    # on_step_begin of step 4: the forward/backward phase; weights and optimizer are still step 3's
    stop, verifier, _ = guards()
    trainer = make_trainer(
        output_dir,
        callbacks=[stop, verifier, RaiseAt("on_step_begin", 3, RuntimeError("user callback bug"))],
        max_steps=6,
        save_strategy="steps",
        save_steps=100,
    )
    with pytest.raises(RuntimeError, match="user callback bug"):
        trainer.train()
    assert checkpoints(output_dir) == ["checkpoint-3"]
    assert stop.last_save is not None and stop.last_save.save


# ------------------------------------------------------------------------------------- saves it refuses
class ExplodingAdamW(torch.optim.AdamW):
    """Raises from inside its 4th update, after changing part of the weights (as a fused update that died would)."""

    calls = 0

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        ExplodingAdamW.calls += 1
        if ExplodingAdamW.calls == 4:
            with torch.no_grad():
                self.param_groups[0]["params"][0].add_(1.0)
            raise oom("optimizer.step")
        return super().step(closure)


def test_an_error_inside_the_optimizer_update_saves_nothing(output_dir: Path) -> None:
    stop, verifier, sink = guards()
    ExplodingAdamW.calls = 0
    model = make_tiny_llama()
    trainer = Trainer(
        model=model,
        args=training_args(output_dir, max_steps=6, save_strategy="steps", save_steps=100),
        train_dataset=make_lm_dataset(),
        callbacks=[stop, verifier],
        optimizers=(ExplodingAdamW(model.parameters(), lr=1e-3), None),
    )
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train()
    assert checkpoints(output_dir) == []
    assert stop.last_save is not None and not stop.last_save.save
    assert "optimizer update" in stop.last_save.reason
    assert any("no last save of step 3" in a.message for a in sink.alerts)


def test_a_nonfinite_error_from_nan_guard_saves_nothing(output_dir: Path) -> None:
    stop, verifier, _ = guards()
    model = make_tiny_llama()
    calls = [0]

    def nan_logits(module: Any, inputs: Any, output: Any) -> Any:
        if module.training:
            calls[0] += 1
            return output * float("nan") if calls[0] == 4 else output
        return output

    model.lm_head.register_forward_hook(nan_logits)
    trainer = make_trainer(
        output_dir,
        model=model,
        callbacks=[stop, verifier, NanGuard(alert_sinks=[])],
        max_steps=6,
        save_strategy="steps",
        save_steps=100,
    )
    with pytest.raises(trainguard.NonFiniteError):
        trainer.train()
    assert checkpoints(output_dir) == []
    assert stop.last_save is not None and "numeric failure" in stop.last_save.reason


def test_nonfinite_weights_in_memory_are_never_saved(output_dir: Path) -> None:
    stop, verifier, _ = guards()

    class PoisonThenOom(TrainerCallback):
        def on_prediction_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            with torch.no_grad():
                model.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
            raise oom("eval")

    trainer = make_trainer(
        output_dir,
        callbacks=[stop, verifier, PoisonThenOom()],
        eval_dataset=make_lm_dataset(8, seed=1),
        **eval_args(),
    )
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train()
    assert checkpoints(output_dir) == []
    assert stop.last_save is not None and "non-finite weights" in stop.last_save.reason


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("serialization failed")],
    ids=["full-disk", "other-save-error"],
)
def test_an_error_raised_inside_a_save_is_never_followed_by_a_second_save(output_dir: Path, error: Exception) -> None:
    stop, verifier, _ = guards()
    trainer = make_trainer(output_dir, callbacks=[stop, verifier], max_steps=6, save_strategy="steps", save_steps=3)
    calls: list[str] = []

    def failing_save_model(output: str | None = None, _internal_call: bool = False) -> None:
        calls.append(str(output))
        raise error

    trainer.save_model = failing_save_model
    with pytest.raises(type(error)) as caught:
        trainer.train()
    assert caught.value is error
    assert calls == [str(output_dir / "checkpoint-3")]  # the Trainer's own attempt only
    assert stop.last_save is not None and not stop.last_save.save
    assert not (output_dir / "checkpoint-3" / "trainguard-manifest.sha256").exists()


def test_an_error_after_a_committed_save_of_the_step_does_not_save_it_again(output_dir: Path) -> None:
    stop, verifier, sink = guards()
    trainer = make_trainer(
        output_dir,
        callbacks=[stop, verifier, RaiseAt("on_save", 3, RuntimeError("a logger's on_save failed"))],
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
    )
    with pytest.raises(RuntimeError, match="on_save failed"):
        trainer.train()
    verifier.wait()
    assert checkpoints(output_dir) == ["checkpoint-3"]
    assert stop.last_save is not None and "already saved and committed" in stop.last_save.reason
    assert any("already saved" in a.message for a in sink.alerts)


def test_save_on_error_false_saves_nothing(output_dir: Path) -> None:
    stop, verifier, _ = guards(save_on_error=False)
    trainer = make_trainer(
        output_dir,
        callbacks=[stop, verifier, RaiseAt("on_prediction_step", 3, oom("eval"))],
        eval_dataset=make_lm_dataset(8, seed=1),
        **eval_args(),
    )
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train()
    assert checkpoints(output_dir) == [] and stop.last_save is None


def test_a_failing_last_save_is_logged_and_never_replaces_the_original_error(
    output_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop, verifier, sink = guards()
    from trainguard.callbacks import _trainer_compat

    def broken(trainer: Any) -> str:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(_trainer_compat, "save_checkpoint_as_at_save_step", broken)
    error = oom("eval")
    trainer = make_trainer(
        output_dir,
        callbacks=[stop, verifier, RaiseAt("on_prediction_step", 3, error)],
        eval_dataset=make_lm_dataset(8, seed=1),
        **eval_args(),
    )
    with pytest.raises(torch.OutOfMemoryError) as caught:
        trainer.train()
    assert caught.value is error
    assert any(a.level == "error" and "last good save" in a.message for a in sink.alerts)


def test_a_normal_run_raises_no_alert_and_saves_only_what_the_trainer_schedules(output_dir: Path) -> None:
    stop, verifier, sink = guards()
    trainer = make_trainer(
        output_dir, callbacks=[stop, verifier], eval_dataset=make_lm_dataset(8, seed=1), **eval_args(save_steps=3)
    )
    trainer.train()
    assert checkpoints(output_dir) == ["checkpoint-3", "checkpoint-6"]
    assert sink.alerts == [] and stop.last_save is None and stop._phase == "ended"


# --------------------------------------------------------------------------------------------- the rules
@pytest.mark.parametrize(
    ("phase", "should_save", "should_evaluate", "saves"),
    [
        ("step", False, False, True),
        ("between", False, False, True),
        ("between", True, True, True),  # evaluating before a due save
        ("between", True, False, False),  # a due save with evaluation over: maybe inside the save
        ("update", False, False, False),
        ("after_update", False, False, False),
        ("idle", False, False, False),
        ("ended", False, False, False),
    ],
)
def test_the_phase_decides_whether_the_state_is_one_completed_steps(
    phase: str, should_save: bool, should_evaluate: bool, saves: bool
) -> None:
    decision = last_save.decide(
        MemoryError(), phase, step=3, should_save=should_save, should_evaluate=should_evaluate, existing="absent"
    )
    assert decision.save is saves, decision.reason


def test_a_storage_error_anywhere_in_the_chain_rules_out_the_save() -> None:
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("could not write optimizer.pt") from inner
    except RuntimeError as outer:
        reason = last_save.error_reason(outer)
    assert reason is not None and "EDQUOT" in reason
    assert last_save.error_reason(KeyboardInterrupt()) is not None
    assert last_save.error_reason(trainguard.HangError("no progress")) is not None


def test_deepspeed_or_step_zero_never_saves_and_several_processes_need_every_ranks_agreement() -> None:
    common: dict[str, Any] = {"step": 3, "should_save": False, "should_evaluate": True, "existing": "absent"}
    on_two = last_save.decide(MemoryError(), "between", world_size=2, **common)
    assert on_two.save and "every rank to agree" in on_two.reason  # this rank's half; agree() decides
    assert last_save.decide(MemoryError(), "between", world_size=2, engine="fsdp_sharded", **common).save
    assert not last_save.decide(MemoryError(), "between", engine="fsdp_full", **common).save  # one process: untested
    assert not last_save.decide(MemoryError(), "between", world_size=2, engine="deepspeed", **common).save
    assert not last_save.decide(MemoryError(), "between", **{**common, "step": 0}).save


def test_a_failed_collective_rules_out_the_save() -> None:
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:11673.")
    reason = last_save.error_reason(gloo)
    assert reason is not None and reason.startswith("a collective failed")
    dist_error = torch.distributed.DistBackendError("NCCL watchdog timeout")
    assert (last_save.error_reason(dist_error) or "").startswith("a collective failed")
    assert last_save.error_reason(RuntimeError("shape mismatch in the collate function")) is None


def report(rank: int, step: int = 3, save: bool = True, collectives: int | None = 40) -> last_save.RankReport:
    return last_save.RankReport(rank, step, "between", save, "ok" if save else "inside the update", collectives)


@pytest.mark.parametrize(
    ("reports", "saves", "says"),
    [
        ([report(0), report(1)], True, "all 2 ranks failed after completed step 3"),
        ([report(0), None], False, "rank(s) 1 did not report a failure within 30 s"),
        ([None, report(1), None], False, "rank(s) 0, 2 did not report"),
        ([report(0), report(1, save=False)], False, "rank 1 cannot save: inside the update"),
        ([report(0), report(1, save=False), None], False, "rank 1 cannot save"),  # a refusal needs no wait
        ([report(0), report(1, step=4)], False, "different steps (rank 0 at step 3, rank 1 at step 4)"),
        ([report(0), report(1, collectives=41)], False, "different numbers of collectives"),
        ([report(0, collectives=None), report(1, collectives=None)], True, "all 2 ranks"),
    ],
    ids=["all-agree", "one-missing", "two-missing", "one-refuses", "refusal-first", "steps", "collectives", "no-seq"],
)
def test_the_ranks_save_together_only_when_every_rank_reported_the_same_step_and_may_save(
    reports: list[last_save.RankReport | None], saves: bool, says: str
) -> None:
    decision = last_save.agree(reports, waited=30)
    assert decision.save is saves and says in decision.reason, decision.reason


def test_a_rank_report_survives_the_trip_through_the_store() -> None:
    original = report(1, collectives=None)
    assert last_save.RankReport.from_json(original.to_json()) == original
