"""The pure numerics checks behind NanGuard: finiteness, patience, NaN-safe spikes, zero-loss streaks."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import trainguard
from trainguard.callbacks.nan_guard import NanGuard
from trainguard.checks.nan import (
    LossHealth,
    NonFiniteFinding,
    Patience,
    StepFlagCollector,
    describe_value,
    finding_from_metrics,
    finding_from_verdict,
    finding_headline,
    is_finite,
    newest_checkpoint_before,
    nonfinite_flag,
    nonfinite_metrics,
    nonfinite_parameters,
)

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("value", "finite"),
    [
        (0.5, True),
        (3, True),
        (True, True),
        (NAN, False),
        (INF, False),
        (-INF, False),
        (np.float32("nan"), False),
        (np.array([1.0, 2.0]), True),
        (np.array([1.0, INF]), False),
        (np.array([1, 2]), True),
        (torch.tensor(1.0), True),
        (torch.tensor([1.0, NAN]), False),
        (torch.tensor([-INF]), False),
        (torch.tensor([1, 2]), True),
        (torch.tensor(NAN, dtype=torch.bfloat16), False),
    ],
)
def test_is_finite_accepts_numbers_arrays_and_tensors(value: Any, finite: bool) -> None:
    assert is_finite(value) is finite


@pytest.mark.parametrize("value", ["nan", None, {"a": 1}])
def test_is_finite_refuses_what_is_not_numeric(value: Any) -> None:
    with pytest.raises(TypeError):
        is_finite(value)


def test_nonfinite_flag_stays_on_the_device_as_a_tensor_until_read() -> None:
    flag = nonfinite_flag(torch.tensor(2.0)) | nonfinite_flag(torch.tensor([1.0, INF]))
    assert isinstance(flag, torch.Tensor) and flag.dim() == 0 and bool(flag)
    assert not bool(nonfinite_flag(torch.ones(3)))


def test_nonfinite_metrics_names_only_numeric_non_finite_entries() -> None:
    metrics = {"eval_loss": NAN, "eval_ppl": INF, "eval_runtime": 1.5, "epoch": 2, "note": "x", "flag": True}
    found = nonfinite_metrics(metrics)
    assert set(found) == {"eval_loss", "eval_ppl"} and math.isinf(found["eval_ppl"])


def test_nonfinite_parameters_names_the_bad_weights_in_model_order() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert nonfinite_parameters(model.named_parameters()) == []
    with torch.no_grad():
        model[1].bias[0] = INF
        model[0].weight[0, 0] = NAN
    assert nonfinite_parameters(model.named_parameters()) == ["0.weight", "1.bias"]
    assert nonfinite_parameters(model.named_parameters(), limit=1) == ["0.weight"]


def test_describe_value_and_finding_read_well_in_messages() -> None:
    assert [describe_value(v) for v in (NAN, INF, -INF, 0.25)] == ["NaN", "+Inf", "-Inf", "0.25"]
    finding = NonFiniteFinding(step=8, field="loss", value=NAN, rank=1, detail="micro-batch 3 of 4")
    assert finding.describe() == "loss is NaN (micro-batch 3 of 4)"
    assert NonFiniteFinding(step=7, field="parameters").describe() == "parameters are non-finite"


def test_patience_counts_consecutive_bad_observations_only() -> None:
    patience = Patience(2)
    results = [patience.update(bad) for bad in (True, True, False, True, True, True)]
    assert results == [False, False, False, False, False, True]
    assert (patience.streak, patience.total) == (3, 5)
    assert Patience(0).update(True) is True
    with pytest.raises(ValueError, match="patience"):
        Patience(-1)


def test_a_spike_is_reported_once_per_episode_after_warmup() -> None:
    health = LossHealth(spike_factor=5.0, spike_window=10, spike_warmup=3, zero_loss_steps=None)
    events = [
        e
        for step, loss in enumerate([9.0, 2.0, 2.0, 2.0, 30.0, 40.0, 2.0, 50.0], 1)
        for e in health.update(loss, step=step)
    ]
    assert [(e.kind, e.step) for e in events] == [("spike", 5), ("spike", 8)]
    assert health.spikes == 3 and events[0].evidence["median"] == 2.0
    assert LossHealth(spike_warmup=100).update(1e9) == []  # not judged during warmup


def test_nan_and_inf_never_count_as_spikes_nor_poison_the_baseline() -> None:
    # LLM Foundry's KillLossSpike compares against a window *mean*: one NaN makes every later comparison False.
    health = LossHealth(spike_factor=5.0, spike_window=10, spike_warmup=3, zero_loss_steps=None)
    for loss in (2.0, 2.0, 2.0, NAN, INF, -INF):
        assert health.update(loss) == []
    [event] = health.update(30.0)
    assert event.kind == "spike" and event.evidence["window"] == 3


def test_zero_loss_is_reported_when_the_streak_reaches_its_length_and_again_after_a_break() -> None:
    health = LossHealth(spike_factor=None, zero_loss_steps=3)
    kinds = [[e.kind for e in health.update(v, step=i)] for i, v in enumerate([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])]
    assert [i for i, k in enumerate(kinds) if k == ["zero_loss"]] == [2, 7]
    assert LossHealth(zero_loss_steps=None).update(0.0) == []


@pytest.mark.parametrize(
    "kwargs", [{"spike_factor": 1.0}, {"spike_window": 0}, {"spike_warmup": 0}, {"zero_loss_steps": 0}]
)
def test_loss_health_refuses_meaningless_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LossHealth(**kwargs)


def test_newest_checkpoint_before_the_bad_step(tmp_path: Path) -> None:
    for name in ("checkpoint-5", "checkpoint-10", "checkpoint-8", "checkpoint-x", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-9").write_text("a file, not a checkpoint")
    assert newest_checkpoint_before(str(tmp_path), 10) == tmp_path / "checkpoint-8"
    assert newest_checkpoint_before(str(tmp_path), 5) is None
    assert newest_checkpoint_before(str(tmp_path / "missing"), 5) is None
    assert newest_checkpoint_before(None, 5) is None


@pytest.mark.parametrize("device_flags", [False, True], ids=["host-flags", "device-flags"])
def test_step_flags_name_the_bad_micro_batch_without_a_trainer(device_flags: bool) -> None:
    flags = StepFlagCollector(device_flags=device_flags, world_size=2, rank=1)  # no group: this rank alone
    flags.observe_loss(torch.tensor(1.5), items=8)
    flags.observe_loss(torch.tensor(NAN), items=torch.tensor(8))
    flags.observe_loss(torch.tensor(NAN), items=torch.tensor(0))  # no label token: 0/0, not an alarm
    flags.observe_grad_norm(torch.tensor(2.0))
    verdict = flags.read(flags.take(step=3))
    assert flags.losses == [] and flags.loss_bad is None  # ready for the next step
    assert (verdict.loss_bad, verdict.grad_bad, verdict.empty, verdict.loss_rank) == (True, False, True, 1)
    finding = finding_from_verdict(verdict, "loss")
    assert (finding.step, finding.rank, finding.detail) == (3, 1, "micro-batch 2 of 3")
    assert finding_headline(finding) == "loss is NaN at step 3 (micro-batch 2 of 3)"  # one process: no rank


def test_a_metrics_finding_is_named_after_the_loss_first() -> None:
    finding = finding_from_metrics(4, {"eval_ppl": INF, "eval_loss": NAN})
    assert (finding.field, finding.detail, finding.step) == ("eval_loss", "also eval_ppl", 4)


def test_without_trainer_hooks_the_logged_grad_norm_is_the_fallback(tmp_path: Path) -> None:
    # The filter turns a NaN loss into 0.0 in the log, but grad_norm is never filtered.
    guard = NanGuard(alert_sinks=[])
    args = SimpleNamespace(output_dir=str(tmp_path))
    control = SimpleNamespace(should_save=True, should_evaluate=False, should_training_stop=False)
    state = SimpleNamespace(global_step=4)
    with pytest.raises(trainguard.NonFiniteError) as caught:
        guard.on_log(args, state, control, logs={"loss": 0.0, "grad_norm": NAN, "learning_rate": 1e-3})
    assert (caught.value.where["field"], caught.value.where["step"]) == ("grad_norm", 4)
    assert control.should_save is False


def test_nan_guards_spike_warning_is_the_spike_detectors_ratio_rule() -> None:
    from trainguard.checks.spike import SpikeDetector

    losses = [9.0, 2.0, 2.0, 2.0, 30.0, 40.0, 2.0, NAN, 50.0, 1e9]
    health = LossHealth(spike_factor=5.0, spike_window=4, spike_warmup=3, zero_loss_steps=None)
    detector = SpikeDetector(window=4, warmup=3, factor=5.0)
    judged = [
        (step, bool(health.update(v, step=step)), detector.observe(step, loss=v)) for step, v in enumerate(losses)
    ]
    flagged = [step for step, _, finding in judged if finding is not None]
    assert flagged == [4, 5, 9]  # the same window, median and NaN handling; one episode reported once
    assert [step for step, reported, _ in judged if reported] == [4, 9]
    assert health.spikes == len(flagged)
    assert judged[4][2] is not None and judged[4][2].ratio == 15.0 and judged[4][2].median == 2.0
