"""The do-no-harm contract (issue #26), for every model head and trainer kind users attach trainguard to.

Each configuration is trained twice, plain and with ``all_guards()``, and what a user can see must be the plain
run's: bit-identical weights, the same ``state.log_history`` (wall-clock figures aside), the same events with the same
``control`` flags at a user callback, the same files sent by ``push_to_hub``, and on the same mistake an exception of
the type the plain Trainer raises (tests/_contract.py). MoE and vision models: tests/test_contract_models.py.
What trainguard changes on purpose (refusals) is listed in docs/do-no-harm.md.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import trainguard
from _contract import HUB, Outcome, assert_same_outcome, record_uploads, run_once, run_pair

from _rig import (
    TESTS_DIR,
    VOCAB_SIZE,
    make_lm_dataset,
    make_tiny_llama,
    make_tokenizer,
    make_trainer,
    tiny_llama_config,
)

SAVES = {"save_strategy": "steps", "save_steps": 2, "max_steps": 4}


def _compat_script() -> ModuleType:
    """tests/scripts/compat_trainers.py: the Seq2Seq and SFT builders the torchrun tests use too."""
    spec = importlib.util.spec_from_file_location("compat_trainers", TESTS_DIR / "scripts" / "compat_trainers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- model heads: causal LM, sequence classification (int, float, multi-label), token classification ----
_IDS = [[5, 6, 7, 8]] * 16


class _Rows:
    """A map-style torch dataset of dict rows (no ``column_names``): read row by row."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def _head_case(name: str) -> tuple[Any, Any]:
    """(model factory, train dataset) for one head and label shape."""
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification, LlamaForTokenClassification

    def seq(**overrides: Any) -> Any:
        return lambda: LlamaForSequenceClassification(tiny_llama_config(**{"num_labels": 2, **overrides}))

    ids = [torch.tensor(row) for row in _IDS]
    cases: dict[str, tuple[Any, Any]] = {
        # what rename_column("label", "labels") gives: an Arrow int column
        "seq_cls_arrow_int_column": (seq(), Dataset.from_dict({"input_ids": _IDS, "labels": [0, 1] * 8})),
        "seq_cls_python_int_rows": (seq(), _Rows([{"input_ids": ids[i], "labels": i % 2} for i in range(16)])),
        "seq_cls_zero_d_tensor_rows": (
            seq(),
            _Rows([{"input_ids": ids[i], "labels": torch.tensor(i % 2)} for i in range(16)]),
        ),
        "regression_float_column": (
            seq(num_labels=1),
            Dataset.from_dict({"input_ids": _IDS, "labels": [0.5, -1.5] * 8}),
        ),
        "multi_label_float_lists": (
            seq(problem_type="multi_label_classification"),
            Dataset.from_dict({"input_ids": _IDS, "labels": [[0.0, 1.0], [1.0, 1.0]] * 8}),
        ),
        "multi_label_float_tensor_rows": (
            seq(problem_type="multi_label_classification"),
            _Rows([{"input_ids": ids[i], "labels": torch.tensor([1.0, float(i % 2)])} for i in range(16)]),
        ),
        "token_classification_with_ignored_tokens": (
            lambda: LlamaForTokenClassification(tiny_llama_config(num_labels=3)),
            Dataset.from_dict({"input_ids": _IDS, "labels": [[-100, 1, 2, 0], [0, -100, -100, 1]] * 8}),
        ),
    }
    return cases[name]


@pytest.mark.parametrize(
    "case",
    [
        "seq_cls_arrow_int_column",
        "seq_cls_python_int_rows",
        "seq_cls_zero_d_tensor_rows",
        "regression_float_column",
        "multi_label_float_lists",
        "multi_label_float_tensor_rows",
        "token_classification_with_ignored_tokens",
    ],
)
def test_classification_heads_train_under_all_guards_as_the_plain_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
):
    def build(out: Path, callbacks: list[Any]) -> Any:
        factory, data = _head_case(case)
        torch.manual_seed(0)
        return make_trainer(out, model=factory(), train_dataset=data, callbacks=callbacks, max_steps=2)

    plain, guarded = run_pair(tmp_path, build, monkeypatch)
    assert plain.result.global_step == 2
    assert_same_outcome(plain, guarded, uploads=False)


def test_causal_lm_with_eval_best_model_rotation_and_hub_pushes_is_the_plain_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def build(out: Path, callbacks: list[Any]) -> Any:
        return make_trainer(
            out,
            callbacks=callbacks,
            eval_dataset=make_lm_dataset(8, seed=1),
            eval_strategy="steps",
            eval_steps=2,
            save_total_limit=1,
            load_best_model_at_end=True,
            **SAVES,
            **HUB,
        )

    plain, guarded = run_pair(tmp_path, build, monkeypatch)
    assert [where for where, _ in plain.uploads] == ["", "last-checkpoint", "", "last-checkpoint"]
    assert any(event[0] == "on_evaluate" for event in plain.events)
    assert_same_outcome(plain, guarded)


# ---- trainer kinds: Seq2SeqTrainer, TRL SFTTrainer and DPOTrainer ----
def _common(**overrides: Any) -> dict[str, Any]:
    return {**_compat_script()._common_args(4, 2), **HUB, **overrides}


def test_seq2seq_trainer_on_an_encoder_decoder_is_the_plain_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    script = _compat_script()
    plain, guarded = run_pair(tmp_path, lambda out, cbs: script._seq2seq(out, _common(), cbs), monkeypatch)
    assert type(plain.trainer).__name__ == "Seq2SeqTrainer" and plain.result.global_step == 4
    assert_same_outcome(plain, guarded)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trl_sft_trainer_is_the_plain_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lora: bool):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from _rig import CORPUS

    def build(out: Path, callbacks: list[Any]) -> Any:
        script = _compat_script()
        if lora:
            return script._sft_lora(out, _common(), callbacks, 4)
        return SFTTrainer(
            model=make_tiny_llama(),
            args=SFTConfig(output_dir=str(out), max_length=32, dataset_num_proc=None, packing=True, **_common()),
            train_dataset=Dataset.from_list([{"text": line} for line in CORPUS * 4]),
            processing_class=make_tokenizer(),
            callbacks=callbacks,
        )

    plain, guarded = run_pair(tmp_path, build, monkeypatch)
    assert type(plain.trainer).__name__ == "SFTTrainer" and plain.result.global_step == 4
    assert_same_outcome(plain, guarded)


def test_trl_dpo_trainer_is_the_plain_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from _rig import CORPUS

    pairs = [
        {"prompt": CORPUS[i][:20], "chosen": CORPUS[i][20:], "rejected": CORPUS[(i + 3) % len(CORPUS)][20:]}
        for i in range(len(CORPUS))
    ] * 2

    def build(out: Path, callbacks: list[Any]) -> Any:
        return DPOTrainer(
            model=make_tiny_llama(seed=0),
            ref_model=make_tiny_llama(seed=0),
            args=DPOConfig(output_dir=str(out), max_length=32, dataset_num_proc=None, **_common()),
            train_dataset=Dataset.from_list(pairs),
            processing_class=make_tokenizer(),
            callbacks=callbacks,
        )

    plain, guarded = run_pair(tmp_path, build, monkeypatch)
    assert type(plain.trainer).__name__ == "DPOTrainer" and plain.result.global_step == 4
    assert any("rewards/chosen" in entry for entry in plain.log_history)
    assert_same_outcome(plain, guarded)


# ---- data habits: an IterableDataset, worker processes, group_by_length ----
def test_an_iterable_dataset_is_the_plain_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def build(out: Path, callbacks: list[Any]) -> Any:
        data = make_lm_dataset().to_iterable_dataset(num_shards=2)
        return make_trainer(out, callbacks=callbacks, train_dataset=data, **SAVES, **HUB)

    plain, guarded = run_pair(tmp_path, build, monkeypatch)
    assert plain.result.global_step == 4
    assert_same_outcome(plain, guarded)


def test_two_dataloader_worker_processes_are_the_plain_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def build(out: Path, callbacks: list[Any]) -> Any:
        return make_trainer(out, callbacks=callbacks, dataloader_num_workers=2, **SAVES, **HUB)

    plain, guarded = run_pair(tmp_path, build, monkeypatch)
    assert_same_outcome(plain, guarded)


def test_group_by_length_with_a_padding_collator_is_the_plain_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling

    rng = random.Random(0)
    rows = [{"input_ids": [rng.randrange(4, VOCAB_SIZE) for _ in range(rng.randrange(4, 17))]} for _ in range(32)]
    tokenizer = make_tokenizer()

    from transformers import TrainingArguments

    # 5.25 spells it train_sampling_strategy="group_by_length"; older releases group_by_length=True.
    by_length = (
        {"train_sampling_strategy": "group_by_length"}
        if hasattr(TrainingArguments, "train_sampling_strategy")
        else {"group_by_length": True}
    )

    def build(out: Path, callbacks: list[Any]) -> Any:
        trainer = make_trainer(
            out, callbacks=callbacks, train_dataset=Dataset.from_list(rows), **by_length, **SAVES, **HUB
        )
        trainer.data_collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        return trainer

    plain, guarded = run_pair(tmp_path, build, monkeypatch)
    sampler = plain.trainer._get_train_sampler(plain.trainer.train_dataset)
    assert type(sampler).__name__ == "LengthGroupedSampler"
    assert_same_outcome(plain, guarded)


# ---- habits with the Trainer object: model_init, a second train(), a resume, a hyperparameter search ----
def _with_model_init(out: Path, callbacks: list[Any], **args: Any) -> Any:
    from transformers import Trainer

    from _rig import training_args

    return Trainer(
        model_init=lambda *trial: make_tiny_llama(),
        args=training_args(out, **args),
        train_dataset=make_lm_dataset(),
        eval_dataset=make_lm_dataset(8, seed=1),
        callbacks=callbacks,
    )


def test_model_init_is_the_plain_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    plain, guarded = run_pair(tmp_path, lambda out, cbs: _with_model_init(out, cbs, **SAVES, **HUB), monkeypatch)
    assert_same_outcome(plain, guarded)


def test_a_second_train_call_on_the_same_trainer_is_the_plain_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def train_twice(trainer: Any) -> Any:
        trainer.train()
        return trainer.train()  # a notebook cell run again

    build = lambda out, cbs: make_trainer(out, callbacks=cbs, **SAVES, **HUB)  # noqa: E731
    plain, guarded = run_pair(tmp_path, build, monkeypatch, train=train_twice)
    assert sum(1 for event in plain.events if event[0] == "on_train_begin") == 2
    assert_same_outcome(plain, guarded)


def test_a_resume_in_a_new_trainer_is_the_plain_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    uploads = record_uploads(monkeypatch)

    def resumed(name: str, guards: Any) -> Outcome:
        out = tmp_path / name
        first = run_once(out, lambda o, cbs: make_trainer(o, callbacks=cbs, **SAVES, **HUB), guards(), uploads)
        assert first.error is None, first.error
        build = lambda o, cbs: make_trainer(o, callbacks=cbs, **{**SAVES, "max_steps": 6}, **HUB)  # noqa: E731
        return run_once(out, build, guards(), uploads, train=lambda t: t.train(resume_from_checkpoint=True))

    plain, guarded = resumed("plain", list), resumed("guarded", trainguard.all_guards)
    assert [entry["step"] for entry in plain.log_history if "loss" in entry] == [1, 2, 3, 4, 5, 6]
    assert_same_outcome(plain, guarded)


@pytest.mark.slow
def test_an_optuna_hyperparameter_search_is_the_plain_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def search(trainer: Any) -> Any:
        return trainer.hyperparameter_search(
            direction="minimize",
            backend="optuna",
            n_trials=2,
            hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)},
            sampler=optuna.samplers.TPESampler(seed=0),
        )

    plain, guarded = run_pair(tmp_path, lambda out, cbs: _with_model_init(out, cbs, **SAVES), monkeypatch, train=search)
    assert plain.error is None, plain.error
    assert (guarded.result.objective, guarded.result.hyperparameters) == (
        plain.result.objective,
        plain.result.hyperparameters,
    )
    assert sum(1 for event in plain.events if event[0] == "on_train_begin") == 2
    assert_same_outcome(plain, guarded, uploads=False)


# ---- the same mistake raises what the plain Trainer raises ----
def _no_labels(out: Path, callbacks: list[Any]) -> Any:
    data = make_lm_dataset().remove_columns("labels")
    return make_trainer(out, callbacks=callbacks, train_dataset=data, **SAVES)


MISTAKES = {
    # a typo in the path: plain raises ValueError("Can't find a valid checkpoint at ...")
    "mistyped_resume_path": (
        lambda out, cbs: make_trainer(out, callbacks=cbs, **SAVES),
        lambda t: t.train(resume_from_checkpoint=str(Path(t.args.output_dir) / "checkpoint-99")),
    ),
    # resume_from_checkpoint=True in a folder with no checkpoint: plain raises ValueError
    "resume_true_without_a_checkpoint": (
        lambda out, cbs: make_trainer(out, callbacks=cbs, **SAVES),
        lambda t: t.train(resume_from_checkpoint=True),
    ),
    # an empty checkpoint folder (a save that never wrote): plain raises ValueError
    "empty_checkpoint_folder": (
        lambda out, cbs: make_trainer(out, callbacks=cbs, **SAVES),
        lambda t: t.train(resume_from_checkpoint=_empty_checkpoint(t)),
    ),
    # rows without labels on a model that needs them: plain raises ValueError (no loss)
    "no_labels_for_a_causal_lm": (_no_labels, lambda t: t.train()),
}


def _empty_checkpoint(trainer: Any) -> str:
    folder = Path(trainer.args.output_dir) / "checkpoint-2"
    folder.mkdir(parents=True)
    return str(folder)


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_the_same_mistake_raises_what_the_plain_trainer_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mistake: str
):
    build, train = MISTAKES[mistake]
    plain, guarded = run_pair(tmp_path, build, monkeypatch, train=train)
    assert isinstance(plain.error, ValueError), plain.error
    assert isinstance(guarded.error, type(plain.error)), repr(guarded.error)
    assert plain.weights.keys() == guarded.weights.keys()
    assert all(torch.equal(plain.weights[k], guarded.weights[k]) for k in plain.weights)
