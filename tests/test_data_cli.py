"""`trainguard validate-data`: exit 0 / 1 / 2, line numbers, --json, and never a traceback for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trainguard.cli import main

from _rig import make_tokenizer, run_python, subprocess_env

TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def _cmd() -> list[str]:
    exe = Path(sys.executable).with_name("trainguard")
    return [str(exe)] if exe.exists() else [shutil.which("trainguard") or "trainguard"]


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """The installed command in a fresh process, as a user runs it."""
    return subprocess.run(
        [*_cmd(), *argv], capture_output=True, text=True, env=subprocess_env(), timeout=300, check=False
    )


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


def write(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def test_broken_json_invalid_utf8_and_empty_records_exit_one_with_line_numbers(tmp_path: Path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(
        b'{"text": "the run resumed"}\n'
        b'{"text": "a flipped byte"\n'  # 2: unterminated
        b'{"text": "caf\xe9"}\n'  # 3: latin-1
        b"{}\n"  # 4: empty record
        b'{"text": ""}\n'  # 5: empty field
    )
    result = cli("validate-data", str(path))
    assert result.returncode == 1, result.stderr
    out = result.stdout
    for code, line in (("invalid_json", 2), ("invalid_utf8", 3), ("empty_record", 4), ("empty_field", 5)):
        assert any(code in row and f"{path}:{line}" in row for row in out.splitlines()), (code, out)
    assert "Traceback" not in result.stderr


def test_json_output_is_one_document_with_the_same_findings(tmp_path: Path):
    path = write(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "a"}, {"prompt": "p", "completion": "b"}])
    assert main(["validate-data", str(path), "--json"]) == 0
    result = cli("validate-data", str(path), "--json")
    document = json.loads(result.stdout)
    assert result.returncode == 0 and document["ok"] is True
    assert [w["code"] for w in document["warnings"]] == ["contradictory_labels"]
    assert document["warnings"][0]["line"] == 1 and document["stats"]["contradictory_prompts"] == 1


def test_clean_data_with_warnings_exits_zero(tmp_path: Path):
    path = write(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(5)] + [""])
    assert main(["validate-data", str(path)]) == 0


def test_tokenizer_folder_gives_token_lengths_and_truncation(
    tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
):
    long = " ".join(["the run resumed from the newest verified checkpoint"] * 6)
    path = write(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "ok"}]},
        ],
    )
    assert main(["validate-data", str(path), "--tokenizer", str(tokenizer_dir), "--max-length", "32", "--json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["stats"]["rendering"] == "the tokenizer's chat template"
    assert document["stats"]["tokens"]["over_max_length"] == 1
    cut = next(e for e in document["errors"] if e["code"] == "answer_cut_off")
    assert cut["line"] == 2 and cut["count"] == 1
    assert (
        main(
            [
                "validate-data",
                str(path),
                "--tokenizer",
                str(tokenizer_dir),
                "--max-length",
                "32",
                "--max-answer-cut-fraction",
                "0.5",
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    "case", ["missing_file", "missing_tokenizer", "broken_tokenizer", "bad_max_length", "bad_format"]
)
def test_usage_and_io_errors_exit_two_without_a_traceback(tmp_path: Path, case: str):
    data = write(tmp_path / "d.jsonl", [{"text": "x"}])
    broken = tmp_path / "broken_tok"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text("{ not json")
    argv = {
        "missing_file": [str(tmp_path / "nope.jsonl")],
        "missing_tokenizer": [str(data), "--tokenizer", str(tmp_path / "no_such_dir")],
        "broken_tokenizer": [str(data), "--tokenizer", str(broken)],
        "bad_max_length": [str(data), "--max-length", "0"],
        "bad_format": [str(data), "--format", "sharegpt"],
    }[case]
    result = cli("validate-data", *argv)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.strip()


def test_missing_file_with_json_gives_a_json_error_and_exit_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["validate-data", str(tmp_path / "nope.jsonl"), "--json"]) == 2
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is False and "nope.jsonl" in document["what"]


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    rng = __import__("random").Random(7)
    good = b"".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}).encode() + b"\n" for i in range(20))
    files = {
        "truncated.jsonl": good[: len(good) // 2 + 3],
        "random.jsonl": bytes(rng.randrange(256) for _ in range(4000)),
        "random.json": bytes(rng.randrange(256) for _ in range(4000)),
        "random.csv": bytes(rng.randrange(256) for _ in range(4000)),
        "random.parquet": bytes(rng.randrange(256) for _ in range(4000)),
        "utf16.jsonl": good.decode().encode("utf-16"),
        "nul.csv": b"prompt,completion\n\x00a,b\n",
        "truncated.json": json.dumps([{"text": "a"}, {"text": "b"}]).encode()[:-7],
        "empty.jsonl": b"",
        "scalar.json": b"42",
    }
    out = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = tmp_path / name
    return out


def test_bad_input_is_a_report_with_errors_never_a_traceback(tmp_path: Path):
    for name, path in _bad_inputs(tmp_path).items():
        result = cli("validate-data", str(path), "--json")
        assert "Traceback" not in result.stderr, (name, result.stderr)
        if name == "nul.csv":  # a NUL character is odd but valid text: the point is only that nothing crashes
            assert result.returncode in (0, 1)
            continue
        assert result.returncode == 1, (name, result.stdout, result.stderr)
        assert json.loads(result.stdout)["errors"], name


def test_without_a_tokenizer_the_command_imports_no_model_stack(tmp_path: Path):
    path = write(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])
    code = (
        "import sys\n"
        "from trainguard.cli import main\n"
        f"rc = main(['validate-data', {str(path)!r}, '--json'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "sys.stderr.write('HEAVY:' + (','.join(heavy) or 'none') + '\\n')\n"
        "sys.exit(rc)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "HEAVY:none" in result.stderr


def test_progress_bar_is_drawn_on_a_terminal_for_a_large_input(tmp_path: Path):
    import pty

    from trainguard.checks.data import progress

    path = write(tmp_path / "big.jsonl", [{"text": f"row {i}"} for i in range(3000)])
    code = (
        "import sys\n"
        "from trainguard.checks.data import progress\n"
        "progress._PROGRESS_MIN_BYTES = 1\n"  # 'large' for the test: the bar's logic, not a big file, is under test
        "from trainguard.cli import main\n"
        f"sys.exit(main(['validate-data', {str(path)!r}, '--json']))\n"
    )
    assert progress._PROGRESS_MIN_BYTES > 1 << 20
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=secondary,
        stdout=subprocess.PIPE,
        stderr=secondary,
        env=subprocess_env({"COLUMNS": "100", "TERM": "xterm"}),
    )
    os.close(secondary)
    out, _ = proc.communicate(timeout=120)
    drawn = b""
    try:
        while chunk := os.read(primary, 65536):
            drawn += chunk
    except OSError:  # the terminal closes with the child
        pass
    os.close(primary)
    assert proc.returncode == 0 and json.loads(out)["stats"]["valid_rows"] == 3000
    assert b"validating" in drawn  # the bar went to the terminal on stderr, never into the JSON on stdout


def test_the_terminal_table_shows_a_hostile_field_name_as_text_never_as_markup_or_escapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import io
    import re

    from trainguard.checks.data import validate_data

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    # A field name that is rich markup for a hyperlink (an OSC 8 sequence once rendered) and holds a raw OSC.
    path = write(tmp_path / "m.jsonl", [{"[link=https://evil.example/]click[/link]\x1b]0;pwned\x07": "a"}])
    monkeypatch.setenv("COLUMNS", "400")  # wide enough that rich folds no cell
    term = Terminal()
    validate_data(path).print(term)
    drawn = term.getvalue()
    assert "┃" in drawn or "│" in drawn  # still rich's table, with its own colours
    beyond_colours = re.sub(r"\x1b\[[0-9;]*m", "", drawn)  # rich's SGR colour codes are the only escapes allowed
    assert [ch for ch in beyond_colours if ch != "\n" and not ch.isprintable()] == []
    assert "[link=https://evil.example/]click[/link]" in beyond_colours and "\\x1b]0;pwned\\x07" in beyond_colours
