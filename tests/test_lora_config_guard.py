"""check_lora_config and LoraConfigGuard with real PEFT on the tiny Llama: a changed LoRA config is refused before
the checkpoint loads, naming the field and both values; the same config resumes; the adapter weights are confirmed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

import trainguard
from trainguard import CheckpointIntegrityError, LoraConfigGuard, LoraConfigMismatchError, check_lora_config

from _rig import make_lm_dataset, make_tiny_llama, make_trainer, run_trainer

# Touches Trainer internals (loading adapter weights (continue_on_new_data)): also run on the oldest supported releases.
pytestmark = pytest.mark.compat

BASE = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}


def lora_config(**changes: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(**{**BASE, **changes})


def peft_model(adapter_name: str = "default", **changes: Any) -> Any:
    from peft import get_peft_model

    return get_peft_model(make_tiny_llama(), lora_config(**changes), adapter_name=adapter_name)


class StepCounter(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.steps += 1
        return control


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run (r=8, alpha=16, q/v) trained 4 steps with checkpoints at 2 and 4; copied per test."""
    out = tmp_path_factory.mktemp("lora") / "run"
    run_trainer(out, model=peft_model(), max_steps=4, save_strategy="steps", save_steps=2)
    assert (out / "checkpoint-4" / "adapter_config.json").is_file()
    return out


@pytest.fixture
def run_dir(trained: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(trained, target)
    return target


def _resume(run_dir: Path, model: Any, *, guard: bool = True, **args: Any) -> tuple[Any, StepCounter]:
    counter = StepCounter()
    callbacks: list[Any] = ([LoraConfigGuard()] if guard else []) + [counter]
    return make_trainer(run_dir, model=model, callbacks=callbacks, **{"max_steps": 6, **args}), counter


# ---------------------------------------------------------------------------------------------- the function
@pytest.mark.parametrize(
    ("field", "change", "old", "new"),
    [
        ("r", {"r": 16}, 8, 16),
        ("lora_alpha", {"lora_alpha": 32}, 16, 32),
        ("target_modules", {"target_modules": ["q_proj", "k_proj", "v_proj"]}, "['q_proj', 'v_proj']", "'k_proj'"),
        ("use_dora", {"use_dora": True}, False, True),
        ("use_rslora", {"use_rslora": True}, False, True),
        ("lora_dropout", {"lora_dropout": 0.1}, 0.0, 0.1),
        ("bias", {"bias": "lora_only"}, "none", "lora_only"),
        ("modules_to_save", {"modules_to_save": ["lm_head"]}, None, "lm_head"),
        ("rank_pattern", {"rank_pattern": {"q_proj": 4}}, {}, "q_proj"),
        ("alpha_pattern", {"alpha_pattern": {"v_proj": 64}}, {}, "v_proj"),
        ("task_type", {"task_type": "SEQ_CLS"}, "CAUSAL_LM", "SEQ_CLS"),
    ],
)
def test_each_changed_field_is_refused_naming_it_and_both_values(
    trained: Path, field: str, change: dict, old: Any, new: Any
):
    with pytest.raises(LoraConfigMismatchError) as info:
        check_lora_config(trained / "checkpoint-4", lora_config(**change))
    assert info.value.where["field"] == field
    assert str(trained / "checkpoint-4" / "adapter_config.json") in info.value.where["file"]
    message = str(info.value)
    assert f"adapter 'default' {field}: checkpoint " in message
    assert str(old) in message and str(new) in message


def test_the_same_config_passes_whatever_the_order_of_target_modules(trained: Path, run_dir: Path):
    assert check_lora_config(trained / "checkpoint-4", lora_config(target_modules=["v_proj", "q_proj"])) == []
    file = run_dir / "checkpoint-4" / "adapter_config.json"
    for order in (["v_proj", "q_proj"], ["q_proj", "v_proj"]):  # peft writes a set: the JSON order is arbitrary
        file.write_text(json.dumps({**json.loads(file.read_text()), "target_modules": order}))
        assert check_lora_config(run_dir / "checkpoint-4", {"target_modules": ["q_proj", "v_proj"]}) == []
    assert check_lora_config(trained / "checkpoint-4", {**BASE, "target_modules": {"v_proj", "q_proj"}}) == []
    # a dict names only the fields to check
    assert check_lora_config(trained / "checkpoint-4", {"r": 8, "lora_alpha": 16}) == []
    with pytest.raises(LoraConfigMismatchError, match="lora_alpha: checkpoint 16, this run 8"):
        check_lora_config(trained / "checkpoint-4", {"r": 8, "lora_alpha": 8})


def test_a_regex_target_modules_is_compared_as_a_regex(tmp_path: Path):
    peft_model(target_modules=r".*\.(q_proj|v_proj)").save_pretrained(tmp_path)
    assert check_lora_config(tmp_path, lora_config(target_modules=r".*\.(q_proj|v_proj)")) == []
    with pytest.raises(LoraConfigMismatchError, match="regex"):
        check_lora_config(tmp_path, lora_config())  # the same modules as a list: another config on paper


def test_fields_that_cannot_matter_and_fields_the_user_ignores_are_left_out(run_dir: Path):
    file = run_dir / "checkpoint-4" / "adapter_config.json"
    saved = json.loads(file.read_text())
    saved.update(inference_mode=False, peft_version="0.0.1", revision="abc", init_lora_weights="gaussian")
    file.write_text(json.dumps(saved))
    assert check_lora_config(run_dir / "checkpoint-4", lora_config()) == []
    assert check_lora_config(run_dir / "checkpoint-4", lora_config(lora_dropout=0.2), ignore=["lora_dropout"]) == []


def test_another_base_model_is_a_warning_not_a_refusal(run_dir: Path):
    file = run_dir / "checkpoint-4" / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "base_model_name_or_path": "org/model-a"}))
    warnings = check_lora_config(run_dir / "checkpoint-4", {**lora_config().to_dict(), "base_model_name_or_path": "b"})
    assert len(warnings) == 1 and "org/model-a" in warnings[0] and "'b'" in warnings[0]


@pytest.mark.parametrize(("content", "line"), [('{\n  "r": 8,\n  "lora_alpha": \n}', 4), ("[1, 2]", None)])
def test_a_malformed_adapter_config_names_the_file_and_line(run_dir: Path, content: str, line: int | None):
    file = run_dir / "checkpoint-4" / "adapter_config.json"
    file.write_text(content)
    with pytest.raises(CheckpointIntegrityError) as info:
        check_lora_config(run_dir / "checkpoint-4", lora_config())
    assert info.value.where["file"] == str(file)
    assert info.value.where.get("line") == line


def test_every_adapter_of_a_checkpoint_is_compared_by_name(tmp_path: Path):
    model = peft_model()
    model.add_adapter("other", lora_config(r=4))
    model.save_pretrained(tmp_path)  # "other" goes into a sub-folder
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    assert check_lora_config(tmp_path, model.peft_config) == []
    with pytest.raises(LoraConfigMismatchError, match="adapter 'other' r: checkpoint 4, this run 8"):
        check_lora_config(tmp_path, {"default": lora_config(), "other": lora_config()})
    with pytest.raises(LoraConfigMismatchError, match="adapter 'other' adapter: checkpoint 'present'"):
        check_lora_config(tmp_path, {"default": lora_config()})


def test_a_checkpoint_with_no_adapter_is_refused_for_a_lora_run(tmp_path: Path):
    with pytest.raises(LoraConfigMismatchError, match=r"holds no adapter_config\.json"):
        check_lora_config(tmp_path, lora_config())


# --------------------------------------------------------------------------------------------- the guard
def test_plain_trainer_resumes_another_lora_alpha_silently(run_dir: Path):
    trainer, steps = _resume(run_dir, peft_model(lora_alpha=32), guard=False)
    assert trainer.train(resume_from_checkpoint=True).global_step == 6 and steps.steps == 2  # wrong scaling, no word


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("r", {"r": 16}),
        ("lora_alpha", {"lora_alpha": 32}),
        ("target_modules", {"target_modules": ["q_proj", "k_proj", "v_proj"]}),
        ("use_dora", {"use_dora": True}),
    ],
)
def test_the_guard_refuses_a_changed_lora_config_before_the_checkpoint_loads(run_dir: Path, field: str, change: dict):
    model = peft_model(**change)
    trainer, steps = _resume(run_dir, model)
    loads: list[str] = []
    original = trainer._load_from_checkpoint
    trainer._load_from_checkpoint = lambda *a, **k: (loads.append("load"), original(*a, **k))  # type: ignore[method-assign]
    with pytest.raises(LoraConfigMismatchError) as info:
        trainer.train(resume_from_checkpoint=True)
    assert info.value.where["field"] == field
    assert loads == [] and steps.steps == 0 and trainer.state.global_step == 0  # nothing loaded, nothing trained


def test_the_same_lora_config_resumes_and_the_adapter_weights_are_confirmed(run_dir: Path):
    guard = LoraConfigGuard()
    trainer = make_trainer(run_dir, model=peft_model(), callbacks=[guard], max_steps=6)
    assert trainer.train(resume_from_checkpoint=True).global_step == 6
    assert guard.summary() == "checkpoint-4: same LoRA config; adapter weights restored"


def test_an_adapter_silently_not_restored_is_caught_before_the_first_step(run_dir: Path):
    trainer, steps = _resume(run_dir, peft_model())
    # the failure of tloen/alpaca-lora#72 and peft#2699: the load "succeeds" and the adapter keeps its fresh weights
    trainer._load_from_checkpoint = lambda *a, **k: None  # type: ignore[method-assign]
    with pytest.raises(LoraConfigMismatchError, match="adapter silently not restored") as info:
        trainer.train(resume_from_checkpoint=True)
    assert "lora_B" in str(info.value) and steps.steps == 0


def test_a_lora_checkpoint_resumed_into_a_model_without_adapters_is_refused(run_dir: Path):
    trainer, steps = _resume(run_dir, make_tiny_llama())
    with pytest.raises(LoraConfigMismatchError, match="holds LoRA adapter"):
        trainer.train(resume_from_checkpoint=True)
    assert steps.steps == 0


def test_continue_on_new_data_loads_the_adapter_weights_and_starts_at_step_0(run_dir: Path):
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "checkpoint-4" / "adapter_model.safetensors"))
    new_data = make_lm_dataset(8, seed=5)
    trainer, steps = _resume(run_dir, peft_model(), train_dataset=new_data, max_steps=-1, num_train_epochs=1)
    loaded_from = trainguard.continue_on_new_data(trainer)
    assert loaded_from.name == "checkpoint-4" and loaded_from.parent.parent.name == "trainguard-archive"
    live = get_peft_model_state_dict(trainer.model)
    assert saved.keys() == live.keys()
    assert all(torch.equal(live[k].cpu(), v) for k, v in saved.items())
    assert trainer.train().global_step == 4 and steps.steps == 4  # 8 rows / batch 2, from step 0


def test_continue_on_new_data_refuses_another_lora_config_clearly(run_dir: Path):
    trainer, _ = _resume(run_dir, peft_model(r=4))
    with pytest.raises(LoraConfigMismatchError, match="r: checkpoint 8, this run 4"):
        trainguard.continue_on_new_data(trainer)
    assert (run_dir / "checkpoint-4").is_dir()  # nothing moved
