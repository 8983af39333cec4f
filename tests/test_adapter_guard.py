"""AdapterGuard with the real Trainer and real PEFT LoRA on the tiny Llama: a run whose adapters receive no gradient
is stopped at the first optimizer step, one whose lora_B never moves at check_step, naming the modules and the likely
cause; healthy LoRA runs (warmup from 0, gaussian/PiSSA init, DoRA, modules_to_save, a second frozen adapter) train
to the end untouched; a model without adapters is left alone; two ranks stop together.

How users hit "no gradient reaches the adapters" (peft#793): gradient checkpointing with ``use_reentrant=True`` and a
frozen input embedding, without ``model.enable_input_require_grads()``. transformers 5.x calls
``enable_input_require_grads`` itself whenever the Trainer turns checkpointing on for a model whose main input is
``input_ids``; transformers 4.x (down to 4.47, which this project supports) does it only for models with
transformers-integrated adapters (``add_adapter``), not for a ``get_peft_model`` model. The tests reproduce the 4.x
path on 5.x by making that one call a no-op on the model instance; everything else is the real stack. Targeting
``lm_head`` too keeps the run silent (with adapters only inside the checkpointed layers, ``loss.backward()`` raises on
its own): the head's adapter trains, every layer's adapter stays dead.
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

import trainguard
from trainguard.callbacks.adapter_guard import AdapterGuard
from trainguard.checks.adapter import adapter_parameters, module_list, no_grad_parameters, zero_parameters
from trainguard.errors import AdapterError

from _rig import TESTS_DIR, make_tiny_llama, make_trainer, run_torchrun, subprocess_env, training_args

LAYER_MODULES = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]


def peft_model(targets: tuple[str, ...] = ("q_proj", "v_proj"), **lora: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), task_type="CAUSAL_LM", **lora)
    return get_peft_model(make_tiny_llama(), config)


def without_input_grads(model: Any) -> Any:
    """What transformers 4.x does for a get_peft_model model when the Trainer turns checkpointing on: nothing."""
    model.base_model.model.enable_input_require_grads = lambda: None
    return model


CHECKPOINTING = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}


class Steps(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.steps += 1
        return control


class ListSink:
    def __init__(self) -> None:
        self.alerts: list[Any] = []

    def send(self, alert: Any) -> None:
        self.alerts.append(alert)

    def flush(self) -> None:
        pass


def all_guards_with(guard: AdapterGuard) -> list[Any]:
    """``all_guards()`` with ``guard`` as its AdapterGuard (added at the end while the registry lacks it)."""
    from trainguard.callbacks import _GUARDS

    if any(key == "adapter_guard" for key, _ in _GUARDS):
        return trainguard.all_guards(adapter_guard=guard)
    return [*trainguard.all_guards(), guard]


def lora_b_max(model: Any) -> dict[str, float]:
    return {n: float(p.detach().abs().max()) for n, p in model.named_parameters() if ".lora_B." in n}


# ------------------------------------------------------------------------------------------ no gradient at all
def test_plain_trainer_trains_a_checkpointed_run_whose_layer_adapters_get_no_gradient(tmp_path: Path) -> None:
    """The failure, unguarded: the run trains to the end and every layer's lora_B is still exactly zero."""
    model = without_input_grads(peft_model(("q_proj", "v_proj", "lm_head")))
    trainer = make_trainer(tmp_path, model=model, max_steps=4, **CHECKPOINTING)
    trainer.train()
    assert trainer.state.global_step == 4
    layers = {n: v for n, v in lora_b_max(model).items() if ".layers." in n}
    assert layers and all(v == 0.0 for v in layers.values())


def test_checkpointing_without_input_grads_is_stopped_at_the_first_optimizer_step(tmp_path: Path) -> None:
    model = without_input_grads(peft_model(("q_proj", "v_proj", "lm_head")))
    steps = Steps()
    trainer = make_trainer(tmp_path, model=model, callbacks=[AdapterGuard(), steps], max_steps=20, **CHECKPOINTING)
    with pytest.raises(AdapterError) as caught:
        trainer.train()
    err = caught.value
    assert steps.steps == 0 and trainer.state.global_step == 0  # before the first optimizer step completed
    assert err.where["step"] == 1 and err.where["rank"] == 0
    assert "received no gradient" in err.what and "8 of 10" in err.what
    for module in LAYER_MODULES:
        assert module in err.what
    assert "lm_head" not in err.what  # its adapter does train
    assert "gradient checkpointing" in err.what and "enable_input_require_grads" in err.what
    assert "enable_input_require_grads" in err.next_step and "use_reentrant" in err.next_step
    assert set(err.evidence["modules"]) == {f"base_model.model.{m}" for m in LAYER_MODULES}


def test_the_checkpointing_advice_is_spelt_for_the_installed_transformers_and_raises_no_warning(tmp_path: Path) -> None:
    """The `next:` line's keyword is the one the installed TrainingArguments takes without a deprecation warning
    (5.23 renamed gradient_checkpointing_kwargs to activation_checkpointing_kwargs; the old name warns)."""
    model = without_input_grads(peft_model(("q_proj", "v_proj", "lm_head")))
    trainer = make_trainer(tmp_path, model=model, callbacks=[AdapterGuard()], max_steps=2, **CHECKPOINTING)
    with pytest.raises(AdapterError) as caught:
        trainer.train()
    spelling = re.search(r"(\w+)=\{'use_reentrant': False\}", caught.value.next_step)
    assert spelling, caught.value.next_step
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning (or any other) from the advice itself fails here
        args = training_args(tmp_path / "advised", **{spelling.group(1): {"use_reentrant": False}})
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}  # taken, under either name


def test_checkpointing_with_input_grads_trains_untouched(tmp_path: Path) -> None:
    """transformers' own path (input grads enabled by the Trainer's checkpointing call) is healthy."""
    model = peft_model(("q_proj", "v_proj", "lm_head"))
    guard = AdapterGuard()
    trainer = make_trainer(tmp_path, model=model, callbacks=[guard], max_steps=4, **CHECKPOINTING)
    trainer.train()
    assert trainer.state.global_step == 4
    assert guard.summary().startswith("every adapter parameter trains")


def test_no_gradient_anywhere_is_stopped_at_the_first_step_without_checkpointing(tmp_path: Path) -> None:
    """Every adapter parameter without a gradient at step 1 (here: each gradient dropped as it is stored)."""
    model = peft_model()
    for name, param in model.named_parameters():  # all gradients dropped before they are stored
        if ".lora_" in name:
            param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    trainer = make_trainer(tmp_path, model=model, callbacks=[AdapterGuard()], max_steps=10)
    with pytest.raises(AdapterError) as caught:
        trainer.train()
    assert caught.value.where["step"] == 1 and "8 of 8" in caught.value.what
    assert "not on the path from the inputs to the loss" in caught.value.what


def drop_grads(model: Any, module: str, steps: set[int] | None) -> None:
    """Drop the gradients of ``module``'s adapter as they are stored, on the 1-based backward passes in ``steps``
    (None: always): an adapter the step's forward pass did not reach (an expert not routed, a branch skipped)."""
    calls: dict[str, int] = {}

    def hook(name: str) -> Any:
        def drop(param: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if steps is None or calls[name] in steps:
                param.grad = None

        return drop

    for name, param in model.named_parameters():
        if f"{module}.lora_" in name:
            param.register_post_accumulate_grad_hook(hook(name))


def test_an_adapter_without_gradient_on_the_first_step_only_is_no_alarm(tmp_path: Path) -> None:
    model = peft_model()
    drop_grads(model, "layers.0.self_attn.q_proj", {1})
    guard = AdapterGuard(check_step=4)
    trainer = make_trainer(tmp_path, model=model, callbacks=[guard], max_steps=4)
    trainer.train()
    assert guard.summary() == "every adapter parameter trains (checked through step 4)"


def test_an_adapter_never_reached_is_stopped_at_check_step_naming_only_it(tmp_path: Path) -> None:
    model = peft_model()
    drop_grads(model, "layers.0.self_attn.q_proj", None)
    trainer = make_trainer(tmp_path, model=model, callbacks=[AdapterGuard(check_step=3)], max_steps=10)
    with pytest.raises(AdapterError) as caught:
        trainer.train()
    err = caught.value
    assert err.where["step"] == 3 and "2 of 8" in err.what and "received no gradient" in err.what
    assert "model.layers.0.self_attn.q_proj" in err.what
    assert "v_proj" not in err.what and "layers.1" not in err.what
    assert "not on the path from the inputs to the loss" in err.what


# ------------------------------------------------------------------------------------------ lora_B never moves
def test_lora_b_still_zero_at_check_step_is_stopped_naming_modules_and_the_learning_rate(tmp_path: Path) -> None:
    model = peft_model()
    steps = Steps()
    trainer = make_trainer(
        tmp_path, model=model, callbacks=[AdapterGuard(check_step=3), steps], max_steps=10, learning_rate=0.0
    )
    with pytest.raises(AdapterError) as caught:
        trainer.train()
    err = caught.value
    assert trainer.state.global_step == 3 and err.where["step"] == 3
    assert "are still all zero" in err.what and "lora_B" in err.what
    for module in LAYER_MODULES:
        assert module in err.what
    assert "learning rate was 0" in err.what
    assert err.evidence["max_learning_rate"] == 0.0


def test_default_check_step_is_the_run_length_when_shorter_than_50(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, model=peft_model(), callbacks=[AdapterGuard()], max_steps=6, learning_rate=0.0)
    with pytest.raises(AdapterError) as caught:
        trainer.train()
    assert caught.value.where["step"] == 6 and caught.value.evidence["check_step"] == 6


def test_zero_gradients_are_named_as_the_cause(tmp_path: Path) -> None:
    model = peft_model()
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.register_hook(lambda g: torch.zeros_like(g))
    trainer = make_trainer(tmp_path, model=model, callbacks=[AdapterGuard(check_step=2)], max_steps=4)
    with pytest.raises(AdapterError) as caught:
        trainer.train()
    assert caught.value.where["step"] == 2 and "gradients were zero" in caught.value.what


def test_warn_action_alerts_and_trains_on(tmp_path: Path) -> None:
    sink = ListSink()
    guard = AdapterGuard(check_step=2, action="warn", alert_sinks=[sink])
    trainer = make_trainer(tmp_path, model=peft_model(), callbacks=[guard], max_steps=4, learning_rate=0.0)
    trainer.train()
    assert trainer.state.global_step == 4
    assert [a.level for a in sink.alerts] == ["warning"] and "still all zero" in sink.alerts[0].message
    assert guard.summary().startswith("warned:")


def test_the_error_is_alerted(tmp_path: Path) -> None:
    sink = ListSink()
    trainer = make_trainer(
        tmp_path, model=peft_model(), callbacks=[AdapterGuard(check_step=2, alert_sinks=[sink])], learning_rate=0.0
    )
    with pytest.raises(AdapterError):
        trainer.train()
    assert [(a.level, a.guard, a.step) for a in sink.alerts] == [("error", "adapter_guard", 2)]


# ------------------------------------------------------------------------------------------ healthy runs
@pytest.mark.parametrize(
    ("case", "lora", "args"),
    [
        ("plain", {}, {}),
        ("warmup from lr 0", {}, {"warmup_steps": 3}),
        ("gaussian init", {"init_lora_weights": "gaussian"}, {}),
        ("pissa init", {"init_lora_weights": "pissa"}, {}),
        ("dora", {"use_dora": True}, {}),
        ("modules_to_save", {"modules_to_save": ["lm_head"]}, {}),
        ("gradient accumulation", {}, {"gradient_accumulation_steps": 2}),
    ],
)
def test_healthy_lora_run_with_all_guards_trains_to_the_end_untouched(
    tmp_path: Path, case: str, lora: dict[str, Any], args: dict[str, Any]
) -> None:
    sink = ListSink()
    guard = AdapterGuard(alert_sinks=[sink])
    steps = Steps()
    trainer = make_trainer(
        tmp_path, model=peft_model(**lora), callbacks=[*all_guards_with(guard), steps], max_steps=6, **args
    )
    trainer.train()
    assert trainer.state.global_step == 6 and steps.steps == 6
    assert sink.alerts == []
    assert guard.summary() == "every adapter parameter trains (checked through step 6)"


def test_a_second_inactive_frozen_adapter_is_no_alarm(tmp_path: Path) -> None:
    from peft import LoraConfig

    model = peft_model()
    model.add_adapter("other", LoraConfig(r=4, target_modules=["k_proj"], task_type="CAUSAL_LM"))
    model.set_adapter("default")
    guard = AdapterGuard()
    trainer = make_trainer(tmp_path, model=model, callbacks=[guard], max_steps=4)
    trainer.train()
    assert trainer.state.global_step == 4
    assert guard.summary() == "every adapter parameter trains (checked through step 4)"


def test_a_run_shorter_than_two_steps_is_not_checked_for_zero(tmp_path: Path) -> None:
    """With a warmup starting at lr 0 the first step cannot move lora_B: never an alarm at step 1."""
    guard = AdapterGuard()
    trainer = make_trainer(tmp_path, model=peft_model(), callbacks=[guard], max_steps=1, warmup_steps=2)
    trainer.train()
    assert trainer.state.global_step == 1
    assert guard.summary().endswith("the run ended after 1 step(s), before check_step 2: the zero check did not run")


# ------------------------------------------------------------------------------------------ not a PEFT model
def test_a_model_without_adapters_is_left_alone(tmp_path: Path) -> None:
    sink = ListSink()
    guard = AdapterGuard(alert_sinks=[sink], check_step=1)
    trainer = make_trainer(tmp_path, callbacks=[guard], max_steps=3, learning_rate=0.0)
    trainer.train()
    assert trainer.state.global_step == 3 and sink.alerts == []
    assert guard.summary() == ""  # nothing to tell: the end-of-run report leaves the guard out


def test_the_checks_import_neither_peft_nor_transformers() -> None:
    """(transformers itself imports peft when installed; the guard adds no import of its own.)"""
    code = "import sys, trainguard.checks.adapter; print('peft' in sys.modules, 'transformers' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------------------------------ the checks
def test_adapter_parameters_are_recognised_by_name_and_filtered_by_adapter() -> None:
    named = [
        ("m.q.lora_A.default.weight", torch.nn.Parameter(torch.ones(2))),
        ("m.q.lora_B.other.weight", torch.nn.Parameter(torch.zeros(2), requires_grad=False)),
        ("m.q.base_layer.weight", torch.nn.Parameter(torch.ones(2))),
        ("m.e.lora_embedding_B.default", torch.nn.Parameter(torch.ones(2))),
    ]
    found = adapter_parameters(named)
    assert [(p.module, p.kind, p.adapter, p.trainable) for p in found] == [
        ("m.q", "lora_A", "default", True),
        ("m.q", "lora_B", "other", False),
        ("m.e", "lora_embedding_B", "default", True),
    ]
    assert [p.name for p in adapter_parameters(named, ["default"])] == [named[0][0], named[3][0]]
    assert no_grad_parameters(named, [named[0][0]]) == [named[0][0]]
    assert zero_parameters(named, [n for n, _ in named]) == [named[1][0]]
    assert zero_parameters([("empty", torch.zeros(0))], ["empty"]) == []  # a rank holding no shard
    assert module_list([f"base_model.model.m{i}" for i in range(10)], shown=2) == "m0, m1 and 8 more"


@pytest.mark.parametrize(("kwargs", "match"), [({"action": "ignore"}, "action"), ({"check_step": 0}, "check_step")])
def test_bad_options_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdapterGuard(**kwargs)


# ------------------------------------------------------------------------------------------ two ranks
@pytest.mark.parametrize(("scenario", "step"), [("gc", 1), ("lr0", 3)])
def test_two_ranks_stop_at_the_same_step_with_the_same_error(tmp_path: Path, scenario: str, step: int) -> None:
    import json

    result = run_torchrun(TESTS_DIR / "scripts" / "adapter_guard_train.py", str(tmp_path), scenario, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    docs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(d["stopped"] and d["step"] == step for d in docs)
    assert docs[0]["what"] == docs[1]["what"]
    assert docs[0]["steps"] == docs[1]["steps"] == step - 1


def test_two_ranks_train_a_healthy_run_to_the_end(tmp_path: Path) -> None:
    import json

    result = run_torchrun(TESTS_DIR / "scripts" / "adapter_guard_train.py", str(tmp_path), "healthy", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    docs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert docs == [{"stopped": False, "steps": 6}] * 2
