"""The seam modules: a private name of another library that a release renames, or a function whose signature
changed, turns that one feature off with one log line, never a crash; process-wide patches come off again."""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import pytest
import transformers.trainer as trainer_module

from trainguard import _dist_compat, _util, distributed
from trainguard.callbacks import _trainer_compat as compat
from trainguard.checks.dataset import _datasets_compat, dataset_fingerprint
from trainguard.integrations import _tracker_compat

from _rig import make_trainer

pytestmark = pytest.mark.compat


@pytest.fixture(autouse=True)
def _fresh_once_log(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each reason is logged once per process; every test starts as a fresh process would.
    monkeypatch.setattr(_util, "_MISSING_SAID", set())


def _off_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "trainguard" and " is off " in r.getMessage()]


# ------------------------------------------------------------------------------------------------------ _bind
def test_bind_reads_arguments_by_the_real_signature_positional_or_keyword() -> None:
    def rotate(output_dir: str, save_total_limit: int | None = None, best_model_checkpoint: str | None = None) -> None:
        pass

    bound = compat._bind(rotate, ("out",), {"best_model_checkpoint": "b"}, ("output_dir",), "rotation")
    assert bound == {"output_dir": "out", "save_total_limit": None, "best_model_checkpoint": "b"}


def test_bind_turns_the_feature_off_with_one_log_line_when_the_signature_differs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def rotate(folder: str, keep: int) -> None:  # another release's signature: no output_dir
        pass

    with caplog.at_level(logging.WARNING, logger="trainguard"):
        assert compat._bind(rotate, ("out", 2), {}, ("output_dir",), "rotation protection") is None
        assert compat._bind(rotate, ("out",), {"nope": 1}, (), "rotation protection") is None
        assert compat._bind(rotate, ("out", 2), {}, ("output_dir",), "rotation protection") is None
    lines = _off_lines(caplog)
    assert len(lines) == 2 and all("rotation protection is off" in line for line in lines)
    assert "no argument output_dir" in lines[0] and "other arguments" in lines[1]


class _Recording:
    def __init__(self) -> None:
        self.saves: list[str] = []

    def before_save(self, trainer: Any, run_dir: str) -> bool:
        self.saves.append(run_dir)
        return True

    def after_save(self, trainer: Any, run_dir: str) -> None:
        pass

    def rotate(self, run_dir: str, limit: int | None, best: str | None) -> None:
        pass

    def end_of_training_candidates(self, run_dir: str, best: str | None) -> list[str]:
        return []


def _otherwise_saving_trainer() -> type:
    from transformers import Trainer

    class OtherSave(Trainer):
        def _save_checkpoint(self, model: Any, run_trial: Any) -> None:  # a subclass with its own argument names
            super()._save_checkpoint(model, run_trial)

    return OtherSave


@pytest.mark.parametrize("other_signature", [False, True])
def test_a_save_checkpoint_of_another_signature_still_saves_without_the_hooks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, other_signature: bool
) -> None:
    trainer = make_trainer(tmp_path / "out", trainer_cls=_otherwise_saving_trainer() if other_signature else None)
    hooks = _Recording()
    assert compat.install_checkpoint_hooks(trainer, hooks) == []
    trainer.create_optimizer_and_scheduler(num_training_steps=1)  # what a save writes beside the weights
    trainer.state.global_step = 1
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        trainer._save_checkpoint(trainer.model, None)
    assert (tmp_path / "out" / "checkpoint-1" / "trainer_state.json").is_file()
    assert hooks.saves == ([] if other_signature else [str(tmp_path / "out")])
    assert [("save hooks is off" in line) for line in _off_lines(caplog)] == ([True] if other_signature else [])


# -------------------------------------------------------------------------------------------- process patches
def test_a_process_wide_patch_is_removable_and_the_original_comes_back() -> None:
    module = types.ModuleType("fake_transformers_trainer")

    def rotate_checkpoints(output_dir: str) -> str:
        return f"rotated {output_dir}"

    module.rotate_checkpoints = rotate_checkpoints  # type: ignore[attr-defined]
    handle = compat._install_dispatcher(module, "rotate_checkpoints")
    assert handle is not None and module.rotate_checkpoints is not rotate_checkpoints
    assert compat._install_dispatcher(module, "rotate_checkpoints") is handle  # once per process
    with compat.routing(rotate_checkpoints=lambda original, folder: f"routed {folder}"):
        assert module.rotate_checkpoints("out") == "routed out"
    assert handle in compat.process_patches()
    handle.remove()
    assert module.rotate_checkpoints is rotate_checkpoints
    assert handle not in compat.process_patches()
    handle.remove()  # twice is harmless
    assert module.rotate_checkpoints is rotate_checkpoints


def test_the_patch_of_transformers_rotation_comes_off_and_goes_back_on(tmp_path: Path) -> None:
    original = getattr(trainer_module, "rotate_checkpoints", None)
    if original is None:
        pytest.skip("this transformers rotates with Trainer._rotate_checkpoints (an instance wrapper, no patch)")
    compat.install_checkpoint_hooks(make_trainer(tmp_path / "out"), _Recording())
    handles = [h for h in compat.process_patches() if h.module is trainer_module and h.name == "rotate_checkpoints"]
    assert len(handles) == 1 and trainer_module.rotate_checkpoints is handles[0].dispatcher
    handles[0].remove()
    assert trainer_module.rotate_checkpoints is handles[0].original
    assert not getattr(trainer_module.rotate_checkpoints, compat._MARK, False)
    compat.install_checkpoint_hooks(make_trainer(tmp_path / "again"), _Recording())  # a later trainer patches again
    assert getattr(trainer_module.rotate_checkpoints, compat._MARK, False)


# ------------------------------------------------------------------------------------------ datasets seam
def test_a_selected_dataset_is_read_through_its_indices_mapping() -> None:
    from datasets import Dataset

    ds = Dataset.from_dict({"text": ["a", "b", "c"]})
    assert _datasets_compat.indices_table(ds) is None
    assert _datasets_compat.indices_table(ds.select([2, 0])) is not None
    assert dataset_fingerprint(ds.select([2, 0])) == dataset_fingerprint(Dataset.from_dict({"text": ["c", "a"]}))


def test_a_datasets_release_without_the_private_names_turns_fingerprinting_off_not_crashing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        assert _datasets_compat.indices_table(object()) is None
        assert _datasets_compat.streaming_pipeline(object()) is None
    assert len(_off_lines(caplog)) == 2
    assert "datasets.IterableDataset._ex_iterable" in _off_lines(caplog)[1]


# ------------------------------------------------------------------------------------------ trackers seam
def test_an_mlflow_callback_without_its_started_flag_reads_as_not_started(caplog: pytest.LogCaptureFixture) -> None:
    class MLflowCallback:  # recognised by name, as transformers' class and its subclasses are
        def __init__(self, initialized: bool) -> None:
            self._initialized = initialized

    class Renamed(MLflowCallback):
        def __init__(self) -> None:  # a release that renamed _initialized
            pass

    started = MLflowCallback(True)
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        assert _tracker_compat.mlflow_callback_started(started) is True
        assert _tracker_compat.mlflow_callback_started(MLflowCallback(False)) is False
        assert _tracker_compat.mlflow_callback_started(Renamed()) is False
        assert _tracker_compat.mlflow_callback_started(object()) is False
    assert len(_off_lines(caplog)) == 1 and "MLflowCallback._initialized" in _off_lines(caplog)[0]


def test_a_wandb_run_reads_as_finished_only_when_it_says_so() -> None:
    assert _tracker_compat.wandb_run_finished(types.SimpleNamespace(_is_finished=True)) is True
    assert _tracker_compat.wandb_run_finished(types.SimpleNamespace(_is_finished=False)) is False
    assert _tracker_compat.wandb_run_finished(types.SimpleNamespace()) is False


# ----------------------------------------------------------------------------------- torch.distributed seam
def test_a_torch_without_the_c10d_private_calls_turns_the_store_and_counting_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bare = types.SimpleNamespace(distributed_c10d=types.SimpleNamespace())
    monkeypatch.setattr(distributed, "_dist", lambda: bare)
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        assert _dist_compat.default_store(bare) is None
        assert distributed.collective_count() is None
        with pytest.raises(RuntimeError, match="c10d store"):
            distributed.store_set("k", "v")
    assert len(_off_lines(caplog)) == 2
