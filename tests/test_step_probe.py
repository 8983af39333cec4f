"""The step probe: ``training_step`` and the gradient norm wrapped once per Trainer, whatever guards listen; one
collective per step across ranks; guards subscribe and unsubscribe."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

import trainguard
from trainguard.callbacks._step_probe import install_step_probe

from _rig import TESTS_DIR, make_trainer, run_torchrun


def wrappers(function: Any) -> int:
    """How many ``functools.wraps`` layers ``function`` carries."""
    depth = 0
    while hasattr(function, "__wrapped__"):
        depth, function = depth + 1, function.__wrapped__
    return depth


def test_all_guards_wrap_training_step_and_the_gradient_norm_exactly_once(tmp_path: Path) -> None:
    guards = trainguard.all_guards()
    assert {"NanGuard", "SpikeGuard", "CheckpointVerifier"} <= {type(g).__name__ for g in guards}
    trainer = make_trainer(tmp_path / "run", callbacks=guards, max_steps=3, save_steps=2)
    trainer.train()
    assert wrappers(trainer.training_step) == 1
    assert wrappers(trainer._get_grad_norm) == 1
    probe = install_step_probe(trainer)
    assert {type(g).__name__ for g in probe.subscribers()} >= {"NanGuard", "SpikeGuard", "CheckpointVerifier"}
    trainer.train()  # a second train() subscribes again, wraps nothing more
    assert wrappers(trainer.training_step) == 1 and install_step_probe(trainer) is probe


class Reader(TrainerCallback):
    """A guard of its own: reads the probe's verdict before each update."""

    def __init__(self, probe: Any) -> None:
        self.probe = probe
        self.verdicts: list[Any] = []
        self.logged_norms: list[float] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.verdicts.append(self.probe.read(self.probe.take(state.global_step + 1)))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
        if logs and "grad_norm" in logs:
            self.logged_norms.append(float(logs["grad_norm"]))


def test_a_guard_subscribes_to_the_probe_and_stops_being_called_once_it_unsubscribes(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "run", max_steps=2, gradient_accumulation_steps=2, logging_steps=1)
    probe = install_step_probe(trainer)
    owner = object()
    batches: list[Any] = []
    assert probe.subscribe(owner, before_step=lambda a, k: batches.append(a[1]), values=True, mean_loss=True) == []
    reader = Reader(probe)
    trainer.add_callback(reader)
    trainer.train()
    assert len(batches) == 4 and all("input_ids" in b for b in batches)  # every micro-batch, before its forward
    assert [v.step for v in reader.verdicts] == [1, 2]
    for verdict, norm in zip(reader.verdicts, reader.logged_norms, strict=True):
        assert len(verdict.losses) == 2 and not verdict.bad
        assert verdict.mean_loss == pytest.approx(sum(verdict.losses) / 2)
        assert verdict.grad_value == pytest.approx(norm)  # the norm the Trainer computed and logged

    probe.unsubscribe(owner)
    trainer.remove_callback(reader)
    assert owner not in probe.subscribers()
    trainer.train()
    assert len(batches) == 4  # not called any more
    assert probe.collector.losses == [] and probe.collector.grad_norm is None  # nothing collected for nobody


def test_the_probe_names_the_lowest_rank_that_went_bad_and_the_mean_loss_of_all_ranks() -> None:
    from trainguard.checks.nan import StepFlagCollector

    flags = StepFlagCollector(world_size=3, rank=2, mean_loss=True)  # no group: this rank alone
    flags.observe_loss(2.0)
    flags.observe_loss(math.inf)
    flags.observe_grad_norm(4.0)
    verdict = flags.read(flags.take(step=5))
    assert (verdict.loss_bad, verdict.loss_rank, verdict.grad_bad, verdict.grad_rank) == (True, 2, False, None)
    assert verdict.mean_loss == math.inf and verdict.grad_value == 4.0


@pytest.mark.distributed
def test_two_ranks_share_one_all_reduce_per_step_for_every_guard(tmp_path: Path) -> None:
    result = run_torchrun(TESTS_DIR / "scripts" / "step_probe_two_ranks.py", str(tmp_path), timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        doc = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert doc["training_step_wrappers"] == 1
        assert doc["per_step"] == [1] * 6, doc  # NanGuard's flags and SpikeGuard's mean loss in one collective
