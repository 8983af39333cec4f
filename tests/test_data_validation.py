"""validate_data reads the whole dataset once and names every problem with its file, line and field."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

import trainguard
from trainguard.checks.data import DataReport, validate_data
from trainguard.errors import DataValidationError

from _rig import make_tokenizer, run_python

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
LONG = " ".join(["the run resumed from the newest verified checkpoint"] * 8)


@pytest.fixture(scope="module")
def chat_tokenizer() -> Any:
    """The rig's trained tokenizer with a simple Jinja chat template (a copy: the session fixture stays clean)."""
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def plain_tokenizer() -> Any:
    return make_tokenizer()


def write_lines(path: Path, lines: list[bytes | str | dict[str, Any]]) -> Path:
    with open(path, "wb") as fh:
        for item in lines:
            if isinstance(item, dict):
                item = json.dumps(item)
            fh.write((item.encode() if isinstance(item, str) else item) + b"\n")
    return path


def pc(prompt: str, completion: str) -> dict[str, str]:
    return {"prompt": prompt, "completion": completion}


def by_code(report: DataReport) -> dict[str, Any]:
    return {i.code: i for i in report.issues}


# ------------------------------------------------------------------------------------------ readability
def test_broken_json_invalid_utf8_and_empty_records_are_reported_with_line_numbers(tmp_path: Path):
    path = write_lines(
        tmp_path / "train.jsonl",
        [
            pc("what is two plus two", "four"),
            b'{"prompt": "hi" "completion": "there"}',  # line 2: missing comma
            b"",  # line 3: empty line
            b'{"prompt": "caf\xe9", "completion": "latin-1, not utf-8"}',  # line 4
            b"{}",  # line 5: empty record
            pc("name a colour", "blue"),
            b'{"prompt": "x", "completion": ""}',  # line 7: empty completion
            b'{"prompt": "cut off", "compl',  # line 8: truncated
        ],
    )
    report = validate_data(path)
    assert not report.ok
    found = by_code(report)
    assert (found["invalid_json"].line, found["invalid_json"].count) == (2, 2)
    assert "Expecting ',' delimiter" in found["invalid_json"].message
    assert '"prompt": "hi" "completion"' in found["invalid_json"].excerpt
    assert found["invalid_json"].examples[0]["line"] == 8
    assert "truncated?" in found["invalid_json"].examples[0]["message"]
    assert found["invalid_utf8"].line == 4 and "caf\\xe9" in found["invalid_utf8"].excerpt
    assert found["empty_record"].line == 5
    assert (found["empty_field"].line, found["empty_field"].field) == (7, "completion")
    assert found["empty_line"].level == "warning" and found["empty_line"].line == 3
    assert report.stats["valid_rows"] == 2
    assert all(i.file == str(path) for i in report.issues)


def test_raise_for_errors_names_file_line_and_field_and_counts(tmp_path: Path):
    path = write_lines(tmp_path / "d.jsonl", [pc("a", "b"), b'{"prompt": "c", "completion": 7}', b"[1, 2]"])
    report = validate_data(path)
    with pytest.raises(DataValidationError) as info:
        report.raise_for_errors()
    err = info.value
    assert err.where == {"file": str(path), "line": 2, "field": "completion"}
    assert f"wrong_type at {path}:2 (completion)" in str(err)
    assert "not_an_object" in str(err) and err.evidence["error_count"] == 2
    validate_data([pc("a", "b"), pc("c", "d")]).raise_for_errors()  # no error: returns quietly


def test_missing_path_raises_file_not_found_and_unknown_format_name_raises(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        validate_data(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="format='sharegpt'"):
        validate_data([pc("a", "b")], format="sharegpt")


def test_unknown_fields_are_an_error_that_suggests_naming_the_format():
    report = validate_data([{"question": "q", "answer": "a"}] * 3)
    issue = by_code(report)["unknown_format"]
    assert issue.level == "error" and "question" in issue.message and "format=" in issue.message


def test_a_lone_surrogate_and_deep_nesting_are_reported_not_raised(tmp_path: Path, plain_tokenizer: Any):
    path = write_lines(
        tmp_path / "s.jsonl",
        [
            b'{"text": "bad \\ud800 surrogate"}',
            b"[" * 100_000,
            b'{"text": "fine"}',
        ],
    )
    report = validate_data(path, tokenizer=plain_tokenizer, max_length=64)
    assert by_code(report)["invalid_json"].line == 2
    assert report.stats["valid_rows"] == 2
    assert by_code(report)["tokenizer_error"].line == 1  # the Rust tokenizer refuses a lone surrogate
    assert report.stats["tokens"]["tokenized_rows"] == 1


# ------------------------------------------------------------------------------------------------ schema
def test_chat_schema_problems_name_the_field():
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": "hi"},
        {"messages": [{"role": "gpt", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": ["not", "parts"]}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
    ]
    found = {(i.code, i.field): i for i in validate_data(rows).issues}
    assert found[("wrong_type", "messages")].row == 1
    assert found[("invalid_role", "messages[].role")].row == 2
    assert "'gpt'" in found[("invalid_role", "messages[].role")].message
    assert found[("wrong_type", "messages[].content")].row == 3
    assert found[("wrong_type", "messages[].content")].count == 2
    assert found[("no_answer", "messages")].row == 4


def test_alpaca_missing_output_and_wrong_input_type_are_errors():
    rows = [
        {"instruction": "add", "input": "2 and 2", "output": "4"},
        {"instruction": "add", "input": 5, "output": "4"},
        {"instruction": "sum", "input": ""},
        {"instruction": "", "output": "x"},
    ]
    report = validate_data(rows)
    found = {(i.code, i.field): i.row for i in report.issues}
    assert report.stats["format"] == "alpaca"
    assert found[("wrong_type", "input")] == 1
    assert found[("missing_field", "output")] == 2
    assert found[("empty_field", "instruction")] == 3


def test_format_is_detected_by_majority_and_can_be_named():
    rows = [{"text": "odd one"}] + [pc(f"q{i}", f"a{i}") for i in range(5)]
    assert validate_data(rows).stats["format"] == "prompt_completion"
    named = validate_data(rows, format="text")
    assert named.stats["format"] == "text" and not named.stats["format_detected"]
    assert by_code(named)["missing_field"].count == 5


# ----------------------------------------------------------------------------------- content statistics
def test_all_identical_rows_fail_the_diversity_check_with_counts():
    report = validate_data([pc("say hi", "hi")] * 10)
    found = by_code(report)
    assert found["low_diversity"].level == "error"
    assert found["low_diversity"].count == 9 and "only 1 of 10 rows are distinct" in found["low_diversity"].message
    assert found["duplicates"].count == 9 and report.stats["unique_ratio"] == 0.1
    assert validate_data([pc("say hi", "hi")] * 10, min_unique_ratio=None).ok  # the threshold can be turned off


def test_exact_and_normalized_duplicates_are_counted_with_the_row_they_repeat(tmp_path: Path):
    path = write_lines(
        tmp_path / "dups.jsonl",
        [
            pc("what is rope", "rotary position embedding"),  # 1
            pc("what is lora", "low rank adaptation"),  # 2
            pc("what is rope", "rotary position embedding"),  # 3: exact of 1
            pc("What is  RoPE", "Rotary position\nembedding"),  # 4: normalized of 1
            pc("what is lora", "low rank adaptation"),  # 5: exact of 2
            pc("what is fsdp", "fully sharded data parallel"),  # 6
        ],
    )
    report = validate_data(path)
    found = by_code(report)
    assert report.ok  # duplicates are warnings
    assert (found["duplicates"].count, found["duplicates"].line) == (2, 3)
    assert f"repeats {path}:1" in found["duplicates"].message
    assert found["duplicates"].examples[0]["line"] == 5 and found["duplicates"].examples[0]["same_as"] == f"{path}:2"
    assert (found["near_duplicates"].count, found["near_duplicates"].line) == (1, 4)
    assert report.stats["exact_duplicates"] == 2 and report.stats["normalized_duplicates"] == 1


def test_contradictory_answers_are_listed_with_line_numbers(tmp_path: Path):
    path = write_lines(
        tmp_path / "c.jsonl",
        [
            pc("capital of australia", "canberra"),  # 1
            pc("capital of france", "paris"),  # 2
            pc("Capital of Australia", "sydney"),  # 3: contradicts 1
            pc("capital of france", "paris"),  # 4: a duplicate, not a contradiction
            pc("capital of australia", "melbourne"),  # 5
            pc("capital of spain", "madrid"),  # 6
            pc("capital of spain", "barcelona"),  # 7
        ],
    )
    report = validate_data(path)
    issue = by_code(report)["contradictory_labels"]
    assert issue.count == 2 and report.stats["contradictory_prompts"] == 2
    assert issue.line == 1 and f"{path}:3" in issue.message and f"{path}:5" in issue.message
    assert "3 different answers" in issue.message
    assert issue.examples[0]["line"] == 6 and issue.examples[0]["also"] == [f"{path}:7"]


def test_eval_rows_that_also_occur_in_train_are_reported(tmp_path: Path):
    train = write_lines(tmp_path / "train.jsonl", [pc(f"question {i}", f"answer {i}") for i in range(20)])
    evals = write_lines(
        tmp_path / "eval.jsonl",
        [pc("question 3", "answer 3"), pc("new", "one"), pc("QUESTION  7", "answer 7"), b"{bad json"],
    )
    report = validate_data(train, eval_source=evals)
    issue = by_code(report)["eval_overlap"]
    assert issue.count == 2 and issue.file == str(evals) and issue.line == 1
    assert issue.examples[0]["same_as"] == f"{train}:8"
    assert by_code(report)["invalid_json"].file == str(evals)  # the eval data is validated too
    assert report.stats["eval"]["valid_rows"] == 3 and report.stats["eval_overlap"] == 2


# ------------------------------------------------------------------------------------------ token lengths
def test_over_long_examples_are_counted_and_rows_with_their_answer_cut_off_are_errors(plain_tokenizer: Any):
    rows = (
        [pc("short question", " short answer")] * 1
        + [
            pc(LONG + f" {i}", " yes")
            for i in range(3)  # the prompt alone fills max_length: nothing left to learn
        ]
        + [pc(f"q{i}", " " + LONG) for i in range(2)]
    )  # long answers: truncated, still teach something
    report = validate_data(rows, tokenizer=plain_tokenizer, max_length=32)
    found = by_code(report)
    tokens = report.stats["tokens"]
    assert tokens["tokenized_rows"] == 6 and tokens["over_max_length"] == 5
    assert found["truncated"].count == 5 and found["truncated"].level == "warning"
    assert (found["answer_cut_off"].count, found["answer_cut_off"].level) == (3, "error")
    assert found["answer_cut_off"].row == 1 and [e["row"] for e in found["answer_cut_off"].examples] == [2, 3]
    assert "mostly_truncated" not in found
    relaxed = validate_data(rows, tokenizer=plain_tokenizer, max_length=32, max_answer_cut_fraction=0.6)
    assert relaxed.ok and by_code(relaxed)["answer_cut_off"].level == "warning"


def test_token_lengths_are_those_of_the_tokenizer_over_every_row(plain_tokenizer: Any):
    rows = [pc("the run " * (i % 7 + 1), " the loss " * (i % 5 + 1)) for i in range(250)]
    report = validate_data(rows, tokenizer=plain_tokenizer, batch_size=64, min_unique_ratio=None)
    expected = sorted(len(plain_tokenizer(r["prompt"] + r["completion"])["input_ids"]) for r in rows)
    tokens = report.stats["tokens"]
    assert tokens["tokenized_rows"] == 250
    assert tokens["max"] == expected[-1] and tokens["p50"] == expected[124]
    assert tokens["max_length"] is None and "truncated" not in by_code(report)  # no limit given: nothing judged
    sampled = validate_data(rows, tokenizer=plain_tokenizer, max_tokenized_rows=100, min_unique_ratio=None)
    assert sampled.stats["tokens"]["tokenized_rows"] == 100 and sampled.stats["valid_rows"] == 250


def test_more_than_95_percent_truncated_is_an_error(plain_tokenizer: Any):
    rows = [{"text": f"{LONG} {i}"} for i in range(20)]
    found = by_code(validate_data(rows, tokenizer=plain_tokenizer, max_length=8))
    assert found["mostly_truncated"].level == "error" and found["mostly_truncated"].count == 20
    assert "answer_cut_off" not in found  # plain text is all supervised: truncation leaves some of it


def test_chat_rows_are_measured_with_the_chat_template(chat_tokenizer: Any, plain_tokenizer: Any):
    msgs = [
        [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "the loss became nan"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": LONG},
            {"role": "assistant", "content": "ok"},
        ],
        [{"role": "user", "content": "why"}, {"role": "assistant", "content": LONG}],
    ]
    rows = [{"messages": m} for m in msgs]
    report = validate_data(rows, tokenizer=chat_tokenizer, max_length=40)
    expected = [
        len(
            chat_tokenizer(chat_tokenizer.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"]
        )
        for m in msgs
    ]
    assert report.stats["rendering"] == "the tokenizer's chat template"
    assert report.stats["tokens"]["max"] == max(expected)
    assert report.stats["tokens"]["over_max_length"] == sum(n > 40 for n in expected) == 2
    cut = by_code(report)["answer_cut_off"]
    assert (cut.count, cut.row) == (1, 1)  # the long user turn pushes the answer past 40 tokens
    plain = validate_data(rows, tokenizer=plain_tokenizer, max_length=40)
    assert "plain 'role: content' lines" in plain.stats["rendering"]
    assert by_code(plain)["answer_cut_off"].row == 1


def test_a_render_function_gives_the_exact_training_text(plain_tokenizer: Any):
    rows = [{"instruction": "summarise", "input": "x", "output": "y"}]
    seen: list[dict[str, Any]] = []

    def render(rec: dict[str, Any]) -> tuple[str, str]:
        seen.append(rec)
        return LONG + " " + rec["instruction"], rec["output"]

    report = validate_data(rows, tokenizer=plain_tokenizer, max_length=16, render=render)
    assert seen == rows and by_code(report)["answer_cut_off"].count == 1


def test_tokenized_rows_whose_labels_are_all_ignored_are_flagged():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
        {"input_ids": [5, 6, 8], "labels": [-100, -100, -100]},
        {"input_ids": [], "labels": []},
        {"input_ids": [5, 6, 9], "labels": "positive"},
    ]
    found = {(i.code, i.field): i for i in validate_data(rows).issues}
    assert found[("answer_cut_off", "labels")].row == 1
    assert found[("empty_field", "input_ids")].row == 2
    assert found[("wrong_type", "labels")].row == 3


def test_class_ids_regression_targets_and_multi_label_rows_are_labels_the_trainer_trains():
    rows = [
        {"input_ids": [5, 6, 7], "labels": 1},  # sequence classification: one class id per row
        {"input_ids": [5, 6, 8], "labels": 0.25},  # regression
        {"input_ids": [5, 6, 9], "labels": [0.0, 1.0]},  # multi-label
        {"input_ids": [5, 7, 9], "labels": -100},  # a class id the loss ignores
    ]
    report = validate_data(rows, min_unique_ratio=None)
    assert [(i.code, i.level, i.row) for i in report.issues] == [("answer_cut_off", "error", 3)]
    assert report.stats["valid_rows"] == 4


def test_target_ids_of_another_length_are_a_warning_not_an_error():
    # An encoder-decoder's targets differ in length from its inputs; a causal LM's would crash its loss.
    report = validate_data([{"input_ids": [5, 6, 7, 8], "labels": [9, 10]}] * 2 + [{"input_ids": [4], "labels": [4]}])
    [issue] = [i for i in report.issues if i.code == "labels_length_differs"]
    assert issue.level == "warning" and issue.field == "labels" and issue.count == 2
    assert "holds 2 ids and input_ids 4" in issue.message
    assert not report.errors


# ----------------------------------------------------------------------------------------- other inputs
ROWS = [
    pc("capital of australia", "canberra"),
    pc("capital of australia", "sydney"),
    pc("capital of france", "paris"),
    pc("capital of france", "paris"),
    {"prompt": "no answer", "completion": ""},
]


def _summary(report: DataReport) -> dict[str, Any]:
    return {(i.code, i.field): (i.count, i.line if i.line is not None else i.row) for i in report.issues}


def test_parquet_csv_json_folder_dataset_and_list_inputs_give_the_same_findings(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet", row_group_size=2)
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_lines(folder / "b.jsonl", ROWS[2:])
    write_lines(folder / "a.jsonl", ROWS[:2])
    (folder / "README.md").write_text("not data")

    by_row = _summary(validate_data(ROWS))
    assert by_row == {
        ("empty_field", "completion"): (1, 4),
        ("duplicates", None): (1, 3),
        ("contradictory_labels", None): (1, 0),
    }
    assert _summary(validate_data(Dataset.from_list(ROWS))) == by_row
    assert _summary(validate_data(DatasetDict(train=Dataset.from_list(ROWS)))) == by_row
    assert _summary(validate_data(tmp_path / "d.parquet")) == by_row
    # Text files give physical line numbers: the CSV header is line 1, the array's records start on line 2.
    by_line = {k: (c, r + 2) for k, (c, r) in by_row.items()}
    assert _summary(validate_data(tmp_path / "d.csv")) == by_line
    assert _summary(validate_data(tmp_path / "d.json")) == {k: (c, 2 + 4 * r) for k, (c, r) in by_row.items()}
    folder_report = validate_data(folder)
    assert folder_report.stats["sources"] == [str(folder / "a.jsonl"), str(folder / "b.jsonl")]
    found = by_code(folder_report)
    assert (found["empty_field"].file, found["empty_field"].line) == (str(folder / "b.jsonl"), 3)
    assert found["duplicates"].message.endswith(f"first: {folder / 'b.jsonl'}:2 repeats {folder / 'b.jsonl'}:1)")
    assert found["skipped_files"].level == "warning" and "README.md" in found["skipped_files"].message


def test_dataset_dict_validation_split_is_checked_for_overlap():
    from datasets import Dataset, DatasetDict

    data = DatasetDict(
        train=Dataset.from_list([pc(f"q{i}", f"a{i}") for i in range(10)]),
        validation=Dataset.from_list([pc("q1", "a1"), pc("new", "row")]),
    )
    report = validate_data(data)
    assert report.stats["eval_overlap"] == 1 and by_code(report)["eval_overlap"].file == "validation"


def test_csv_rows_of_the_wrong_width_and_a_json_array_error_are_located(tmp_path: Path):
    (tmp_path / "d.csv").write_text('prompt,completion\n"a","b"\n"c","d","e"\n"multi\nline","f"\n"g",""\n')
    found = by_code(validate_data(tmp_path / "d.csv", min_unique_ratio=None))
    assert found["invalid_csv"].line == 3 and "3 field(s), the header has 2" in found["invalid_csv"].message
    assert found["empty_field"].line == 6  # the quoted newline counts: line numbers stay physical
    (tmp_path / "a.json").write_text('[\n  {"text": "one"},\n  {"text": "two"}\n  {"text": "three"}\n]\n')
    issue = by_code(validate_data(tmp_path / "a.json"))["invalid_json"]
    assert issue.line == 4 and "the rest of the file was not checked" in issue.message
    (tmp_path / "lines.json").write_text('{"text": "one"}\n{"text": "two"}\n{"text": oops}\n')
    report = validate_data(tmp_path / "lines.json")  # a .json file that holds JSON Lines
    assert report.stats["valid_rows"] == 2 and by_code(report)["invalid_json"].line == 3


def test_unreadable_and_unsupported_files_are_errors_in_the_report(tmp_path: Path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    assert by_code(validate_data(tmp_path / "bad.parquet"))["unreadable_file"].level == "error"
    (tmp_path / "notes.txt").write_text("hello\n")
    assert by_code(validate_data(tmp_path / "notes.txt"))["unsupported_file"].level == "error"
    (tmp_path / "lines.data").write_text('{"text": "sniffed as JSON Lines"}\n')
    assert validate_data(tmp_path / "lines.data").stats["valid_rows"] == 1
    (tmp_path / "empty").mkdir()
    assert by_code(validate_data(tmp_path / "empty"))["no_data_files"].level == "error"


# ------------------------------------------------------------------------------------------------ report
def test_report_prints_a_table_and_round_trips_as_json(tmp_path: Path):
    path = write_lines(tmp_path / "t.jsonl", [pc("a", "b"), b"{oops", pc("a", "b")])
    report = validate_data(path)
    text = str(report)
    assert "FAILED" in text and f"{path}:2" in text and "invalid_json" in text and "duplicates" in text
    document = json.loads(report.to_json())
    assert document["ok"] is False and document["errors"][0]["line"] == 2
    assert document["stats"]["valid_rows"] == 2
    import io

    out = io.StringIO()
    report.print(out)
    assert out.getvalue() == text + "\n"  # not a terminal: plain text

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    report.print(term)
    drawn = term.getvalue()
    assert "┃" in drawn or "│" in drawn  # a rich table
    assert "invalid_json" in drawn and "FAILED" in drawn


def test_progress_bar_can_be_forced_and_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = write_lines(tmp_path / "p.jsonl", [pc(f"q{i}", f"a{i}") for i in range(50)])
    assert validate_data(path, progress=True).to_dict()["stats"]["valid_rows"] == 50
    capsys.readouterr()


def test_public_names_and_cheap_import():
    assert trainguard.validate_data is validate_data and trainguard.DataReport is DataReport
    code = (
        "import sys, trainguard\n"
        "from trainguard.checks.data import validate_data\n"
        "validate_data([{'text': 'a'}, {'text': 'b'}])\n"
        "print(','.join(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules) or 'none')\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"
