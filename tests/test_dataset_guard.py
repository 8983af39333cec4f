"""DatasetGuard on a real Trainer: resumes on other data, another global batch, or with nothing left to train are
refused before the first step; the same data resumes; the two ways forward work end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import transformers
from transformers import Trainer, TrainerCallback

import trainguard
from trainguard import DatasetGuard, DatasetMismatchError, dataset_fingerprint

from _rig import make_lm_dataset, make_tiny_llama, make_trainer, run_python, run_trainer

# Touches Trainer internals: loading checkpoint weights (continue_on_new_data).
# Also run on the oldest supported releases (.ci/run).
pytestmark = pytest.mark.compat

ROWS = 16  # batch 2: 8 optimizer steps per epoch, checkpoints at steps 4 and 8

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


class StepCounter(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.steps += 1
        return control


def _first_run(output_dir: Path, dataset: Any = None, **args: Any) -> None:
    kwargs: dict[str, Any] = {"max_steps": -1, "num_train_epochs": 1, "save_strategy": "steps", "save_steps": 4}
    kwargs.update(args)
    run_trainer(
        output_dir,
        callbacks=[DatasetGuard()],
        train_dataset=dataset if dataset is not None else make_lm_dataset(ROWS),
        **kwargs,
    )
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]


def _snapshot(output_dir: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(output_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(output_dir.glob("checkpoint-*/**/*"))
        if p.is_file()
    }


def _resume(output_dir: Path, dataset: Any, *, guard: Any = "default", **args: Any) -> tuple[Any, StepCounter]:
    counter = StepCounter()
    callbacks: list[Any] = [counter]
    if guard == "default":
        guard = DatasetGuard()
    if guard is not None:
        callbacks.insert(0, guard)
    kwargs: dict[str, Any] = {"max_steps": -1, "num_train_epochs": 1, "save_strategy": "no"}
    kwargs.update(args)
    trainer = make_trainer(output_dir, callbacks=callbacks, train_dataset=dataset, **kwargs)
    return trainer, counter


def _stored_record(checkpoint: Path) -> dict[str, Any]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["stateful_callbacks"]["DatasetGuard"]["attributes"]["run_identity"]


def test_origin_scenario_plain_trainer_trains_nothing_and_the_guard_refuses_before_the_first_step(output_dir: Path):
    _first_run(output_dir)
    new_data = make_lm_dataset(ROWS // 2, seed=1)  # 4 steps per epoch; the checkpoint is at step 8

    plain, plain_steps = _resume(output_dir, new_data, guard=None)
    result = plain.train(resume_from_checkpoint=True)
    assert plain_steps.steps == 0 and result.global_step == 8  # the bug: "success", nothing trained, no warning

    before = _snapshot(output_dir)
    trainer, steps = _resume(output_dir, new_data)
    with pytest.raises(DatasetMismatchError) as info:
        trainer.train(resume_from_checkpoint=True)
    message = str(info.value)
    assert dataset_fingerprint(make_lm_dataset(ROWS)) in message and f"({ROWS} rows" in message
    assert dataset_fingerprint(new_data) in message and f"({ROWS // 2} rows" in message
    assert "checkpoint at step 8, the new data gives 4 steps per epoch" in message
    assert "it would stop at once, training nothing" in message
    assert "start_fresh" in info.value.next_step and "continue_on_new_data" in info.value.next_step
    assert info.value.where["step"] == 8
    assert steps.steps == 0 and trainer.state.global_step == 0  # refused before anything was loaded
    assert _snapshot(output_dir) == before  # every checkpoint still there, untouched


def test_the_same_data_rebuilt_in_a_new_process_resumes_normally(output_dir: Path):
    code = (
        "import sys; from _rig import run_trainer, make_lm_dataset; from trainguard import DatasetGuard; "
        f"run_trainer(sys.argv[1], callbacks=[DatasetGuard()], train_dataset=make_lm_dataset({ROWS}), max_steps=-1, "
        "num_train_epochs=1, save_strategy='steps', save_steps=4)"
    )
    first = run_python(code, str(output_dir), timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    trainer, steps = _resume(output_dir, make_lm_dataset(ROWS), num_train_epochs=2)
    result = trainer.train(resume_from_checkpoint=True)
    assert result.global_step == 16 and steps.steps == 8
    guard = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, DatasetGuard))
    assert "resumed from checkpoint-8: same data and batch" in guard.summary()


def test_the_same_jsonl_rewritten_with_a_new_mtime_resumes_normally(output_dir: Path, tmp_path: Path):
    from datasets import load_dataset

    source = tmp_path / "train.jsonl"
    rows = make_lm_dataset(ROWS).to_list()
    text = "".join(json.dumps(r) + "\n" for r in rows)
    source.write_text(text)
    os.utime(source, (1_000_000, 1_000_000))
    first = load_dataset("json", data_files=str(source), split="train", cache_dir=str(tmp_path / "cache"))
    _first_run(output_dir, first)

    source.write_text(text)  # same content, new mtime: datasets builds a new cache, fingerprint from path+mtime
    again = load_dataset("json", data_files=str(source), split="train", cache_dir=str(tmp_path / "cache"))
    assert again._fingerprint != first._fingerprint
    trainer, steps = _resume(output_dir, again, num_train_epochs=2)
    assert trainer.train(resume_from_checkpoint=True).global_step == 16 and steps.steps == 8


def test_a_shuffled_dataset_is_refused(output_dir: Path):
    _first_run(output_dir)
    trainer, steps = _resume(output_dir, make_lm_dataset(ROWS).shuffle(seed=0), num_train_epochs=2)
    with pytest.raises(DatasetMismatchError, match="training data differs") as info:
        trainer.train(resume_from_checkpoint=True)
    assert info.value.where["field"] == "train fingerprint" and steps.steps == 0


def test_a_changed_global_batch_is_refused(output_dir: Path):
    _first_run(output_dir)
    trainer, steps = _resume(output_dir, make_lm_dataset(ROWS), num_train_epochs=4, gradient_accumulation_steps=2)
    with pytest.raises(DatasetMismatchError, match="global batch changed") as info:
        trainer.train(resume_from_checkpoint=True)
    assert info.value.where["field"] == "global_batch"
    assert "checkpoint 2 (world size 1 × per-device 2 × accumulation 1)" in str(info.value)
    assert "this run 4 (world size 1 × per-device 2 × accumulation 2)" in str(info.value)
    # the data is the checkpoint's: the message must not call it new
    assert "new data" not in info.value.what and "this run's data gives" in info.value.what
    assert steps.steps == 0


def test_a_resume_after_which_no_step_would_run_is_refused(output_dir: Path):
    _first_run(output_dir)  # finished: checkpoint-8 is the end of its only epoch
    trainer, steps = _resume(output_dir, make_lm_dataset(ROWS))
    with pytest.raises(DatasetMismatchError, match="no step would run") as info:
        trainer.train(resume_from_checkpoint=True)
    assert info.value.where["field"] == "max_steps" and "Raise max_steps" in info.value.next_step
    # the option turns the refusal off: then it is plain Trainer's no-op
    trainer, steps = _resume(output_dir, make_lm_dataset(ROWS), guard=DatasetGuard(refuse_empty_resume=False))
    assert trainer.train(resume_from_checkpoint=True).global_step == 8 and steps.steps == 0


@pytest.mark.parametrize("restore", [False, True])
def test_refusal_and_record_work_whether_callback_states_are_restored_or_not(output_dir: Path, restore: bool):
    _first_run(output_dir, restore_callback_states_from_checkpoint=restore)
    trainer, steps = _resume(
        output_dir, make_lm_dataset(ROWS // 2, seed=1), restore_callback_states_from_checkpoint=restore
    )
    with pytest.raises(DatasetMismatchError):
        trainer.train(resume_from_checkpoint=True)

    # the same data resumes; the record saved afterwards is this run's (not the checkpoint's, restored from args)
    trainer, steps = _resume(
        output_dir,
        make_lm_dataset(ROWS),
        num_train_epochs=2,
        gradient_accumulation_steps=1,
        save_strategy="steps",
        save_steps=4,
        restore_callback_states_from_checkpoint=restore,
    )
    assert trainer.train(resume_from_checkpoint=True).global_step == 16 and steps.steps == 8
    record = _stored_record(output_dir / "checkpoint-16")
    assert record["train"]["fingerprint"] == dataset_fingerprint(make_lm_dataset(ROWS))
    assert record["train"]["num_rows"] == ROWS and record["steps_per_epoch"] == 8 and record["global_batch"] == 2


@pytest.mark.parametrize("restore", [False, True])
def test_on_train_begin_refuses_even_when_train_was_not_wrapped(output_dir: Path, restore: bool):
    _first_run(output_dir)
    trainer, steps = _resume(
        output_dir, make_lm_dataset(ROWS // 2, seed=1), restore_callback_states_from_checkpoint=restore
    )
    with pytest.raises(DatasetMismatchError, match="training data differs"):
        Trainer.train(trainer, resume_from_checkpoint=True)  # the class method: before_train never runs
    assert steps.steps == 0


def test_the_checkpoint_records_fingerprints_rows_steps_and_global_batch(output_dir: Path):
    eval_set = make_lm_dataset(4, seed=9)
    run_trainer(
        output_dir,
        callbacks=[DatasetGuard()],
        train_dataset=make_lm_dataset(ROWS),
        eval_dataset=eval_set,
        max_steps=-1,
        num_train_epochs=1,
        gradient_accumulation_steps=2,
        save_strategy="steps",
        save_steps=4,
    )
    record = _stored_record(output_dir / "checkpoint-4")
    expected = {"fingerprint": dataset_fingerprint(make_lm_dataset(ROWS)), "num_rows": ROWS, "kind": "arrow"}
    assert record["train"] == expected
    assert record["eval"]["eval"]["fingerprint"] == dataset_fingerprint(eval_set)
    assert (record["world_size"], record["per_device_train_batch_size"], record["gradient_accumulation_steps"]) == (
        1,
        2,
        2,
    )
    assert record["global_batch"] == 4 and record["steps_per_epoch"] == 4


def test_a_changed_eval_set_is_a_warning_not_a_refusal(output_dir: Path):
    _first_run(output_dir, eval_dataset=make_lm_dataset(4, seed=9))
    trainer, _ = _resume(output_dir, make_lm_dataset(ROWS), num_train_epochs=2, eval_dataset=make_lm_dataset(4, seed=8))
    assert trainer.train(resume_from_checkpoint=True).global_step == 16
    events = [json.loads(line) for line in (output_dir / "trainguard-events.jsonl").read_text().splitlines()]
    assert any(e["guard"] == "dataset_guard" and "eval data differs" in e["message"] for e in events)


def test_a_guard_added_to_a_run_saved_without_it_warns_and_saves_its_record(output_dir: Path):
    plain = {"max_steps": -1, "num_train_epochs": 1, "save_strategy": "steps", "save_steps": 4}
    run_trainer(output_dir, train_dataset=make_lm_dataset(ROWS), **plain)
    trainer, _ = _resume(output_dir, make_lm_dataset(ROWS), num_train_epochs=2, save_strategy="steps", save_steps=4)
    assert trainer.train(resume_from_checkpoint=True).global_step == 16  # no KeyError at the first save
    assert _stored_record(output_dir / "checkpoint-12")["train"]["num_rows"] == ROWS
    events = (output_dir / "trainguard-events.jsonl").read_text()
    assert "saved without DatasetGuard" in events


def test_start_fresh_archives_every_checkpoint_and_the_next_train_starts_at_step_0(output_dir: Path):
    _first_run(output_dir)
    before = _snapshot(output_dir)
    old_fp = dataset_fingerprint(make_lm_dataset(ROWS))
    trainer, steps = _resume(output_dir, make_lm_dataset(ROWS // 2, seed=1), save_strategy="steps", save_steps=2)
    with pytest.raises(DatasetMismatchError):
        trainer.train(resume_from_checkpoint=True)

    archive = trainguard.start_fresh(trainer)
    assert archive is not None and archive.parent == output_dir / "trainguard-archive"
    assert archive.name.endswith(old_fp[:12])
    assert sorted(p.name for p in archive.iterdir()) == ["checkpoint-4", "checkpoint-8"]
    moved = {str(p.relative_to(archive)): (p.stat().st_size, p.stat().st_mtime_ns) for p in archive.rglob("*/*")}
    assert moved == before  # nothing deleted, nothing changed: moved as is
    assert not list(output_dir.glob("checkpoint-*"))

    result = trainer.train()
    assert result.global_step == 4 and steps.steps == 4
    assert _stored_record(output_dir / "checkpoint-4")["train"]["num_rows"] == ROWS // 2
    assert trainguard.start_fresh(output_dir / "nothing-here") is None


def test_continue_on_new_data_loads_the_checkpoint_weights_and_resets_step_optimizer_and_schedule(output_dir: Path):
    import torch
    from safetensors.torch import load_file

    _first_run(output_dir)
    saved = load_file(str(output_dir / "checkpoint-8" / "model.safetensors"))
    trainer, steps = _resume(output_dir, make_lm_dataset(ROWS // 2, seed=1), save_strategy="steps", save_steps=2)
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(trainer.model.state_dict()[key], saved[key])  # a fresh model, not the checkpoint's
    with pytest.raises(DatasetMismatchError):
        trainer.train(resume_from_checkpoint=True)

    loaded_from = trainguard.continue_on_new_data(trainer)
    assert loaded_from.name == "checkpoint-8" and loaded_from.parent.parent == output_dir / "trainguard-archive"
    for name, tensor in saved.items():
        assert torch.equal(trainer.model.state_dict()[name].cpu(), tensor), name
    assert not list(output_dir.glob("checkpoint-*"))

    result = trainer.train()
    assert result.global_step == 4 and steps.steps == 4  # step 0 on the new data
    first = next(e for e in trainer.state.log_history if "learning_rate" in e)
    # a new linear schedule over 4 steps (a resumed one would be past its end, at 0): the full learning rate at step
    # 1 as 5.x logs it (before that step's scheduler step), 3/4 of it as 4.x logs it (after)
    assert first["step"] == 1
    assert first["learning_rate"] == pytest.approx(1e-3 if TRANSFORMERS_MAJOR >= 5 else 7.5e-4)


def test_continue_on_new_data_with_no_checkpoint_says_so(output_dir: Path):
    trainer = make_trainer(output_dir, model=make_tiny_llama())
    with pytest.raises(trainguard.CheckpointIntegrityError, match="no verified checkpoint"):
        trainguard.continue_on_new_data(trainer)


def test_the_resume_identity_example_refuses_both_resumes_then_continues_on_the_new_data(tmp_path: Path):
    from _rig import REPO_ROOT

    result = run_python(str(REPO_ROOT / "examples" / "resume_identity.py"), str(tmp_path / "run"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2. resume on new data refused" in result.stdout
    assert "3. resume with another lora_alpha refused" in result.stdout and "lora_alpha: checkpoint 16" in result.stdout
    assert "trained 4 steps on 16 new rows from step 0" in result.stdout


@pytest.mark.distributed
def test_every_rank_refuses_together_in_a_two_rank_run(tmp_path: Path):
    from _rig import TESTS_DIR, run_torchrun

    result = run_torchrun(TESTS_DIR / "scripts" / "dataset_guard_ranks.py", str(tmp_path), nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    docs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for doc in docs:  # both ranks refused (no rank left waiting in a collective), with the same error, no step
        assert doc["refused"] and doc["steps"] == 0 and doc["step"] == 4
        assert "the new data gives 2 steps per epoch" in doc["what"]
    assert docs[0]["what"] == docs[1]["what"]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
