"""CheckpointVerifier in real Trainer runs: manifests on save, resume from the newest verified checkpoint, refusals,
rotation with save_total_limit, and LoRA checkpoints."""

from __future__ import annotations

import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from transformers import Trainer, TrainerCallback

import trainguard
from trainguard.checks import checkpoint as ckpt
from trainguard.errors import CheckpointIntegrityError

from _probes import Probe
from _rig import make_tiny_llama, make_trainer, run_trainer

# Touches Trainer internals (save hooks and rotation routing): also run on the oldest supported releases.
pytestmark = pytest.mark.compat

SAVE = {"save_strategy": "steps", "save_steps": 2}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "run"
    run_trainer(out, callbacks=[trainguard.CheckpointVerifier()], max_steps=4, **SAVE)
    return out


@pytest.fixture
def run(trained_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def _flip(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize(
    ("damage", "name"),
    [("flip", "optimizer.pt"), ("flip", "model.safetensors"), ("truncate", "model.safetensors")],
)
def test_resume_true_skips_a_damaged_newest_checkpoint_and_resumes_from_the_previous_verified_one(
    run: Path, damage: str, name: str, caplog: pytest.LogCaptureFixture
):
    if damage == "flip":
        _flip(run / "checkpoint-4" / name, 7)
    else:
        _truncate(run / "checkpoint-4" / name)
    probe = Probe()
    with caplog.at_level("WARNING", logger="trainguard"):
        run_trainer(
            run, callbacks=[trainguard.CheckpointVerifier(), probe], max_steps=6, resume_from_checkpoint=True, **SAVE
        )
    assert probe.began_at == 2  # plain Trainer: 4 from corrupted state, or a SafetensorError crash when truncated
    assert probe.steps == 4
    quarantined = sorted((run / ckpt.QUARANTINE_DIR).glob("checkpoint-4.*Z"))
    assert len(quarantined) == 1  # set aside, never deleted
    assert (quarantined[0] / name).is_file()
    assert "checkpoint-4" in caplog.text
    assert name in caplog.text
    for step in (2, 4, 6):  # the run goes on and its new checkpoints verify
        assert trainguard.verify_checkpoint(run / f"checkpoint-{step}").ok


def test_an_explicit_resume_path_that_fails_is_refused_before_anything_is_loaded(run: Path):
    _flip(run / "checkpoint-4" / "model.safetensors", 11)
    probe = Probe()
    model = make_tiny_llama(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(run, model=model, callbacks=[trainguard.CheckpointVerifier(), probe], max_steps=6, **SAVE)
    with pytest.raises(CheckpointIntegrityError) as info:
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-4"))
    assert info.value.where["file"] == str(run / "checkpoint-4" / "model.safetensors")
    assert str(run / "checkpoint-2") in info.value.next_step
    assert probe.began_at is None
    after = model.state_dict()
    assert all((before[k] == after[k]).all() for k in before)  # no weight was loaded
    assert (run / "checkpoint-4").is_dir()  # an explicit choice is refused, not moved


def test_when_train_is_reached_around_the_wrapper_the_loaded_checkpoint_is_refused_before_the_first_step(run: Path):
    _flip(run / "checkpoint-4" / "optimizer.pt", 13)
    probe = Probe()
    trainer = make_trainer(run, callbacks=[trainguard.CheckpointVerifier(), probe], max_steps=6, **SAVE)
    with pytest.raises(CheckpointIntegrityError):
        Trainer.train(trainer, resume_from_checkpoint=str(run / "checkpoint-4"))  # the class method: no wrapper
    assert probe.steps == 0


def test_when_no_checkpoint_verifies_the_resume_is_refused_listing_each(run: Path):
    _flip(run / "checkpoint-4" / "scheduler.pt", 17)
    (run / "checkpoint-2" / "rng_state.pth").unlink()
    with pytest.raises(CheckpointIntegrityError) as info:
        run_trainer(run, callbacks=[trainguard.CheckpointVerifier()], max_steps=6, resume_from_checkpoint=True, **SAVE)
    assert "scheduler.pt" in info.value.what
    assert "rng_state.pth" in info.value.what
    assert len(list((run / ckpt.QUARANTINE_DIR).glob("checkpoint-*Z"))) == 2


def test_a_pre_flight_call_resolves_the_same_checkpoint_without_a_trainer(run: Path):
    _flip(run / "checkpoint-4" / "trainer_state.json", 19)
    assert trainguard.resolve_verified_resume(run, True) == run / "checkpoint-2"
    assert not (run / "checkpoint-4").exists()
    with pytest.raises(CheckpointIntegrityError):
        trainguard.resolve_verified_resume(run, next((run / ckpt.QUARANTINE_DIR).glob("checkpoint-4.*Z")))


def test_manifests_are_hashed_off_the_training_thread_and_train_end_waits_for_them(
    output_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    real = ckpt.write_manifest
    threads: list[str] = []
    finished: list[float] = []

    def slow(folder: Any, **kwargs: Any) -> Path:
        threads.append(threading.current_thread().name)
        time.sleep(0.3)
        result = real(folder, **kwargs)
        finished.append(time.monotonic())
        return result

    monkeypatch.setattr(ckpt, "write_manifest", slow)
    trainer = make_trainer(output_dir, callbacks=[trainguard.CheckpointVerifier()], max_steps=4, **SAVE)
    trainer.train()
    assert threads and all(name.startswith("trainguard-manifest") for name in threads)
    assert len(finished) == 2
    for step in (2, 4):
        assert trainguard.verify_checkpoint(output_dir / f"checkpoint-{step}").mode == "manifest"


class RotationProbe(TrainerCallback):
    """Placed before CheckpointVerifier: looks at the output_dir when on_save fires, i.e. right after the Trainer's
    save and rotation and before the new checkpoint's manifest exists."""

    def __init__(self) -> None:
        self.verified_at_save: list[Path | None] = []

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.verified_at_save.append(ckpt.latest_verified_checkpoint(args.output_dir))


@pytest.mark.parametrize("protect", [True, False])
def test_save_total_limit_1_never_leaves_the_run_without_a_verified_checkpoint(output_dir: Path, protect: bool):
    probe = RotationProbe()
    run_trainer(
        output_dir,
        callbacks=[probe, trainguard.CheckpointVerifier(protect_rotation=protect)],
        max_steps=4,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=1,
    )
    later_saves = probe.verified_at_save[1:]  # at the first save there is nothing older to keep
    # Plain rotation deletes the only verified checkpoint before the new one has a manifest; trainguard's never
    # deletes the lineage's newest committed checkpoint, whenever it runs.
    assert later_saves == [output_dir / f"checkpoint-{s}" for s in (1, 2, 3)]
    kept = sorted(p.name for p in output_dir.glob("checkpoint-*"))
    # Deferred (default): rotation after the commit, down to the limit. Inside the save: one more until the next.
    assert kept == (["checkpoint-4"] if protect else ["checkpoint-3", "checkpoint-4"])
    assert trainguard.verify_checkpoint(output_dir / "checkpoint-4").ok


def test_a_lora_checkpoint_gets_a_manifest_and_verifies(output_dir: Path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(make_tiny_llama(), lora)
    run_trainer(output_dir, model=model, callbacks=[trainguard.CheckpointVerifier()], max_steps=2, **SAVE)
    folder = output_dir / "checkpoint-2"
    listed = ckpt.parse_sha256_file(folder / ckpt.MANIFEST_NAME)
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json"} <= set(listed)
    assert trainguard.verify_checkpoint(folder).ok
    _flip(folder / "adapter_model.safetensors", 23)
    with pytest.raises(CheckpointIntegrityError) as info:
        trainguard.verify_checkpoint(folder)
    assert info.value.where["file"] == str(folder / "adapter_model.safetensors")


def test_all_guards_includes_the_verifier_before_the_guards_that_read_the_resumed_checkpoint():
    keys = [key for key, _ in trainguard.callbacks._GUARDS]
    assert "checkpoint_verifier" in keys
    assert keys.index("run_lock") < keys.index("checkpoint_verifier") < keys.index("dataset_guard")
    guards = trainguard.all_guards(**{k: False for k in keys if k != "checkpoint_verifier"})
    assert [type(g).__name__ for g in guards] == ["CheckpointVerifier"]


def test_a_mistyped_resume_path_raises_the_plain_trainers_value_error_with_advice_to_check_the_path(run: Path):
    typo = run / "chekpoint-4"
    with pytest.raises(ValueError, match="Can't find a valid checkpoint at") as plain:
        make_trainer(run, max_steps=6).train(resume_from_checkpoint=str(typo))
    with pytest.raises(ValueError, match="does not exist") as guarded:
        make_trainer(run, callbacks=trainguard.all_guards(), max_steps=6, **SAVE).train(
            resume_from_checkpoint=str(typo)
        )
    err = guarded.value
    assert isinstance(err, CheckpointIntegrityError) and type(plain.value) is ValueError
    assert err.what == f"the checkpoint {typo} does not exist" and err.where["folder"] == str(typo)
    assert "typo" in err.next_step and "backup" not in str(err)
    assert f"Beside it in {run}: checkpoint-2, checkpoint-4." in err.next_step  # the path meant, most likely
    assert (run / "checkpoint-4").is_dir() and not typo.exists()  # nothing was moved or made


def test_resume_true_with_no_checkpoint_raises_the_plain_trainers_value_error_with_the_guards_too(tmp_path: Path):
    for callbacks in ([], trainguard.all_guards()):
        out = tmp_path / ("guarded" if callbacks else "plain")
        with pytest.raises(ValueError, match="No valid checkpoint found in output directory"):
            make_trainer(out, callbacks=callbacks, max_steps=1).train(resume_from_checkpoint=True)
