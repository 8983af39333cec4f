"""The save audit and resume attestation with real saves and resumes (1 process; 2 ranks in
``test_save_audit_distributed.py``).

A hollow save is made by the real save path writing what the upstream bugs write: an empty tensor (ZeRO-3 + LoRA,
FSDP), a tensor of the wrong shape, no optimizer state. Every resume below that continues the run exactly must
raise nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import trainguard
from trainguard.checks import lineage
from trainguard.checks.checkpoint import MANIFEST_NAME, METADATA_NAME, SAVING_MARKER
from trainguard.checks.checkpoint.audit import SaveSpec, TensorSpec, audit_checkpoint

from _probes import TRANSFORMERS_MAJOR, Probe
from _rig import make_tiny_llama, make_trainer, run_trainer

# Touches Trainer internals: save hooks, the step hook, the optimizer and scheduler's state.
# Also run on the oldest supported releases (.ci/run).
pytestmark = pytest.mark.compat

SAVE = {"save_strategy": "steps", "save_steps": 2}


def _hollow_on_save(model: Any, step: int, make: Any) -> None:
    """Make ``model.save_pretrained`` write ``make(state_dict)`` at the save of ``step``: the real save path, with
    what a broken engine hands it."""
    original = model.save_pretrained
    calls = {"n": 0}

    def save_pretrained(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] * 2 == step:
            state = kwargs.get("state_dict") or dict(model.state_dict())
            kwargs["state_dict"] = make(dict(state))
        return original(*args, **kwargs)

    model.save_pretrained = save_pretrained


def _empty(name: str) -> Any:
    def make(state: dict[str, Any]) -> dict[str, Any]:
        state[name] = torch.empty(0, dtype=state[name].dtype)
        return state

    return make


# --------------------------------------------------------------------------------------------------- hollow saves
def test_a_save_with_an_empty_tensor_is_not_committed_and_stops_the_run_at_that_save(output_dir: Path):
    model = make_tiny_llama()
    _hollow_on_save(model, 4, _empty("model.embed_tokens.weight"))
    probe = Probe()
    with pytest.raises(trainguard.SaveAuditError) as info:
        run_trainer(output_dir, model=model, callbacks=[trainguard.CheckpointVerifier(), probe], max_steps=10, **SAVE)
    assert probe.steps == 4  # plain Trainer: trains 6 more steps and saves 3 more checkpoints on top of it
    err = info.value
    assert "model.embed_tokens.weight" in err.what and "saved empty" in err.what
    assert err.where["file"].endswith("checkpoint-4/model.safetensors")
    assert isinstance(err, trainguard.CheckpointIntegrityError)
    hollow = output_dir / "checkpoint-4"
    assert not (hollow / MANIFEST_NAME).exists()  # never committed
    assert (hollow / SAVING_MARKER).exists()  # and judged an interrupted save on resume
    assert trainguard.verify_checkpoint(output_dir / "checkpoint-2").ok
    probe = Probe()
    run_trainer(output_dir, callbacks=[trainguard.CheckpointVerifier(), probe], max_steps=6,
                resume_from_checkpoint=True, **SAVE)  # fmt: skip
    assert probe.began_at == 2


def test_a_lora_save_whose_adapter_is_hollow_is_caught(output_dir: Path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(make_tiny_llama(), lora)

    def zero3_without_gather(state: dict[str, Any]) -> dict[str, Any]:
        # What ZeRO-3 hands save_pretrained without a 16-bit gather: every partitioned tensor empty.
        return {k: torch.empty(0, dtype=v.dtype) for k, v in state.items()}

    _hollow_on_save(model, 2, zero3_without_gather)
    with pytest.raises(trainguard.SaveAuditError) as info:
        run_trainer(output_dir, model=model, callbacks=[trainguard.CheckpointVerifier()], max_steps=4, **SAVE)
    assert "adapter_model.safetensors" in info.value.where["file"]
    assert "lora_A" in info.value.what and "saved empty" in info.value.what
    assert (output_dir / "checkpoint-2" / "adapter_model.safetensors").stat().st_size < 2000  # a hollow file


def test_with_audit_alert_a_hollow_save_is_reported_and_not_committed_and_the_run_goes_on(output_dir: Path):
    model = make_tiny_llama()
    _hollow_on_save(model, 2, _empty("lm_head.weight"))
    verifier = trainguard.CheckpointVerifier(audit="alert")
    _, output = run_trainer(output_dir, model=model, callbacks=[verifier], max_steps=4, **SAVE)
    assert output.global_step == 4
    assert not (output_dir / "checkpoint-2" / MANIFEST_NAME).exists()
    assert trainguard.verify_checkpoint(output_dir / "checkpoint-4").ok
    assert any("lm_head.weight" in a.message and a.level == "error" for a in verifier.alerter.history)
    assert "1 hollow" in verifier.summary()


def test_a_save_without_its_optimizer_state_is_caught(output_dir: Path, monkeypatch: pytest.MonkeyPatch):
    trainer = make_trainer(output_dir, callbacks=[trainguard.CheckpointVerifier()], max_steps=4, **SAVE)
    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", lambda output_dir: None)
    with pytest.raises(trainguard.SaveAuditError) as info:
        trainer.train()
    assert "optimizer.pt" in info.value.what and "scheduler.pt" in info.value.what
    assert "restarts the optimizer" in info.value.what


def test_an_optimizer_state_that_misses_parameters_is_caught_before_the_commit_and_stops_at_the_next_step(
    output_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    trainer = make_trainer(output_dir, callbacks=[trainguard.CheckpointVerifier()], max_steps=6, **SAVE)
    original = trainer._save_optimizer_and_scheduler

    def lose_the_optimizer_state(folder: str) -> None:
        original(folder)
        torch.save({"state": {}, "param_groups": [{"params": []}]}, f"{folder}/optimizer.pt")

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", lose_the_optimizer_state)
    with pytest.raises(trainguard.SaveAuditError) as info:
        trainer.train()
    assert "optimizer.pt: holds 0 parameter(s); the run's optimizer has" in info.value.what
    assert trainer.state.global_step == 3  # checked off the training thread, shared at the step after the save
    assert not (output_dir / "checkpoint-2" / MANIFEST_NAME).exists()


def test_the_audit_reads_headers_and_names_shape_dtype_and_missing_tensors(tmp_path: Path):
    from safetensors.torch import save_file

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.float16)}, str(folder / "model.safetensors"))
    spec = SaveSpec(
        weights={
            "a": TensorSpec((3, 2), "F32"),
            "b": TensorSpec((4,), "BF16"),
            "c": TensorSpec((1,), "F32"),
            "tied": TensorSpec((2, 3), "F32"),
        },
        tied={"tied": "a"},
        model_only=True,
    )
    problems = audit_checkpoint(folder, spec)
    details = " | ".join(p.detail for p in problems)
    assert "1 of the run's 4 model tensor(s) are not in the saved weights: c" in details  # "tied" may be missing
    assert "'a' was saved with shape [2, 3]" in details
    assert "'b' was saved as F16" in details
    assert len(problems) == 3 and {p.kind for p in problems} == {"hollow"}


# ------------------------------------------------------------------------------------------------ dry run
@pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="transformers 4.x drops undeclared shared tensors with a warning")
def test_a_model_with_shared_tensors_it_does_not_declare_is_refused_before_step_1(output_dir: Path):
    model = make_tiny_llama()
    model.model.layers[1].mlp.down_proj.weight = model.model.layers[0].mlp.down_proj.weight
    probe = Probe()
    with pytest.raises(trainguard.SaveAuditError) as info:
        run_trainer(output_dir, model=model, callbacks=[trainguard.CheckpointVerifier(), probe], max_steps=4, **SAVE)
    assert probe.steps == 0  # plain Trainer: trains 2 steps, then crashes in its first save
    assert "shared tensors" in info.value.what and "down_proj" in info.value.what
    assert "_tied_weights_keys" in info.value.next_step
    assert not list(output_dir.glob("checkpoint-*"))


def test_a_tied_model_saves_and_audits_clean(output_dir: Path):
    model = make_tiny_llama(tie_word_embeddings=True)
    verifier = trainguard.CheckpointVerifier()
    run_trainer(output_dir, model=model, callbacks=[verifier], max_steps=2, **SAVE)
    assert "1 save(s) audited" in verifier.summary() and "hollow" not in verifier.summary()


# ---------------------------------------------------------------------------------------------- attestation
def _findings(verifier: trainguard.CheckpointVerifier) -> list[tuple[str, str]]:
    return [(f.level, f.format()) for f in verifier._auditor.findings]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("attest") / "run"
    run_trainer(out, callbacks=[trainguard.CheckpointVerifier()], max_steps=8, **SAVE)
    return out


@pytest.fixture
def run(saved_run: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(saved_run, copy)
    return copy


def _resume(run: Path, checkpoint: str = "checkpoint-4", **kwargs: Any) -> trainguard.CheckpointVerifier:
    options = {k: kwargs.pop(k) for k in ("attest_resume",) if k in kwargs}
    verifier = trainguard.CheckpointVerifier(**options)
    settings = {"max_steps": 8, **SAVE, **kwargs}
    run_trainer(run, callbacks=[verifier], resume_from_checkpoint=str(run / checkpoint), **settings)
    return verifier


def test_repeated_identical_resumes_raise_nothing(run: Path):
    for checkpoint in ("checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-4"):
        verifier = _resume(run, checkpoint)
        assert _findings(verifier) == [], checkpoint
        assert not [a for a in verifier.alerter.history if "attestation" in a.message]


def test_a_changed_schedule_is_named_field_by_field(run: Path):
    verifier = _resume(run, max_steps=20)  # the saved run decayed to 0 at step 8; this one at step 20
    found = _findings(verifier)
    # A deliberate change (train longer) is a warning naming it; the lr the run continues with differs from the saved.
    assert any(level == "warning" and "learning rate after the next step" in text and "max_steps: 8 at the save, 20 now"
               in text for level, text in found), found  # fmt: skip


def test_a_longer_run_on_a_constant_schedule_resumes_without_a_warning(tmp_path: Path):
    out = tmp_path / "run"
    constant = {"lr_scheduler_type": "constant", **SAVE}
    run_trainer(out, callbacks=[trainguard.CheckpointVerifier()], max_steps=4, **constant)
    verifier = trainguard.CheckpointVerifier()
    resumed, _ = run_trainer(out, callbacks=[verifier], max_steps=8, resume_from_checkpoint=str(out / "checkpoint-4"),
                             **constant)  # fmt: skip
    assert _findings(verifier) == []
    assert not [a for a in verifier.alerter.history if "attestation" in a.message]
    # ... and the resumed run is the uninterrupted one, bit for bit (so the silence is right).
    straight, _ = run_trainer(tmp_path / "straight", max_steps=8, **constant)
    for (name, a), b in zip(resumed.model.state_dict().items(), straight.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_same_global_batch_in_another_geometry_resumes_without_a_warning(run: Path):
    # saved: 2 rows x 1 micro-batch per step; now: 1 row x 2 micro-batches, the same 2 rows per update
    verifier = _resume(run, per_device_train_batch_size=1, gradient_accumulation_steps=2)
    assert not [text for _, text in _findings(verifier) if "batch geometry" in text]


def test_another_global_batch_is_still_named(run: Path):
    verifier = _resume(run, per_device_train_batch_size=4)
    found = " | ".join(text for _, text in _findings(verifier))
    assert "batch geometry changed" in found and "per_device_train_batch_size: 2 at the save, 4 now" in found


def test_a_changed_learning_rate_is_named_although_the_trainer_ignores_it(run: Path):
    verifier = _resume(run, learning_rate=5e-4)
    found = " | ".join(text for _, text in _findings(verifier))
    assert "learning_rate: 0.001 at the save, 0.0005 now" in found


def test_a_resume_that_does_not_skip_the_trained_batches_is_named_at_its_first_step(run: Path):
    verifier = _resume(run, ignore_data_skip=True)
    found = _findings(verifier)
    assert any(level == "error" and "first batch after the resume" in text and "ignore_data_skip=True" in text
               for level, text in found), found  # fmt: skip


def test_a_resume_with_another_data_order_seed_is_named(run: Path):
    verifier = _resume(run, seed=7)
    found = " | ".join(text for _, text in _findings(verifier))
    assert "first batch after the resume" in found and "seed: 0 at the save, 7 now" in found


def test_a_checkpoint_whose_optimizer_state_the_trainer_does_not_load_is_an_error(run: Path):
    folder = run / "checkpoint-4"
    record = lineage.checkpoint_origin(folder).record
    (folder / "scheduler.pt").unlink()  # the Trainer loads the optimizer only when both files are there
    trainguard.write_manifest(folder, lineage=record)  # a checkpoint that verifies, as a half-done copy would
    found = _findings(_resume(run))
    assert any(level == "error" and "optimizer state was not restored" in text for level, text in found), found


def test_a_model_only_checkpoint_says_the_optimizer_restarts(tmp_path: Path):
    out = tmp_path / "run"
    run_trainer(out, callbacks=[trainguard.CheckpointVerifier()], max_steps=4, save_only_model=True, **SAVE)
    verifier = trainguard.CheckpointVerifier()
    run_trainer(out, callbacks=[verifier], max_steps=6, save_only_model=True,
                resume_from_checkpoint=str(out / "checkpoint-4"), **SAVE)  # fmt: skip
    found = _findings(verifier)
    assert any(level == "warning" and "model-only" in text and "optimizer restarts" in text for level, text in found)
    assert not any(level == "error" and "optimizer state was not restored" in text for level, text in found)


def test_a_resume_that_would_train_nothing_is_an_error_and_raises_when_strict(run: Path):
    verifier = _resume(run, "checkpoint-8")
    assert any(level == "error" and "would train no step" in text and "max_steps=8 is reached" in text
               for level, text in _findings(verifier))  # fmt: skip
    probe = Probe()
    verifier = trainguard.CheckpointVerifier(attest_resume="raise")
    with pytest.raises(trainguard.ResumeAttestationError, match="max_steps=8 is reached"):
        run_trainer(run, callbacks=[verifier, probe], max_steps=8, resume_from_checkpoint=str(run / "checkpoint-8"),
                    **SAVE)  # fmt: skip
    assert probe.steps == 0


def test_the_facts_and_the_step_after_each_save_are_recorded(run: Path):
    meta = json.loads((run / "checkpoint-4" / METADATA_NAME).read_text())
    facts = meta["lineage"]["resume"]
    assert facts["global_step"] == 4 and facts["optimizer_step"] == 4.0
    assert facts["per_device_train_batch_size"] == 2 and facts["max_steps"] == 8
    origin = lineage.checkpoint_origin(run / "checkpoint-4")
    after = lineage.after_save(run, "checkpoint-4", origin.run)
    assert after is not None and after["world_size"] == 1 and after["batch"] and after["rng"]
    assert lineage.after_save(run, "checkpoint-8", origin.run) is None  # the run ended at that save


def test_sft_trainer_with_lora_resumes_without_a_false_alarm(tmp_path: Path):
    pytest.importorskip("trl", minversion="0.20")  # the compat script's SFTConfig(max_length=...)
    from test_compat_trainers import _compat

    compat = _compat()
    out = tmp_path / "run"
    compat.build_trainer("sft_lora", out, max_steps=6, save_steps=2).train()
    trainer = compat.build_trainer("sft_lora", out, max_steps=6, save_steps=2)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    verifier = next(c for c in trainer.callback_handler.callbacks if isinstance(c, trainguard.CheckpointVerifier))
    assert _findings(verifier) == []
    assert "save(s) audited" in verifier.summary() and "hollow" not in verifier.summary()
