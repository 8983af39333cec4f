"""The ``trainguard`` command on hostile and broken input: exit 0 ok / 1 check failed / 2 usage, I/O or internal
error; ``--json`` is one JSON document on every path; names and text that are not UTF-8 are printed escaped; a FIFO,
a missing, unreadable or read-only folder is a clean exit 2, never a traceback or a hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trainguard.checks import checkpoint as ckpt
from trainguard.checks.data import validate_data
from trainguard.cli import ISSUES_URL, main

from _rig import REPO_ROOT, mounted_tmpfs, subprocess_env

SECRET = "hf_abcdefghijklmnopqrstuvwxyz012345"


def _checkpoint(parent: Path, step: int = 1) -> Path:
    """A small legacy checkpoint (no manifest) that passes the structural checks."""
    folder = parent / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "config.json").write_text("{}")
    return folder


def _create(path: bytes, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _status(argv: list[str]) -> int | str | None:
    """The exit status of ``main(argv)``: returned, or (usage errors, --help, --version) raised as argparse does."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.fixture
def good_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    _checkpoint(run)
    return run


@pytest.fixture
def damaged_run(tmp_path: Path) -> Path:
    run = tmp_path / "damaged"
    folder = _checkpoint(run)
    (folder / "optimizer.pt").write_bytes(b"not a torch file")
    return run


@pytest.fixture
def non_utf8_run(tmp_path: Path) -> Path:
    """An output_dir whose own name and one file name in its checkpoint are not UTF-8 (bytes 0xff)."""
    run_bytes = os.fsencode(tmp_path) + b"/runs-\xff"
    os.mkdir(run_bytes)
    run = Path(os.fsdecode(run_bytes))
    folder = _checkpoint(run)
    _create(os.fsencode(folder) + b"/bad-\xff.bin", b"junk, not a torch file")
    return run


def _python(*argv: str | bytes, code: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """``python -m trainguard ARGV`` (or ``python -c CODE ARGV``) in a fresh process; output kept as bytes."""
    target: list[str | bytes] = ["-c", code] if code is not None else ["-m", "trainguard"]
    return subprocess.run(
        [sys.executable, *target, *argv],
        capture_output=True,
        env=subprocess_env({"LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}),
        timeout=timeout,
        check=False,
    )


# A real process whose command hits a bug: the checkpoint check raises what no check should.
_BUGGY = (
    "import runpy, sys\n"
    "import trainguard.checks.checkpoint as ckpt\n"
    "def broken(*args, **kwargs):\n"
    f"    raise ZeroDivisionError('division by zero while hashing, token {SECRET}')\n"
    "ckpt.check_checkpoint = broken\n"
    "sys.argv[0] = 'trainguard'\n"
    "runpy.run_module('trainguard', run_name='__main__')\n"
)


@pytest.fixture
def buggy_check(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError(f"division by zero while hashing, token {SECRET}")

    monkeypatch.setattr(ckpt, "check_checkpoint", broken)


# ------------------------------------------------------------------------------------------------ exit codes
@pytest.mark.timeout(120)
def test_a_real_process_exits_0_ok_1_check_failed_2_usage_io_or_internal_error(
    good_run: Path, damaged_run: Path, tmp_path: Path
):
    assert Path(REPO_ROOT / "src" / "trainguard" / "__main__.py").is_file()
    cases = {
        "ok": (_python("verify", str(good_run)), 0),
        "check failed": (_python("verify", str(damaged_run)), 1),
        "bad subcommand": (_python("frobnicate", str(good_run)), 2),
        "missing argument": (_python("verify"), 2),
        "missing folder": (_python("verify", str(tmp_path / "absent")), 2),
        "internal error": (_python("verify", str(good_run), code=_BUGGY), 2),
    }
    for name, (result, expected) in cases.items():
        assert result.returncode == expected, (name, result.stdout, result.stderr)
        assert b"Traceback" not in result.stderr, (name, result.stderr)
    bug = cases["internal error"][0].stderr.decode()
    assert "internal error in trainguard" in bug and "ZeroDivisionError" in bug and ISSUES_URL in bug


def test_an_internal_error_is_exit_2_with_one_redacted_line_naming_the_bug_and_where_to_report_it(
    good_run: Path, buggy_check: None, capsys: pytest.CaptureFixture[str]
):
    assert main(["verify", str(good_run)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err, err
    assert "internal error in trainguard" in err
    assert "ZeroDivisionError: division by zero while hashing" in err
    assert ISSUES_URL in err and "--debug" in err
    assert SECRET not in err  # redacted: the message of an unexpected exception may carry anything
    assert "Traceback" not in err
    assert captured.out == ""


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_subcommand_shows_the_full_traceback_redacted(
    good_run: Path, buggy_check: None, capsys: pytest.CaptureFixture[str], where: str
):
    argv = ["--debug", "verify", str(good_run)] if where == "before" else ["verify", str(good_run), "--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert "internal error in trainguard" in err.strip().splitlines()[-1]
    assert SECRET not in err


def test_an_internal_error_with_json_is_one_json_document(
    good_run: Path, buggy_check: None, capsys: pytest.CaptureFixture[str]
):
    assert main(["verify", str(good_run), "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["error"] == "InternalError" and doc["exception"] == "ZeroDivisionError"
    assert ISSUES_URL in doc["next_step"] and SECRET not in json.dumps(doc)


def test_the_internal_error_points_to_the_issue_tracker_of_pyproject():
    tomllib = pytest.importorskip("tomllib")
    urls = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert urls["Issues"] == ISSUES_URL


def test_help_shows_the_exit_status_table(capsys: pytest.CaptureFixture[str]):
    assert _status(["--help"]) == 0
    out = capsys.readouterr().out
    for line in ("0    all good", "1    a check failed", "2    usage error, I/O error", "internal error"):
        assert line in out, out
    assert _status(["verify", "--help"]) == 0
    assert "exit status:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["frobnicate"],
        ["verify"],
        ["verify", "--workers", "many", "x"],
        ["inspect"],
        [],
    ],
    ids=["bad-subcommand", "missing-argument", "bad-option-value", "inspect-missing-argument", "no-subcommand"],
)
def test_usage_errors_exit_2_with_a_message_and_no_traceback(argv: list[str], capsys: pytest.CaptureFixture[str]):
    assert _status(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() and "Traceback" not in err


# ------------------------------------------------------------------------------------------------------ --json
@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "frobnicate"],
        ["frobnicate", "--json"],
        ["verify", "--json"],
        ["--json", "verify"],
        ["--json"],
        ["validate-data", "--json", "--format", "sharegpt", "x.jsonl"],
        ["--json", "inspect"],
    ],
)
def test_json_usage_errors_are_exactly_one_json_document(argv: list[str], capsys: pytest.CaptureFixture[str]):
    assert _status(argv) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["error"] == "UsageError" and doc["what"]


@pytest.mark.parametrize("position", ["before", "after"])
def test_json_before_or_after_the_subcommand_gives_the_result(
    damaged_run: Path, capsys: pytest.CaptureFixture[str], position: str
):
    argv = ["--json", "verify", str(damaged_run)] if position == "before" else ["verify", str(damaged_run), "--json"]
    assert main(argv) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["checkpoints"][0]["problems"][0]["file"] == "optimizer.pt"


def test_json_help_and_version_are_json_too(capsys: pytest.CaptureFixture[str]):
    assert _status(["--json", "--help"]) == 0
    assert "exit status:" in json.loads(capsys.readouterr().out)["text"]
    assert _status(["--version", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"].startswith("trainguard ")


@pytest.mark.timeout(120)
def test_json_in_a_real_process_is_one_document_on_usage_io_and_internal_errors(good_run: Path, tmp_path: Path):
    for argv, code in (
        (["--json", "frobnicate"], None),
        (["verify", str(tmp_path / "absent"), "--json"], None),
        (["--json", "verify", str(good_run)], _BUGGY),
    ):
        result = _python(*argv, code=code)
        assert result.returncode == 2, (argv, result.stdout, result.stderr)
        doc = json.loads(result.stdout)
        assert doc["ok"] is False, argv


# ---------------------------------------------------------------------------------------------- not UTF-8
def test_verify_reports_a_checkpoint_with_a_non_utf8_name_escaped_in_text_and_json(
    non_utf8_run: Path, capsys: pytest.CaptureFixture[str]
):
    tree = non_utf8_run.parent
    assert main(["verify", str(tree)]) == 1
    out = capsys.readouterr().out
    assert "runs-\\xff" in out and "bad-\\xff.bin" in out and "FAILED" in out

    for target in (tree, non_utf8_run):
        assert main(["verify", str(target), "--json"]) == 1
        text = capsys.readouterr().out
        text.encode("utf-8")  # no lone surrogate: any JSON reader can take it
        doc = json.loads(text)
        assert doc["checkpoints"][0]["problems"][0]["file"] == "bad-\\xff.bin"
        assert "runs-\\xff" in doc["checkpoints"][0]["output_dir"]
        assert "runs-\\xff" in doc["checkpoints"][0]["path"]


def test_manifest_reports_a_checkpoint_with_a_non_utf8_name_escaped_in_text_and_json(
    non_utf8_run: Path, capsys: pytest.CaptureFixture[str]
):
    assert main(["manifest", str(non_utf8_run)]) == 1  # refused: bad-\xff.bin fails the structural checks
    out = capsys.readouterr().out
    assert "refused" in out and "bad-\\xff.bin" in out

    assert main(["manifest", str(non_utf8_run), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["checkpoints"][0]["action"] == "refused" and "runs-\\xff" in doc["checkpoints"][0]["path"]

    assert main(["manifest", str(non_utf8_run), "--force", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["checkpoints"][0]["action"] == "written" and "runs-\\xff" in doc["path"]


@pytest.mark.timeout(120)
def test_a_real_process_prints_non_utf8_names_as_valid_utf8(non_utf8_run: Path):
    for argv in (["verify", non_utf8_run], ["verify", non_utf8_run, "--json"], ["manifest", non_utf8_run]):
        result = _python(*(os.fsencode(a) if isinstance(a, Path) else a for a in argv))
        assert result.returncode == 1, (argv, result.stderr)
        out = result.stdout.decode("utf-8")  # strict: raw 0xff bytes would fail here
        if "--json" in argv:
            out = json.loads(out)["checkpoints"][0]["problems"][0]["file"]
        assert "bad-\\xff.bin" in out, out


def _surrogate_data(tmp_path: Path) -> Path:
    # "\ud800" is a valid JSON escape (json.loads accepts it) but no UTF-8 text can hold it.
    path = tmp_path / "lone.jsonl"
    path.write_bytes(b'{"te\\ud800xt": "a"}\n{"te\\ud800xt": "b"}\n')
    return path


def test_validate_data_shows_a_lone_surrogate_escaped_in_text_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = _surrogate_data(tmp_path)
    assert main(["validate-data", str(path)]) == 1
    assert "te\\ud800xt" in capsys.readouterr().out
    assert main(["validate-data", str(path), "--json"]) == 1
    text = capsys.readouterr().out
    text.encode("utf-8")
    doc = json.loads(text)
    assert any("te\\ud800xt" in e["message"] for e in doc["errors"])


def test_a_data_report_with_a_lone_surrogate_renders_as_utf8_text_and_json(tmp_path: Path):
    report = validate_data(_surrogate_data(tmp_path), progress=False)
    assert "te\\ud800xt" in str(report)
    str(report).encode("utf-8")
    assert any("te\\ud800xt" in e["message"] for e in json.loads(report.to_json().encode("utf-8"))["errors"])


# ------------------------------------------------------------------------------------ missing, FIFO, unreadable
@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.jsonl"
    os.mkfifo(path)
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["verify", "manifest", "validate-data"])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_fifo_given_as_path_is_a_clean_exit_2_and_never_blocks(
    fifo: Path, command: str, as_json: bool, capsys: pytest.CaptureFixture[str]
):
    assert main([command, str(fifo), *(["--json"] if as_json else [])]) == 2
    captured = capsys.readouterr()
    if as_json:
        doc = json.loads(captured.out)
        assert doc["ok"] is False and "pipe.jsonl" in doc["what"] and "FIFO" in doc["what"]
    else:
        assert "pipe.jsonl" in captured.err and "FIFO" in captured.err and "Traceback" not in captured.err


@pytest.mark.timeout(60)
def test_a_fifo_given_as_eval_data_is_refused_without_blocking(
    fifo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    assert main(["validate-data", str(data), "--eval", str(fifo), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"] == "UnsafeFileError"


@pytest.mark.parametrize("command", ["verify", "manifest", "validate-data"])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_missing_path_is_a_clean_exit_2(
    tmp_path: Path, command: str, as_json: bool, capsys: pytest.CaptureFixture[str]
):
    missing = tmp_path / "nowhere"
    assert main([command, str(missing), *(["--json"] if as_json else [])]) == 2
    captured = capsys.readouterr()
    shown = json.loads(captured.out)["what"] if as_json else captured.err
    assert str(missing) in shown and "Traceback" not in captured.err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 folder anyway, so it cannot be unreadable")
@pytest.mark.parametrize("command", ["verify", "manifest", "validate-data"])
def test_a_folder_without_read_permission_is_a_clean_exit_2(
    good_run: Path, command: str, capsys: pytest.CaptureFixture[str]
):
    good_run.chmod(0)
    try:
        assert main([command, str(good_run)]) == 2
        err = capsys.readouterr().err
        assert "Permission denied" in err and "Traceback" not in err
        assert main([command, str(good_run), "--json"]) == 2
        assert json.loads(capsys.readouterr().out)["error"] == "PermissionError"
    finally:
        good_run.chmod(0o755)


def _without_root_file_access() -> list[str]:
    """A command prefix under which permission bits apply: root minus CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (its
    children get no more than the bounding set), or nothing for an ordinary user."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"root, and setpriv cannot drop the file-access capabilities here: {probe.stderr.strip()}")
    return prefix


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["verify", "manifest", "validate-data"])
def test_a_folder_without_read_permission_is_a_clean_exit_2_in_a_real_process(good_run: Path, command: str):
    prefix = _without_root_file_access()
    (good_run / "train.jsonl").write_text('{"text": "a"}\n')
    good_run.chmod(0)
    try:
        for extra in ([], ["--json"]):
            result = subprocess.run(
                [*prefix, sys.executable, "-m", "trainguard", command, str(good_run), *extra],
                capture_output=True,
                text=True,
                env=subprocess_env(),
                timeout=60,
                check=False,
            )
            assert result.returncode == 2, (extra, result.stdout, result.stderr)
            assert "Traceback" not in result.stderr
            shown = json.loads(result.stdout)["what"] if extra else result.stderr
            assert "Permission denied" in shown and str(good_run) in shown
    finally:
        good_run.chmod(0o755)


@pytest.fixture
def read_only_run() -> Iterator[Path]:
    """A run on a real read-only filesystem (a tmpfs remounted ro), where even root cannot write."""
    with mounted_tmpfs("3m") as mount:
        run = mount / "run"
        _checkpoint(run)
        remount = subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only: {remount.stderr.strip()}")
        yield run


def test_manifest_on_a_read_only_folder_is_a_clean_exit_2_naming_the_file(
    read_only_run: Path, capsys: pytest.CaptureFixture[str]
):
    assert main(["manifest", str(read_only_run)]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and str(read_only_run) in err and "Traceback" not in err
    assert ".trainguard-tmp-" not in err  # the file the user knows, not a temporary name
    assert main(["manifest", str(read_only_run), "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and "Read-only file system" in doc["what"]
    assert main(["verify", str(read_only_run)]) == 0  # reading needs no write


# ------------------------------------------------------------------------------- inspect gets the same guarantees
def test_inspect_prints_a_non_utf8_output_dir_escaped_and_reports_a_bug_as_exit_2(
    non_utf8_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    assert main(["inspect", str(non_utf8_run), "--no-verify"]) == 0
    assert "runs-\\xff" in capsys.readouterr().out
    assert main(["--json", "inspect", str(non_utf8_run), "--no-verify"]) == 0
    assert "runs-\\xff" in json.loads(capsys.readouterr().out)["path"]

    from trainguard.commands import inspect

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("lock")

    monkeypatch.setattr(inspect, "inspect_output_dir", broken)
    assert main(["inspect", str(non_utf8_run), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["exception"] == "KeyError"


def test_display_text_shows_undecodable_bytes_as_xnn_and_other_lone_surrogates_as_unnnn():
    from trainguard.safe_fs import display_json, display_text

    name = os.fsdecode(b"runs-\xff")  # as os.listdir gives it
    assert display_text(name) == "runs-\\xff"
    assert display_text(json.loads('"te\\ud800xt"')) == "te\\ud800xt"
    assert display_text("café ✓") == "café ✓"  # valid text is left alone
    doc = display_json({name: [Path(name), ("a\ud800",)], "n": 1})
    assert doc == {"runs-\\xff": ["runs-\\xff", ["a\\ud800"]], "n": 1}
    json.dumps(doc, ensure_ascii=False).encode("utf-8")


# ------------------------------------------------------------------------------------------- terminal injection
# File names that drive a terminal when printed raw: a carriage return that overwrites the FAILED line, an OSC that
# retitles the window, a screen clear, and a newline that forges a line of its own.
HOSTILE_NAMES = {
    "carriage return": "ok\rcheckpoint-1 verified.bin",
    "osc title": "\x1b]0;pwned\x07.bin",
    "clear screen": "\x1b[2J.bin",
    "newline": "x\ncheckpoint-1 verified.bin",
}


def _raw_controls(text: str) -> list[str]:
    """Every character of ``text`` a terminal could act on, except the line breaks the command writes itself."""
    return [ch for ch in text if ch != "\n" and not ch.isprintable()]


@pytest.fixture
def hostile_run(tmp_path: Path) -> Path:
    """A legacy checkpoint holding one damaged file under each hostile name (so each is a problem line)."""
    run = tmp_path / "hostile"
    folder = _checkpoint(run)
    for name in HOSTILE_NAMES.values():
        (folder / name).write_bytes(b"junk, not a torch file")
    return run


@pytest.mark.parametrize("command", ["verify", "manifest"])
def test_a_planted_control_character_name_is_shown_escaped_the_failed_line_stays_and_json_keeps_it_exact(
    hostile_run: Path, command: str, capsys: pytest.CaptureFixture[str]
):
    assert main([command, str(hostile_run)]) == 1
    captured = capsys.readouterr()
    assert _raw_controls(captured.out + captured.err) == []
    assert ("FAILED" if command == "verify" else "refused") in captured.out
    problem_lines = [line for line in captured.out.splitlines() if "torch.save format" in line]
    assert len(problem_lines) == len(HOSTILE_NAMES)  # the newline in a name forged no line of its own
    for escaped in ("ok\\rcheckpoint-1 verified.bin", "\\x1b]0;pwned\\x07.bin", "\\x1b[2J.bin", "x\\ncheckpoint-1"):
        assert any(line.lstrip().startswith(escaped) for line in problem_lines), (escaped, problem_lines)

    assert main([command, str(hostile_run), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    report = doc["checkpoints"][0] if command == "verify" else doc["checkpoints"][0]["before"]
    assert {p["file"] for p in report["problems"]} == set(HOSTILE_NAMES.values())  # --json keeps them exact


def test_a_hostile_output_dir_name_is_escaped_in_the_tree_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    _checkpoint(tmp_path / "tree" / "run\x1b]0;pwned\x07\nfake: 1 ok")
    assert main(["verify", str(tmp_path / "tree")]) == 0
    out = capsys.readouterr().out
    assert _raw_controls(out) == [] and "run\\x1b]0;pwned\\x07\\nfake: 1 ok:" in out


@pytest.mark.timeout(120)
def test_a_real_process_writes_no_raw_control_byte_for_planted_names(hostile_run: Path):
    for argv in (["verify", str(hostile_run)], ["manifest", str(hostile_run)]):
        result = _python(*argv)
        assert result.returncode == 1, (argv, result.stderr)
        for stream in (result.stdout, result.stderr):
            assert not [b for b in stream if (b < 0x20 and b != 0x0A) or b == 0x7F], (argv, stream)
        assert b"FAILED" in result.stdout or b"refused" in result.stdout


@pytest.mark.parametrize("command", ["verify", "manifest", "inspect", "validate-data"])
def test_a_path_argument_holding_escape_sequences_is_escaped_on_stderr(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
):
    path = tmp_path / "\x1b]0;pwned\x07\x1b[2J\nfake line"
    assert main([command, str(path)]) == 2
    captured = capsys.readouterr()
    assert _raw_controls(captured.err) == [] and captured.err.count("\n") == 1, captured.err
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\nfake line" in captured.err


def test_an_unknown_argument_holding_escape_sequences_is_escaped_in_the_usage_error(
    good_run: Path, capsys: pytest.CaptureFixture[str]
):
    assert _status(["verify", str(good_run), "\x1b[2J\u202eexe.txt"]) == 2
    err = capsys.readouterr().err
    assert _raw_controls(err) == [] and "\\x1b[2J\\u202eexe.txt" in err


@pytest.mark.timeout(60)
def test_a_trainguard_error_naming_a_hostile_fifo_is_escaped_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = tmp_path / "\x1b[2Jpipe\n.jsonl"
    os.mkfifo(path)
    assert main(["validate-data", str(path)]) == 2
    err = capsys.readouterr().err
    assert _raw_controls(err) == [] and "\\x1b[2Jpipe\\n.jsonl" in err and "FIFO" in err
    assert main(["validate-data", str(path), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["where"]["file"] == str(path)  # exact


def test_validate_data_escapes_hostile_fields_and_lines_in_text_and_keeps_them_in_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = tmp_path / "d.jsonl"
    # A field named by an escape sequence (the report lists the fields it saw) and a broken line holding a raw ESC
    # (the report quotes it).
    record = '{"te\\u001b]0;pwned\\u0007xt": "a"}\n'
    path.write_text(record * 2 + "{oops\x1b[2J\n")
    assert main(["validate-data", str(path)]) == 1
    out = capsys.readouterr().out
    assert _raw_controls(out) == [] and "te\\x1b]0;pwned\\x07xt" in out and "{oops\\x1b[2J" in out
    assert main(["validate-data", str(path), "--json"]) == 1
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert any("te\x1b]0;pwned\x07xt" in e["message"] for e in errors)  # exact
    assert any(e["excerpt"] == "{oops\x1b[2J" for e in errors)


def test_inspect_escapes_crafted_crash_records_and_checkpoint_problems(
    hostile_run: Path, capsys: pytest.CaptureFixture[str]
):
    from trainguard.checks import crash_loop as cl

    forged = "\x1b]0;pwned\x07boom\nruns:        0 failed"
    records = [
        {"event": "start", "run_id": "r1", "step": 0, "utc": "2026-01-01T00:00:00Z", "host": "h", "pid": 1},
        {"event": "failure", "run_id": "r1", "step": 3, "exception": "RuntimeError", "message": forged, "rank": 0},
    ]
    (hostile_run / cl.CRASH_LOG).write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["inspect", str(hostile_run)]) == 0
    out = capsys.readouterr().out
    assert _raw_controls(out) == [] and "RuntimeError: \\x1b]0;pwned\\x07boom\\nruns:        0 failed" in out
    assert sum(line.startswith("runs:") for line in out.splitlines()) == 1  # no forged line
    assert "FAILED" in out  # the hostile checkpoint's status is still shown
    assert main(["inspect", str(hostile_run), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert runs[0]["failures"][0]["message"] == forged  # exact
