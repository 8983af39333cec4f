"""dataset_fingerprint: content-based, order-sensitive, the same in every process, blind to paths and mtimes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from trainguard import DataValidationError, dataset_fingerprint
from trainguard.checks.dataset import describe_dataset, plan_resume

from _rig import make_lm_dataset, run_python


def _rows(n: int = 60) -> list[dict]:
    return [
        {
            "input_ids": list(range(i % 7 + 1)),
            "text": f"row {i}" if i % 5 else None,
            "score": i / 3,
            "flag": i % 2 == 0,
            "meta": {"id": i, "tags": ["a"] * (i % 3)},
        }
        for i in range(n)
    ]


def test_equal_rows_give_equal_fingerprints_however_the_table_is_chunked_or_sliced():
    from datasets import Dataset, concatenate_datasets

    rows = _rows()
    whole = Dataset.from_list(rows)
    chunked = concatenate_datasets([Dataset.from_list(rows[:17]), Dataset.from_list(rows[17:])])
    assert len(chunked.data.table.column(0).chunks) == 2
    assert dataset_fingerprint(chunked) == dataset_fingerprint(whole)
    # a contiguous select is a zero-copy slice with an offset into the same buffers
    assert dataset_fingerprint(whole.select(range(10, 40))) == dataset_fingerprint(Dataset.from_list(rows[10:40]))
    assert dataset_fingerprint(whole.data.table) == dataset_fingerprint(whole)  # a pyarrow.Table reads the same


def test_a_shuffled_dataset_differs_and_fingerprints_like_its_flattened_rows():
    from datasets import Dataset

    rows = _rows()
    ds = Dataset.from_list(rows)
    shuffled = ds.shuffle(seed=1)
    assert shuffled._indices is not None  # read through the indices mapping
    assert dataset_fingerprint(shuffled) != dataset_fingerprint(ds)
    order = shuffled._indices.column(0).to_pylist()
    assert dataset_fingerprint(shuffled) == dataset_fingerprint(Dataset.from_list([rows[i] for i in order]))


@pytest.mark.parametrize(
    "change",
    ["value", "drop_row", "null", "column_name", "swap_rows"],
)
def test_any_change_of_content_or_order_changes_the_fingerprint(change: str):
    from datasets import Dataset

    rows = _rows()
    before = dataset_fingerprint(Dataset.from_list(rows))
    other = [json.loads(json.dumps(r)) for r in rows]
    if change == "value":
        other[30]["input_ids"][0] += 1
    elif change == "drop_row":
        other.pop()
    elif change == "null":
        other[1]["text"] = None
    elif change == "column_name":
        other = [{("label" if k == "flag" else k): v for k, v in r.items()} for r in other]
    else:
        other[3], other[4] = other[4], other[3]
    assert dataset_fingerprint(Dataset.from_list(other)) != before


def test_the_fingerprint_is_the_same_in_a_new_process():
    here = dataset_fingerprint(make_lm_dataset(32, seed=3))
    code = (
        "from _rig import make_lm_dataset; from trainguard import dataset_fingerprint; "
        "print(dataset_fingerprint(make_lm_dataset(32, seed=3)))"
    )
    result = run_python(code, env={"PYTHONHASHSEED": "123"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == here


def test_a_jsonl_file_rewritten_with_a_new_mtime_or_moved_keeps_its_fingerprint(tmp_path: Path):
    from datasets import load_dataset

    lines = "".join(json.dumps({"input_ids": [i, i + 1], "labels": [i, i + 1]}) + "\n" for i in range(50))
    first = tmp_path / "a" / "train.jsonl"
    first.parent.mkdir()
    first.write_text(lines)
    os.utime(first, (1_000_000, 1_000_000))
    ident = describe_dataset(first)
    assert ident.num_rows == 50 and ident.kind == "files"
    loaded = load_dataset("json", data_files=str(first), split="train", cache_dir=str(tmp_path / "cache"))

    first.write_text(lines)  # rewritten: same bytes, new mtime
    moved = tmp_path / "b" / "copy.jsonl"
    moved.parent.mkdir()
    moved.write_text(lines)
    assert dataset_fingerprint(first) == ident.fingerprint
    assert dataset_fingerprint(moved) == ident.fingerprint
    reloaded = load_dataset("json", data_files=str(first), split="train", cache_dir=str(tmp_path / "cache"))
    # datasets' own fingerprint follows path and mtime, so it changed; the content fingerprint did not
    assert reloaded._fingerprint != loaded._fingerprint
    assert dataset_fingerprint(reloaded) == dataset_fingerprint(loaded)

    first.write_text(lines.replace("[7, 8]", "[7, 9]", 1))
    assert dataset_fingerprint(first) != ident.fingerprint


def test_a_folder_is_read_in_sorted_order_skipping_hidden_files_and_datasets_metadata(tmp_path: Path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.jsonl").write_text('{"x": 2}\n')
    (folder / "sub" / "a.jsonl").write_text('{"x": 1}\n')
    before = describe_dataset(folder)
    assert before.num_rows == 2
    (folder / ".hidden.jsonl").write_text('{"x": 3}\n')
    (folder / "state.json").write_text('{"_fingerprint": "abc"}')
    assert dataset_fingerprint(folder) == before.fingerprint
    assert dataset_fingerprint(str(folder / "**" / "*.jsonl")) == before.fingerprint  # sorted paths: b, sub/a
    (folder / "b.jsonl").write_text('{"x": 20}\n')
    assert dataset_fingerprint(folder) != before.fingerprint


def test_rows_with_tensors_and_arrays_are_fingerprinted_by_value():
    import numpy as np
    import torch

    rows = [{"input_ids": torch.tensor([1, 2, 3]), "w": np.float32(0.5)}]
    same = [{"w": np.float32(0.5), "input_ids": torch.tensor([1, 2, 3])}]
    assert dataset_fingerprint(rows) == dataset_fingerprint(same)
    assert dataset_fingerprint(rows) != dataset_fingerprint([{"input_ids": torch.tensor([1, 2, 4]), "w": 0.5}])
    with pytest.raises(ValueError, match="row 0"):
        dataset_fingerprint([{"x": object()}])


def test_a_streaming_dataset_is_fingerprinted_by_its_files_or_refused_clearly(tmp_path: Path):
    from datasets import load_dataset

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"x": i}) + "\n" for i in range(10)))
    stream = load_dataset("json", data_files=str(data), split="train", streaming=True)
    assert dataset_fingerprint(stream) == dataset_fingerprint(data)
    with pytest.raises(ValueError, match=r"IterableDataset.*pass the files"):
        dataset_fingerprint(stream.map(lambda r: r))


def test_unreadable_inputs_name_the_path_or_the_type(tmp_path: Path):
    with pytest.raises(DataValidationError, match="no such data file") as info:
        dataset_fingerprint(tmp_path / "missing.jsonl")
    assert str(tmp_path / "missing.jsonl") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataValidationError, match="no data files"):
        dataset_fingerprint(tmp_path / "empty")
    with pytest.raises(ValueError, match="int"):
        dataset_fingerprint(42)


def test_resume_arithmetic_matches_the_origin_scenario():
    # checkpoint at step 50, new data gives 25 steps per epoch, one epoch: plain Trainer trains nothing
    plan = plan_resume(50, 25, max_steps=-1, num_train_epochs=1)
    assert plan.steps_to_train == 0
    assert "it would stop at once, training nothing" in plan.describe()
    more = plan_resume(40, 30, max_steps=-1, num_train_epochs=3)
    assert (more.epochs_trained, more.steps_skipped, more.steps_to_train) == (1, 10, 50)
