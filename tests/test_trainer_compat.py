"""The seam with Trainer internals (``callbacks/_trainer_compat.py``): one test per gate, on the installed
transformers, and the other branch of each gate forced on a stand-in where the installed release takes the first.

These tests also run on the oldest releases ``pyproject.toml`` allows (``.ci/run``'s second environment), where the
4.x branches are the real ones.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import transformers
import transformers.trainer as trainer_module
from transformers import TrainerCallback

import trainguard
from trainguard.callbacks import _trainer_compat as compat

from _rig import make_trainer, run_trainer

pytestmark = pytest.mark.compat
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


# ------------------------------------------------------------------------------------------------- find_trainer
class FindsTrainer(TrainerCallback):
    def __init__(self) -> None:
        self.found: Any = None

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.found = compat.find_trainer()


def test_find_trainer_finds_the_trainer_from_on_init_end_and_nothing_elsewhere(output_dir: Path):
    probe = FindsTrainer()
    trainer = make_trainer(output_dir, callbacks=[probe])
    assert probe.found is trainer
    assert compat.find_trainer() is None


# ---------------------------------------------------------------------------------------- checkpoint hooks
class RecordingHooks:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def before_save(self, trainer: Any, run_dir: str) -> bool:
        self.calls.append(("before_save", run_dir))
        return True

    def after_save(self, trainer: Any, run_dir: str) -> None:
        self.calls.append(("after_save", run_dir))

    def rotate(self, run_dir: str, limit: int | None, best: str | None) -> None:
        self.calls.append(("rotate", (run_dir, limit, best)))

    def end_of_training_candidates(self, run_dir: str, best: str | None) -> list[str]:
        self.calls.append(("end_of_training", (run_dir, best)))
        return []


def test_save_hooks_wrap_this_trainers_saves_and_route_its_rotation_only(output_dir: Path, tmp_path: Path):
    hooks = RecordingHooks()
    trainer = make_trainer(output_dir, max_steps=2, save_strategy="steps", save_steps=1, save_total_limit=1)
    assert compat.install_checkpoint_hooks(trainer, hooks) == []
    assert compat.install_checkpoint_hooks(trainer, hooks) == []  # once per trainer
    trainer.train()
    names = [name for name, _ in hooks.calls]
    assert names.count("before_save") == 2 and names.count("after_save") == 2
    assert ("rotate", (str(output_dir), 1, None)) in hooks.calls  # routed: the hooks decide what to delete
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    # A plain Trainer in the same process keeps the plain rotation: the routing is not process-wide.
    plain_dir = tmp_path / "plain"
    run_trainer(plain_dir, max_steps=2, save_strategy="steps", save_steps=1, save_total_limit=1)
    assert [p.name for p in plain_dir.glob("checkpoint-*")] == ["checkpoint-2"]


def test_routing_is_per_thread(tmp_path: Path):
    compat.install_checkpoint_hooks(make_trainer(tmp_path / "a"), RecordingHooks())  # installs the dispatcher
    if not getattr(trainer_module, "rotate_checkpoints", None):
        pytest.skip("this transformers version rotates with an instance method: no module dispatcher")
    seen: list[str] = []
    other_thread_saw: list[str] = []

    def plain_in_thread() -> None:
        folder = tmp_path / "other"
        for step in (1, 2):
            (folder / f"checkpoint-{step}").mkdir(parents=True)
        trainer_module.rotate_checkpoints(output_dir=str(folder), save_total_limit=1)
        other_thread_saw.extend(sorted(p.name for p in folder.glob("checkpoint-*")))

    with compat.routing(rotate_checkpoints=lambda original, **kw: seen.append(kw["output_dir"])):
        thread = threading.Thread(target=plain_in_thread)
        thread.start()
        thread.join()
        trainer_module.rotate_checkpoints(output_dir="routed", save_total_limit=1)
    assert seen == ["routed"]
    assert other_thread_saw == ["checkpoint-2"]  # the other thread ran the Trainer's own rotation


class _Stand4x:
    """A 4.x-shaped trainer: rotation and sorting are instance methods."""

    def __init__(self, output_dir: Path) -> None:
        self.args = SimpleNamespace(output_dir=str(output_dir), save_total_limit=2)
        self.state = SimpleNamespace(best_model_checkpoint=None, global_step=3)
        self.rotated_plainly = False

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self._rotate_checkpoints(use_mtime=False, output_dir=self.args.output_dir)

    def _rotate_checkpoints(self, use_mtime: bool = False, output_dir: str | None = None) -> None:
        self.rotated_plainly = True

    def _sorted_checkpoints(self, output_dir: str | None = None, checkpoint_prefix: str = "", use_mtime: bool = False):
        return ["a", "b"]


def test_on_4x_shaped_trainers_rotation_and_the_end_of_training_sort_go_through_the_instance_methods(
    output_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delattr(trainer_module, "rotate_checkpoints", raising=False)
    monkeypatch.delattr(trainer_module, "sort_checkpoints", raising=False)
    hooks = RecordingHooks()
    stand = _Stand4x(output_dir)
    assert compat.install_checkpoint_hooks(stand, hooks) == []
    stand._save_checkpoint(None, None)
    assert ("rotate", (str(output_dir), 2, None)) in hooks.calls
    assert not stand.rotated_plainly
    assert stand._sorted_checkpoints(output_dir=str(output_dir)) == []
    assert ("end_of_training", (str(output_dir), None)) in hooks.calls


def test_a_trainer_without_save_checkpoint_reports_the_features_that_are_off(output_dir: Path):
    missing = compat.install_checkpoint_hooks(SimpleNamespace(), RecordingHooks())
    assert missing and missing[0].startswith("save hooks")


def test_the_checkpoint_verifier_logs_which_feature_is_off_when_a_release_removes_it(
    output_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setattr(compat, "install_checkpoint_hooks", lambda trainer, hooks: ["rotation protection (test)"])
    with caplog.at_level("WARNING", logger="trainguard"):
        make_trainer(output_dir, callbacks=[trainguard.CheckpointVerifier()])
    assert "off on this transformers version: rotation protection (test)" in caplog.text


def test_output_dir_for_a_search_trial_is_its_run_folder(output_dir: Path):
    trainer = make_trainer(output_dir)
    assert compat.output_dir_for(trainer) == str(output_dir)
    assert compat.output_dir_for(SimpleNamespace(args=SimpleNamespace(output_dir="x"))) == "x"


# -------------------------------------------------------------------------------------------- step hooks
def test_step_hooks_see_every_micro_batch_loss_and_the_gradient_norm(output_dir: Path):
    losses: list[float] = []
    norms: list[float] = []
    trainer = make_trainer(output_dir, max_steps=2, gradient_accumulation_steps=2)
    owner = object()
    hook = {"on_loss": lambda loss, a, k: losses.append(float(loss)), "on_grad_norm": lambda n: norms.append(float(n))}
    assert compat.install_step_hooks(trainer, owner, **hook) == []
    assert compat.install_step_hooks(trainer, owner, **hook) == []  # once per owner
    trainer.train()
    assert len(losses) == 4 and len(norms) == 2


def test_on_4x_shaped_trainers_the_norm_comes_from_accelerate_and_is_off_without_clipping():
    def stand(max_grad_norm: float) -> Any:
        return SimpleNamespace(
            args=SimpleNamespace(max_grad_norm=max_grad_norm),
            training_step=lambda *a, **k: 1.0,
            accelerator=SimpleNamespace(clip_grad_norm_=lambda *a, **k: 2.0),
        )

    seen: list[float] = []
    clipped = stand(1.0)
    assert compat.install_step_hooks(clipped, object(), on_loss=lambda *a: None, on_grad_norm=seen.append) == []
    assert clipped.accelerator.clip_grad_norm_() == 2.0 and seen == [2.0]
    unclipped = stand(0.0)
    missing = compat.install_step_hooks(unclipped, object(), on_loss=lambda *a: None, on_grad_norm=seen.append)
    assert missing and "max_grad_norm > 0" in missing[0]


# ----------------------------------------------------------------------------------------- small touches
def test_set_train_batch_size_changes_args_and_the_trainers_copy(output_dir: Path):
    trainer = make_trainer(output_dir, per_device_train_batch_size=4)
    has_copy = compat.set_train_batch_size(trainer, 2, 2)
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (2, 2)
    if has_copy:
        assert trainer._train_batch_size == 2
    stand = SimpleNamespace(args=SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=1))
    assert compat.set_train_batch_size(stand, 2, 2) is False


def test_is_jit_sigterm_handler_recognises_transformers_jit_checkpointing(monkeypatch: pytest.MonkeyPatch):
    assert not compat.is_jit_sigterm_handler(signal.SIG_DFL)
    assert not compat.is_jit_sigterm_handler(test_is_jit_sigterm_handler_recognises_transformers_jit_checkpointing)
    if TRANSFORMERS_MAJOR >= 5:
        from transformers.trainer_jit_checkpoint import CheckpointManager

        manager = CheckpointManager(trainer=None)
        assert compat.is_jit_sigterm_handler(manager._sigterm_handler)
        monkeypatch.setitem(__import__("sys").modules, "transformers.trainer_jit_checkpoint", None)  # as on 4.x
        assert not compat.is_jit_sigterm_handler(manager._sigterm_handler)


def test_load_checkpoint_weights_loads_like_a_resume_and_says_when_it_cannot(output_dir: Path):
    import torch

    run_trainer(output_dir, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = make_trainer(output_dir, model=None)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    compat.load_checkpoint_weights(trainer, output_dir / "checkpoint-2")
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the trained weights arrived
    with pytest.raises(NotImplementedError):
        compat.load_checkpoint_weights(SimpleNamespace(), output_dir / "checkpoint-2")


# ------------------------------------------------------------------------------------------- what a save holds
def test_save_spec_lists_what_save_pretrained_writes_and_maps_a_tied_name_on_either_branch(
    output_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    import transformers.modeling_utils as modeling

    from _rig import make_tiny_llama

    trainer = make_trainer(output_dir, model=make_tiny_llama(tie_word_embeddings=True), max_steps=1)
    trainer.train()
    spec = compat.save_spec(trainer)
    assert "model.embed_tokens.weight" in spec.weights and "lm_head.weight" not in spec.weights
    assert spec.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert spec.optimizer_params == sum(1 for p in trainer.model.parameters() if p.requires_grad)
    monkeypatch.delattr(modeling, "remove_tied_weights_from_state_dict", raising=False)  # as on 4.x
    assert compat.save_spec(trainer).tied == {"lm_head.weight": "model.embed_tokens.weight"}


def test_resume_facts_read_the_optimizer_step_and_the_next_learning_rate(output_dir: Path):
    trainer = make_trainer(output_dir, max_steps=4, learning_rate=1e-3)
    trainer.train()
    facts = compat.resume_facts(trainer)
    assert facts["global_step"] == 4 and facts["optimizer_step"] == 4.0
    assert facts["next_lr"] == [0.0] or all(lr == pytest.approx(0.0) for lr in facts["next_lr"])  # linear, ended
    assert facts["per_device_train_batch_size"] == 2 and facts["max_steps"] == 4
