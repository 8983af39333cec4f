"""DataGuard checks the tokenized train set the Trainer will use, and refuses it before the first step."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

import trainguard
from trainguard.alerts import EVENTS_FILE
from trainguard.checks.data import check_tokenized_dataset
from trainguard.errors import DataValidationError

from _rig import TESTS_DIR, make_lm_dataset, make_tokenizer, make_trainer, run_torchrun, run_trainer


class _Steps(TrainerCallback):
    """Records every optimizer step the Trainer begins."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.steps.append(state.global_step)
        return control


def masked(dataset: Any, rows: set[int] | None = None) -> Any:
    """The dataset with every label of ``rows`` (default: all rows) set to -100."""

    def mask(row: dict[str, Any], i: int) -> dict[str, Any]:
        hit = rows is None or i in rows
        return {"labels": [-100] * len(row["labels"]) if hit else row["labels"]}

    return dataset.map(mask, with_indices=True)


def test_plain_trainer_trains_on_rows_whose_labels_are_all_ignored_and_reports_success(output_dir: Path):
    # What DataGuard exists for: nothing to learn, yet plain Trainer runs every step and reports loss 0.
    trainer, output = run_trainer(output_dir, train_dataset=masked(make_lm_dataset()), max_steps=3)
    assert output.global_step == 3
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(loss == 0.0 or math.isnan(loss) for loss in losses)


def test_all_ignored_labels_are_refused_before_step_one(output_dir: Path):
    steps = _Steps()
    guard = trainguard.DataGuard()
    trainer = make_trainer(output_dir, callbacks=[guard, steps], train_dataset=masked(make_lm_dataset()))
    with pytest.raises(DataValidationError) as info:
        trainer.train()
    assert steps.steps == [] and trainer.state.global_step == 0
    err = info.value
    assert err.where["field"] == "labels" and err.where["row"] == 0 and err.where["step"] == 0
    assert "32 of 32 row(s) have no supervised token (every label is -100; rows 0, 1, 2, 3, 4, …)" in err.what
    assert err.evidence["masked_rows"] == 32
    events = [json.loads(line) for line in (output_dir / EVENTS_FILE).read_text().splitlines()]
    assert [(e["guard"], e["level"]) for e in events] == [("data_guard", "error")]


def test_one_masked_row_is_refused_by_default_and_accepted_under_a_threshold(output_dir: Path):
    data = masked(make_lm_dataset(), {5})
    trainer = make_trainer(output_dir, callbacks=[trainguard.DataGuard(alert_sinks=[])], train_dataset=data)
    with pytest.raises(DataValidationError, match=r"1 of 32 row\(s\) have no supervised token .*rows 5\)"):
        trainer.train()
    guard = trainguard.DataGuard(max_masked_fraction=0.05)
    trainer, output = run_trainer(output_dir, callbacks=[guard], train_dataset=data, max_steps=2)
    assert output.global_step == 2
    assert [a.level for a in guard.alerter.history] == ["warning"]
    assert guard.summary() == "checked 32 row(s): 1 with no supervised token, 0 empty, 0 over 64 positions"


def test_rows_longer_than_the_model_positions_are_refused(output_dir: Path):
    data = make_lm_dataset(n_rows=8, seq_len=80)  # the tiny Llama has 64 positions
    trainer = make_trainer(output_dir, callbacks=[trainguard.DataGuard(alert_sinks=[])], train_dataset=data)
    with pytest.raises(DataValidationError, match="8 row\\(s\\) are longer than the model's 64 positions") as info:
        trainer.train()
    assert info.value.where["field"] == "input_ids" and info.value.evidence["max_len"] == 80


def test_warn_action_alerts_and_trains(output_dir: Path):
    guard = trainguard.DataGuard(action="warn", alert_sinks=[])
    _, output = run_trainer(output_dir, callbacks=[guard], train_dataset=masked(make_lm_dataset(), {0, 1}), max_steps=1)
    assert output.global_step == 1
    assert guard.alerter.history[0].level == "warning" and "rows 0, 1" in guard.alerter.history[0].message


def test_clean_data_passes_and_the_guard_is_one_of_all_guards(output_dir: Path):
    assert any(isinstance(g, trainguard.DataGuard) for g in trainguard.all_guards(run_lock=False))
    guard = trainguard.DataGuard(alert_sinks=[])
    _, output = run_trainer(output_dir, callbacks=[guard], max_steps=1)
    assert output.global_step == 1 and guard.result is not None and guard.result.rows == 32
    assert guard.summary() == "checked 32 row(s): 0 with no supervised token, 0 empty, 0 over 64 positions"


def test_a_collator_that_rebuilds_labels_is_not_refused_for_the_label_column(output_dir: Path):
    from transformers import DataCollatorForLanguageModeling

    # DataCollatorForLanguageModeling(mlm=False) replaces labels by input_ids: the -100 column never reaches the loss.
    collator = DataCollatorForLanguageModeling(make_tokenizer(), mlm=False)
    guard = trainguard.DataGuard(alert_sinks=[])
    trainer = make_trainer(output_dir, callbacks=[guard], train_dataset=masked(make_lm_dataset()), max_steps=1)
    trainer.data_collator = collator
    trainer.train()
    assert next(e["loss"] for e in trainer.state.log_history if "loss" in e) > 0
    assert guard.result is not None and guard.result.masked_rows == 0


def test_vectorised_check_honours_select_and_shuffle_and_matches_a_row_by_row_scan():
    from datasets import Dataset

    rng = random.Random(1)
    rows = []
    for _ in range(500):
        n = rng.randrange(0, 12)
        labels = [rng.choice([-100, 7]) for _ in range(n)]
        rows.append({"input_ids": [5] * n, "labels": labels})
    ds = Dataset.from_list(rows).shuffle(seed=3).select(range(50, 450))
    plain = [ds[i] for i in range(len(ds))]
    fast = check_tokenized_dataset(ds, max_positions=9, batch_size=64, max_examples=1000)
    slow = check_tokenized_dataset(plain, max_positions=9, max_examples=1000)
    expected_masked = [i for i, r in enumerate(plain) if r["input_ids"] and all(x == -100 for x in r["labels"])]
    assert fast.masked_examples == slow.masked_examples == expected_masked
    assert fast.empty_examples == slow.empty_examples == [i for i, r in enumerate(plain) if not r["input_ids"]]
    assert (
        fast.over_limit_examples
        == slow.over_limit_examples
        == [i for i, r in enumerate(plain) if len(r["input_ids"]) > 9]
    )
    assert fast.rows == slow.rows == 400 and fast.max_len == slow.max_len == 11


def test_trl_mask_columns_are_read_when_there_are_no_labels():
    from datasets import Dataset

    ds = Dataset.from_list(
        [
            {"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]},
            {"input_ids": [1, 2, 3], "completion_mask": [0, 0, 0]},  # the completion was truncated away
        ]
    )
    found = check_tokenized_dataset(ds)
    assert (found.supervision, found.masked_examples) == ("completion_mask", [1])
    assert check_tokenized_dataset(ds, completion_only_loss=False).masked_rows == 0
    assert "no input_ids column" in (check_tokenized_dataset(Dataset.from_list([{"text": "x"}])).skipped or "")


@pytest.mark.distributed
def test_rows_found_on_one_rank_refuse_every_rank_before_step_one(tmp_path: Path):
    reports = tmp_path / "reports"
    reports.mkdir()
    result = run_torchrun(
        TESTS_DIR / "scripts" / "data_guard_ranks.py", str(tmp_path / "run"), str(reports), timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert "row(s) have no supervised token" in ranks[1]["refused"]
    assert (
        ranks[0]["refused"] == "the train dataset has rows the run cannot learn from: another rank found rows "
        "that teach nothing"
    )
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 0


def test_the_example_reports_line_numbers_and_data_guard_refuses(tmp_path: Path):
    from _rig import REPO_ROOT, run_python

    result = run_python(str(REPO_ROOT / "examples" / "validate_data.py"), str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"{tmp_path / 'train.jsonl'}:3" in out and "invalid_json" in out
    assert "answer_cut_off" in out and "contradictory_labels" in out
    assert "DataGuard refused before step 1" in out and "rows 4" in out


# ---- issue #26 item 1: every label shape the plain Trainer trains is read (trained under all_guards() to the
# plain weights: tests/test_contract_trainers.py) ----
_IDS = [[5, 6, 7, 8]] * 16


def test_one_class_id_per_row_is_read_and_minus_100_means_ignored_on_both_paths():
    from datasets import Dataset

    labels = [0, -100, 1, -100]
    arrow = check_tokenized_dataset(Dataset.from_dict({"input_ids": [[5, 6]] * 4, "labels": labels}))
    rows = check_tokenized_dataset([{"input_ids": [5, 6], "labels": v} for v in labels])
    assert arrow.masked_examples == rows.masked_examples == [1, 3] and arrow.stepped_aside == rows.stepped_aside == {}
    # float targets (regression) ignore no value: -100.0 is a target like any other
    floats = Dataset.from_dict({"input_ids": [[5, 6]] * 2, "labels": [-100.0, 2.0]})
    assert check_tokenized_dataset(floats).masked_rows == 0


def test_a_label_shape_it_cannot_read_is_named_in_one_warning_and_the_guard_steps_aside(
    output_dir: Path, caplog: pytest.LogCaptureFixture
):
    import logging

    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": _IDS * 4, "labels": [{"start": 1, "end": 2}] * 64})  # a struct column
    trainer = make_trainer(output_dir, train_dataset=data)
    guard = trainguard.DataGuard(alert_sinks=[])
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        found = guard.check(trainer)  # no exception: the check steps aside
    lines = [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()]
    assert lines == [
        "trainguard data_guard: column 'labels' holds struct<start: int64, end: int64> per row, a shape DataGuard "
        "does not read; the checks that need it were skipped"
    ]
    assert found.rows == 64 and found.masked_rows == 0 and guard.alerter.history == []
    # row by row, a 2-d tensor per row is also named once, however many rows hold one
    import torch

    rows = [{"input_ids": [5, 6], "labels": torch.zeros(2, 2)} for _ in range(10)]
    assert check_tokenized_dataset(rows).stepped_aside == {"labels": "a Tensor of shape (2, 2)"}
