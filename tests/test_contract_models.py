"""The contract on architectures whose saves go through a key conversion: with ``all_guards()`` a run of a MoE model
(Mixtral, Qwen2-MoE) or a vision model (ViT) trains exactly as the plain Trainer does — same losses, bit-identical
weights — and its saves are audited and committed.

transformers 5 writes these models under other names than the live module's: Mixtral's fused
``mlp.experts.gate_up_proj`` as ``block_sparse_moe.experts.N.w1``/``w3``, ViT's ``vit.layers.N.attention.q_proj`` as
``vit.encoder.layer.N.attention.attention.query``. The save audit must judge what the files load back into, not a
difference of names; and where it cannot map the names it steps aside with one warning, it never stops the run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import trainguard
from _contract import HUB, assert_same_outcome, run_pair
from trainguard.callbacks import _trainer_compat as compat
from trainguard.checks.checkpoint.audit import audit_checkpoint

from _probes import TRANSFORMERS_MAJOR
from _rig import VOCAB_SIZE, make_lm_dataset, make_trainer

# save_spec replays transformers' save-time conversion (_trainer_compat); also run on the oldest releases.
pytestmark = pytest.mark.compat

RUN = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}


def tiny_mixtral() -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=VOCAB_SIZE,
    )
    return MixtralForCausalLM(config)


def tiny_qwen_moe() -> Any:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM  # in 4.47 and 5.x alike

    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        vocab_size=VOCAB_SIZE,
    )
    return Qwen2MoeForCausalLM(config)


def tiny_vit() -> Any:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    return ViTForImageClassification(config)


def image_dataset(n_rows: int = 16) -> Any:
    """Random 3x16x16 ``pixel_values`` and a label of 3 classes, made here."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(n_rows, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (n_rows,), generator=generator)
    return Dataset.from_dict({"pixel_values": pixels.tolist(), "labels": labels.tolist()})


MODELS: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
    "mixtral": (tiny_mixtral, make_lm_dataset),
    "qwen2_moe": (tiny_qwen_moe, make_lm_dataset),
    "vit": (tiny_vit, image_dataset),
}


def _train(output_dir: Path, name: str, callbacks: list[Any]) -> tuple[Any, Any]:
    make_model, make_data = MODELS[name]
    trainer = make_trainer(output_dir, model=make_model(), train_dataset=make_data(), callbacks=callbacks, **RUN)
    return trainer, trainer.train()


def _verifier(guards: list[Any]) -> trainguard.CheckpointVerifier:
    return next(g for g in guards if isinstance(g, trainguard.CheckpointVerifier))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_all_guards_train_a_converted_architecture_exactly_as_the_plain_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
):
    make_model, make_data = MODELS[name]
    guards: list[Any] = []

    def build(out: Path, callbacks: list[Any]) -> Any:
        guards.extend(c for c in callbacks if isinstance(c, trainguard.CheckpointVerifier))
        model = make_model()
        return make_trainer(out, model=model, train_dataset=make_data(), callbacks=callbacks, **RUN, **HUB)

    plain, guarded = run_pair(tmp_path, build, monkeypatch)
    assert plain.result.global_step == 4 and len(plain.uploads) == 4
    assert_same_outcome(plain, guarded)  # weights, log_history, a user callback's events, Hub uploads
    [verifier] = guards
    assert verifier.summary().count("2 save(s) audited") == 1 and "hollow" not in verifier.summary()
    for step in (2, 4):
        assert trainguard.verify_checkpoint(tmp_path / "guarded" / f"checkpoint-{step}").ok, step
    # The names were compared, not stepped aside: no warning, no error from any guard.
    assert [(a.guard, a.message) for a in verifier.alerter.history if a.level in ("warning", "error")] == []


@pytest.mark.slow
def test_a_missing_expert_in_a_converted_save_is_still_caught(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    trainer = make_trainer(tmp_path / "run", model=tiny_mixtral(), **{**RUN, "max_steps": 2})
    trainer.train()
    folder = tmp_path / "run" / "checkpoint-2"
    spec = compat.save_spec(trainer)
    assert spec.unmapped == ""
    assert audit_checkpoint(folder, spec) == []  # the intact save holds what the run has, under its saved names

    weights = load_file(folder / "model.safetensors")
    expert = "model.layers.1.block_sparse_moe.experts.2.w2.weight"  # per expert on disk, on 4.x and 5.x alike
    del weights[expert]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    problems = audit_checkpoint(folder, spec)
    assert [p.file for p in problems] == ["model.safetensors"]
    assert f"1 of the run's {len(spec.weights)} model tensor(s) are not in the saved weights: {expert}" in (
        problems[0].detail
    )


@pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="transformers 4.x saves Mixtral under its module names")
def test_a_conversion_that_cannot_be_replayed_steps_aside_with_one_warning_and_the_run_finishes(
    output_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    import transformers.core_model_loading as loading

    def unknown_conversion(model: Any, state_dict: Any) -> Any:
        raise NotImplementedError("a conversion op this release of trainguard has never seen")

    # save_pretrained keeps its own reference and still converts; only trainguard's replay meets the unknown op.
    monkeypatch.setattr(loading, "revert_weight_conversion", unknown_conversion)
    guards = trainguard.all_guards()
    _, output = _train(output_dir, "mixtral", guards)

    assert output.global_step == 4
    verifier = _verifier(guards)
    said = [a for a in verifier.alerter.history if a.level in ("warning", "error")]
    assert len(said) == 1 and said[0].guard == "checkpoint_verifier" and said[0].level == "warning"
    assert "not compared" in said[0].message and "NotImplementedError" in said[0].message
    assert "\n" not in said[0].message
    assert "2 save(s) audited" in verifier.summary() and "hollow" not in verifier.summary()
    assert trainguard.verify_checkpoint(output_dir / "checkpoint-4").ok


def test_with_unmappable_names_an_empty_weights_file_is_still_hollow(tmp_path: Path):
    from safetensors.torch import save_file

    spec = compat.save_spec(make_trainer(tmp_path / "run", model=tiny_mixtral()))
    spec.unmapped = "an unknown conversion"
    save_file({}, tmp_path / "model.safetensors")
    problems = audit_checkpoint(tmp_path, spec, optimizer=False)
    assert ("model.safetensors", "the saved weights hold no tensor") in [(p.file, p.detail) for p in problems]
    spec.unmapped = ""
    assert all("hold no tensor" not in p.detail for p in audit_checkpoint(tmp_path, spec, optimizer=False))


def test_a_transformers_without_the_conversion_api_trainguard_knows_is_unmapped(monkeypatch: pytest.MonkeyPatch):
    loading = pytest.importorskip("transformers.core_model_loading")
    monkeypatch.delattr(loading, "revert_weight_conversion")
    specs, unmapped = compat.as_saved(tiny_vit(), {"vit.layers.0.attention.q_proj.weight": torch.zeros(4, 4)})
    assert "API trainguard does not know" in unmapped
    assert list(specs) == ["vit.layers.0.attention.q_proj.weight"]


def test_a_4x_checkpoint_conversion_mapping_is_reversed_as_save_pretrained_does(monkeypatch: pytest.MonkeyPatch):
    import sys
    from types import SimpleNamespace

    monkeypatch.setitem(sys.modules, "transformers.core_model_loading", None)  # 4.x: no conversion machinery
    model = SimpleNamespace(
        _checkpoint_conversion_mapping={"^language_model.model": "model.language_model", "^vision_tower": "model.vt"}
    )
    tensors = {
        "model.language_model.layers.0.w": torch.zeros(2, 3),
        "model.vt.w": torch.zeros(1),
        "lm_head.w": torch.zeros(1),
    }
    specs, unmapped = compat.as_saved(model, tensors)
    assert unmapped == ""
    assert list(specs) == ["language_model.model.layers.0.w", "vision_tower.w", "lm_head.w"]
    assert specs["language_model.model.layers.0.w"].shape == (2, 3)
