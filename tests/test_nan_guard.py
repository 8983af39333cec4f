"""NanGuard on a real Trainer and the tiny Llama: non-finite values stop the run before a poisoned save."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

import trainguard
from trainguard.alerts import Alert
from trainguard.callbacks.nan_guard import NanGuard

from _rig import REPO_ROOT, make_lm_dataset, make_tiny_llama, make_trainer, run_python

# Touches Trainer internals: step hooks (training_step, the grad-norm function).
# Also run on the oldest supported releases (.ci/run).
pytestmark = pytest.mark.compat

NAN = float("nan")


class ListSink:
    """Collects alerts in memory."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def send(self, alert: Alert) -> None:
        self.alerts.append(alert)

    def of(self, level: str) -> list[Alert]:
        return [a for a in self.alerts if a.level == level]


class PoisonWeights(TrainerCallback):
    """Makes the update of ``step`` turn a weight into NaN (as a diverging optimizer step would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step + 1 == self.step:  # global_step is incremented after this event
            with torch.no_grad():
                model.model.layers[0].mlp.up_proj.weight.fill_(NAN)


def nan_forward(model: Any, calls: set[int]) -> list[int]:
    """Make the training forward number ``n`` (1-based, over micro-batches) produce NaN logits for n in ``calls``."""
    seen = [0]

    def hook(module: Any, inputs: Any, output: Any) -> Any:
        if not module.training:
            return output
        seen[0] += 1
        return output * NAN if seen[0] in calls else output

    model.lm_head.register_forward_hook(hook)
    return seen


def params_finite(model: Any) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def checkpoint_steps(output_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*"))


def checkpoint_finite(folder: Path) -> bool:
    tensors = load_file(str(folder / "model.safetensors"))
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def guard(device_flags: bool = False, **kwargs: Any) -> tuple[NanGuard, ListSink]:
    """A NanGuard with an in-memory sink. ``device_flags`` keeps the flags as tensors, as on an accelerator (on CPU
    plain floats are used: reading them is free), so the tensor path is covered here too."""
    sink = ListSink()
    nan_guard = NanGuard(alert_sinks=[sink], **kwargs)
    nan_guard._device_flags = device_flags
    return nan_guard, sink


# ------------------------------------------------------------------------------------------ poisoned weights
@pytest.mark.parametrize(
    ("save_steps", "caught_field", "resume_step"),
    [
        (1, "parameters", 6),  # step 7 is a save step: the weights are checked before checkpoint-7 is written
        (5, "loss", 5),  # no save at 7: step 8's NaN loss is caught before step 8's update
    ],
)
def test_weights_poisoned_by_step_7_end_the_run_by_step_8_with_every_checkpoint_finite(
    output_dir: Path, save_steps: int, caught_field: str, resume_step: int
) -> None:
    nan_guard, sink = guard()
    trainer = make_trainer(
        output_dir,
        callbacks=[PoisonWeights(7), nan_guard],
        max_steps=12,
        save_strategy="steps",
        save_steps=save_steps,
    )
    with pytest.raises(trainguard.NonFiniteError) as caught:
        trainer.train()

    err = caught.value
    assert err.where["field"] == caught_field
    assert err.where["step"] <= 8
    assert trainer.state.global_step == 7  # no update after the poisoning was applied
    steps = checkpoint_steps(output_dir)
    assert steps and max(steps) == resume_step < err.where["step"]
    assert all(checkpoint_finite(output_dir / f"checkpoint-{s}") for s in steps)
    assert err.evidence["resume_from"] == str(output_dir / f"checkpoint-{resume_step}")
    assert f"checkpoint-{resume_step}" in str(err) and f"step {err.where['step']}" in str(err)
    assert err.evidence["weights_in_memory"] == "non-finite" and "do not save or push it" in err.next_step
    assert [a.level for a in sink.alerts] == ["error"]


def test_without_nan_guard_the_same_run_hides_the_nan_and_saves_poisoned_checkpoints(output_dir: Path) -> None:
    # The baseline the guard exists for: if this ever stops being true, the guard tests above prove less.
    trainer = make_trainer(output_dir, callbacks=[PoisonWeights(7)], max_steps=10, save_strategy="steps", save_steps=5)
    trainer.train()
    assert trainer.state.global_step == 10
    logged = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert logged[-1]["loss"] == 0.0 and math.isnan(logged[-1]["grad_norm"])  # logging_nan_inf_filter at work
    assert not checkpoint_finite(output_dir / "checkpoint-10")


# ---------------------------------------------------------------------------------------- one bad micro-batch
@pytest.mark.parametrize("device_flags", [False, True], ids=["host-flags", "device-flags"])
def test_a_single_nan_micro_batch_is_caught_at_its_step_before_the_update(output_dir: Path, device_flags: bool) -> None:
    model = make_tiny_llama()
    k, ga = 3, 4
    nan_forward(model, {(k - 1) * ga + 3})  # micro-batch 3 of 4 of step 3; weights finite until then
    nan_guard, _ = guard(device_flags)
    trainer = make_trainer(
        output_dir,
        model=model,
        callbacks=[nan_guard],
        max_steps=6,
        gradient_accumulation_steps=ga,
        per_device_train_batch_size=1,
    )
    with pytest.raises(trainguard.NonFiniteError) as caught:
        trainer.train()

    err = caught.value
    assert (err.where["step"], err.where["field"]) == (k, "loss")
    assert err.evidence["detail"] == "micro-batch 3 of 4" and err.evidence["value"] == "NaN"
    assert trainer.state.global_step == k - 1  # raised before step k's optimizer.step()
    assert params_finite(trainer.model)  # so the weights in memory are still the good ones ...
    assert err.evidence["weights_in_memory"] == "finite"  # ... and the error says so


def test_the_checkpoint_to_resume_from_is_in_the_evidence_and_none_before_any_save(output_dir: Path) -> None:
    def run(out: Path, **args: Any) -> trainguard.NonFiniteError:
        model = make_tiny_llama()
        nan_forward(model, {4})
        trainer = make_trainer(out, model=model, callbacks=[NanGuard(alert_sinks=[])], max_steps=6, **args)
        with pytest.raises(trainguard.NonFiniteError) as caught:
            trainer.train()
        return caught.value

    early = run(output_dir / "no-save")  # the NaN comes before any checkpoint exists
    assert "resume_from" in early.evidence and early.evidence["resume_from"] is None  # the docs' snippet works
    late = run(output_dir / "saved", save_strategy="steps", save_steps=2)
    assert late.evidence["resume_from"] == str(output_dir / "saved" / "checkpoint-2")


@pytest.mark.parametrize("device_flags", [False, True], ids=["host-flags", "device-flags"])
def test_an_infinite_gradient_under_a_finite_loss_is_caught_before_the_update(
    output_dir: Path, device_flags: bool
) -> None:
    model = make_tiny_llama()
    backward_calls = [0]

    def blow_up(grad: torch.Tensor) -> torch.Tensor:
        backward_calls[0] += 1
        return grad * float("inf") if backward_calls[0] == 4 else grad  # the backward of step 4 only

    model.model.layers[1].mlp.down_proj.weight.register_hook(blow_up)
    nan_guard, _ = guard(device_flags)
    trainer = make_trainer(output_dir, model=model, callbacks=[nan_guard], max_steps=6)
    with pytest.raises(trainguard.NonFiniteError) as caught:
        trainer.train()

    assert (caught.value.where["step"], caught.value.where["field"]) == (4, "grad_norm")
    assert nan_guard.tripped is not None and nan_guard.tripped.value is not None
    assert not math.isfinite(nan_guard.tripped.value)
    assert trainer.state.global_step == 3 and params_finite(trainer.model)


def test_a_clean_cpu_step_costs_the_guard_one_scalar_read_per_value_and_no_other_tensor_op(output_dir: Path) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    nan_guard, _ = guard()
    trainer = make_trainer(output_dir, callbacks=[nan_guard], max_steps=1)
    trainer.train()  # installs the hooks
    loss, norm = torch.tensor(2.5), torch.tensor(0.75)
    with Ops() as ops:
        for _ in range(3):
            nan_guard._after_training_step(loss, (), {})
        nan_guard._after_grad_norm(norm)
        nan_guard.on_pre_optimizer_step(trainer.args, trainer.state, trainer.control)
    # Each micro-batch's loss and the clip norm are read once (.item()); nothing is allocated, compared or reduced:
    # the per-step cost on the CPU stays a few microseconds (benchmarks/run_all.py measures it end to end).
    assert ops.names == ["aten._local_scalar_dense"] * 4
    assert nan_guard.tripped is None and nan_guard._flags.losses == []


@pytest.mark.parametrize(("save_steps", "raised_at"), [(None, 4), (3, 3)])
def test_asynchronous_check_acts_one_step_later_except_on_a_save_step(
    output_dir: Path, save_steps: int | None, raised_at: int
) -> None:
    model = make_tiny_llama()
    k = 3
    nan_forward(model, {k})
    # The CUDA default (flags kept on the device, read one step late), forced here on CPU. The save-time weight
    # check is off so that only the immediate read on a save step can keep step 3 from being saved.
    nan_guard, _ = guard(device_flags=True, sync=False, check_params_on_save=False)
    save = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {}
    trainer = make_trainer(output_dir, model=model, callbacks=[nan_guard], max_steps=8, **save)
    with pytest.raises(trainguard.NonFiniteError) as caught:
        trainer.train()

    err = caught.value
    assert err.where["step"] == k  # the message names the bad step, wherever it was read
    assert trainer.state.global_step == raised_at
    if raised_at != k:
        assert err.evidence["detected_at_step"] == raised_at and "asynchronous" in err.what
    assert k not in checkpoint_steps(output_dir)


# ------------------------------------------------------------------------------------------------------ eval
class NanEvalLossTrainer(Trainer):
    def prediction_step(self, *args: Any, **kwargs: Any) -> Any:
        loss, logits, labels = super().prediction_step(*args, **kwargs)
        return (loss * NAN if loss is not None else None), logits, labels


def inf_metric(prediction: Any) -> dict[str, float]:
    return {"perplexity": math.inf}


@pytest.mark.parametrize(
    ("trainer_cls", "compute_metrics", "field"),
    [(NanEvalLossTrainer, None, "eval_loss"), (Trainer, inf_metric, "eval_perplexity")],
)
def test_non_finite_eval_loss_or_metric_stops_before_that_steps_save(
    output_dir: Path, trainer_cls: Any, compute_metrics: Any, field: str
) -> None:
    nan_guard, _ = guard()
    trainer = make_trainer(
        output_dir,
        callbacks=[nan_guard],
        trainer_cls=trainer_cls,
        eval_dataset=make_lm_dataset(4, seed=1),
        max_steps=6,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=3,
    )
    trainer.compute_metrics = compute_metrics
    with pytest.raises(trainguard.NonFiniteError) as caught:
        trainer.train()

    assert (caught.value.where["field"], caught.value.where["step"]) == (field, 3)
    assert checkpoint_steps(output_dir) == []  # evaluation runs before the save of step 3, which never happened


# ----------------------------------------------------------------------------------------- fp16 loss scaling
def with_overflowing_loss_scaler(trainer: Any) -> Any:
    # fp16 autocast runs on CPU, but accelerate attaches a GradScaler only on GPUs. A real torch GradScaler with a
    # too-large initial scale makes real fp16 gradients overflow: the first steps are skipped by the scaler itself.
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22, growth_interval=1000)
    trainer.accelerator.native_amp = True
    return trainer


def test_steps_the_fp16_loss_scaler_skips_are_not_alarms(output_dir: Path) -> None:
    nan_guard, sink = guard()
    trainer = with_overflowing_loss_scaler(make_trainer(output_dir, callbacks=[nan_guard], max_steps=8, fp16=True))
    trainer.train()

    skipped = [h for h in trainer.state.log_history if "grad_norm" in h and not math.isfinite(h["grad_norm"])]
    assert len(skipped) >= 2  # the guard saw non-finite gradient norms ...
    assert nan_guard.scaler_skipped_steps == len(skipped)  # ... and counted them as the scaler's skips
    assert nan_guard.tripped is None and sink.alerts == []
    assert trainer.state.global_step == 8 and params_finite(trainer.model)


def test_a_collapsing_loss_scale_is_a_failure(output_dir: Path) -> None:
    nan_guard, _ = guard(max_skipped_steps=1)
    trainer = with_overflowing_loss_scaler(make_trainer(output_dir, callbacks=[nan_guard], max_steps=8, fp16=True))
    with pytest.raises(trainguard.NonFiniteError, match="loss scale has collapsed") as caught:
        trainer.train()
    assert (caught.value.where["field"], caught.value.where["step"]) == ("grad_norm", 2)


# ------------------------------------------------------------------------------------------ stop, warn, patience
def test_stop_mode_ends_train_normally_without_saving_the_bad_step_and_keeps_the_last_good_weights(
    output_dir: Path,
) -> None:
    model = make_tiny_llama()
    nan_forward(model, {5})
    nan_guard, sink = guard(action="stop")
    trainer = make_trainer(
        output_dir, model=model, callbacks=[nan_guard], max_steps=10, save_strategy="steps", save_steps=1
    )
    trainer.train()  # no exception

    assert nan_guard.stopped and nan_guard.tripped is not None and nan_guard.tripped.step == 5
    assert trainer.state.global_step == 5
    assert checkpoint_steps(output_dir) == [1, 2, 3, 4]
    # The bad update was skipped: the model in memory equals the last good checkpoint, so saving it is safe.
    good = load_file(str(output_dir / "checkpoint-4" / "model.safetensors"))
    state = trainer.model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in good.items())
    assert len(sink.of("error")) == 1


def test_warn_mode_alerts_once_per_streak_and_changes_nothing(output_dir: Path) -> None:
    model = make_tiny_llama()
    nan_forward(model, {3})  # poisons the weights: every later step is NaN as well
    nan_guard, sink = guard(action="warn")
    trainer = make_trainer(output_dir, model=model, callbacks=[nan_guard], max_steps=6)
    trainer.train()

    assert trainer.state.global_step == 6
    assert not nan_guard.stopped and nan_guard.tripped is not None and nan_guard.tripped.step == 3
    assert len(sink.of("error")) == 1 and "action='warn'" in sink.of("error")[0].message
    assert not params_finite(trainer.model)  # warn-only really changed nothing


@pytest.mark.parametrize(("bad_steps", "raises_at"), [({4, 5}, None), ({4, 5, 6}, 6)])
def test_patience_skips_tolerated_steps_and_acts_on_the_next_one(
    output_dir: Path, bad_steps: set[int], raises_at: int | None
) -> None:
    model = make_tiny_llama()
    nan_forward(model, bad_steps)
    nan_guard, sink = guard(patience=2)
    trainer = make_trainer(output_dir, model=model, callbacks=[nan_guard], max_steps=8)
    if raises_at is None:
        trainer.train()
        assert trainer.state.global_step == 8
        assert nan_guard.skipped_steps == 2 and nan_guard.tripped is None
        assert params_finite(trainer.model)  # the tolerated steps' updates were skipped
        assert [a.step for a in sink.of("warning")] == [4, 5]
    else:
        with pytest.raises(trainguard.NonFiniteError) as caught:
            trainer.train()
        assert caught.value.where["step"] == raises_at
        assert nan_guard.skipped_steps == 2


# ------------------------------------------------------------------------------------------ loss-health alerts
def test_a_loss_of_exactly_zero_for_five_steps_warns_when_every_label_is_masked(output_dir: Path) -> None:
    masked = make_lm_dataset(16).map(lambda row: {"labels": [-100] * len(row["labels"])})
    on, on_sink = guard(device_flags=True)  # the exemption of label-less steps also works on device flags
    make_trainer(output_dir / "on", callbacks=[on], train_dataset=masked, max_steps=6).train()
    off, off_sink = guard(zero_loss_steps=None)
    make_trainer(output_dir / "off", callbacks=[off], train_dataset=masked, max_steps=6).train()

    [alert] = on_sink.of("warning")
    assert alert.evidence["kind"] == "zero_loss" and alert.step == 5
    assert off_sink.alerts == []


class SpikeAtStep(Trainer):
    spike_step = 9

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * 50 if self.state.global_step + 1 == self.spike_step else loss


@pytest.mark.parametrize("spike_factor", [10.0, None])
def test_a_loss_spike_against_the_running_median_warns(output_dir: Path, spike_factor: float | None) -> None:
    nan_guard, sink = guard(spike_factor=spike_factor, spike_warmup=5)
    trainer = make_trainer(output_dir, callbacks=[nan_guard], trainer_cls=SpikeAtStep, max_steps=10)
    trainer.train()

    assert trainer.state.global_step == 10  # a warning, never a stop
    spikes = [a for a in sink.of("warning") if a.evidence.get("kind") == "spike"]
    if spike_factor is None:
        assert spikes == []
    else:
        [spike] = spikes
        assert spike.step == 9 and spike.evidence["ratio"] > 10


# ----------------------------------------------------------------------------------------------- wiring
def test_nan_guard_is_public_and_part_of_all_guards() -> None:
    assert trainguard.NanGuard is NanGuard
    [default] = [g for g in trainguard.all_guards() if isinstance(g, NanGuard)]
    assert default.action == "raise"
    [configured] = [g for g in trainguard.all_guards(nan_guard={"action": "stop"}) if isinstance(g, NanGuard)]
    assert configured.action == "stop"
    assert not any(isinstance(g, NanGuard) for g in trainguard.all_guards(nan_guard=False))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"action": "explode"}, "action"),
        ({"patience": -1}, "patience"),
        ({"patience": 1, "sync": False}, "sync=True"),
        ({"max_skipped_steps": -1}, "max_skipped_steps"),
    ],
)
def test_invalid_options_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NanGuard(**kwargs)


def test_the_example_stops_at_the_nan_and_resumes_from_the_checkpoint_it_names(tmp_path: Path) -> None:
    result = run_python(str(REPO_ROOT / "examples" / "nan_guard.py"), str(tmp_path / "run"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss is NaN at step 5 (micro-batch 2 of 2)" in result.stdout
    assert "every checkpoint finite: True" in result.stdout
    assert "resumed from checkpoint-4 and finished at step 10" in result.stdout
