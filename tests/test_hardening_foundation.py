"""The file policy every guard stands on (``trainguard.safe_fs``), and the places the foundation itself writes:
planted links and special files are refused without blocking and without writing through them; crafted JSON is a
MalformedFileError naming the file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import trainguard
from trainguard import MalformedFileError, UnsafeFileError
from trainguard.atomic import append_line, atomic_write_text, read_jsonl
from trainguard.checks.watchdog import Watchdog
from trainguard.checks.watchdog.pending import claim_earlier_dumps
from trainguard.safe_fs import display_name, ensure_dir, load_json, open_read, parse_json, read_bytes

from _rig import make_trainer, mounted_tmpfs

pytestmark = pytest.mark.timeout(60)  # every "does not block" below fails instead of hanging


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """Someone else's file, outside the folder trainguard works in."""
    other = tmp_path / "someone-else"
    other.mkdir()
    path = other / "notes.txt"
    path.write_text("keep me\n")
    return path


def test_fifo_is_refused_for_reading_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "trainguard-events.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeFileError, match="FIFO") as info:
        open_read(fifo)
    assert info.value.where["file"] == str(fifo)
    with pytest.raises(UnsafeFileError):
        read_jsonl(fifo)


def test_fifo_with_a_reader_is_refused_for_appending(tmp_path: Path) -> None:
    fifo = tmp_path / "trainguard-events.jsonl"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # someone listening: the open alone would succeed
    try:
        with pytest.raises(UnsafeFileError, match="FIFO"):
            append_line(fifo, "{}")
    finally:
        os.close(reader)


def test_append_through_a_planted_link_is_refused_and_the_target_untouched(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "trainguard-events.jsonl"
    link.symlink_to(victim)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        append_line(link, '{"alert": 1}')
    assert victim.read_text() == "keep me\n"


def test_whole_file_write_replaces_a_planted_link_instead_of_writing_through_it(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "state.json"
    link.symlink_to(victim)
    os.chmod(victim, 0o640)
    atomic_write_text(link, "ours\n")
    assert victim.read_text() == "keep me\n"
    assert not link.is_symlink() and link.read_text() == "ours\n"
    umask = os.umask(0)
    os.umask(umask)
    assert link.stat().st_mode & 0o777 == 0o666 & ~umask  # the mode of the link's target is not copied


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"offsets": [0, Infinity]}', "Infinity"),
        ('{"offsets": [0, 1e999]}', "out of range"),
        ('{"x": NaN}', "NaN"),
        ("[" * 100_000 + "]" * 100_000, "deeper"),
        ("[" * 70 + "]" * 70, "deeper than 64"),
        ('{"a": 1', "not valid JSON"),
        ("1" * 5000, "not valid JSON"),  # an integer longer than Python converts
    ],
)
def test_crafted_json_is_a_malformed_file_error_naming_the_file(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "trainer_state.json"
    path.write_text(text)
    with pytest.raises(MalformedFileError, match=reason) as info:
        load_json(path)
    assert info.value.where["file"] == str(path)


def test_json_error_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(MalformedFileError) as info:
        parse_json('{\n"a": 1,\n"b": }', source="config.json")
    assert info.value.where["line"] == 3


def test_reads_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    path.write_bytes(b" " * 2048)
    with pytest.raises(MalformedFileError, match="larger than the 1,024 bytes"):
        read_bytes(path, limit=1024)


def test_event_log_reads_only_its_tail(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with open(path, "w") as fh:
        for i in range(2000):
            fh.write(f'{{"i": {i}}}\n')
    records = read_jsonl(path, limit=1000)
    assert records and records[-1] == {"i": 1999} and records[0]["i"] > 1900


def test_a_folder_planted_as_a_link_out_of_output_dir_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "trainguard-archive").symlink_to(elsewhere)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        ensure_dir(out / "trainguard-archive", inside=out)
    assert ensure_dir(out / "trainguard-quarantine", inside=out).is_dir()


def test_names_that_are_not_utf8_are_shown_escaped(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/model-\xff.safetensors"
    name = os.fsdecode(raw)
    shown = display_name(name)
    assert shown.endswith("model-\\xff.safetensors")
    shown.encode("utf-8")  # printable and JSON-able


def test_watchdog_live_file_never_truncates_a_planted_links_target(tmp_path: Path, victim: Path) -> None:
    # The live file's name is predictable: plant a link there before the watchdog starts.
    out = tmp_path / "out"
    out.mkdir()
    (out / f"trainguard-hang-rank0-pid{os.getpid()}-live.txt").symlink_to(victim)
    wd = Watchdog(60, output_dir=out, rank=0)
    wd.start()
    try:
        assert victim.read_text() == "keep me\n"
    finally:
        wd.stop()
    assert victim.read_text() == "keep me\n"


def test_watchdog_start_does_not_block_on_a_fifo_left_under_a_live_file_name(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "trainguard-hang-rank0-pid999999-live.txt")  # a dead PID: a leftover it would claim
    assert list(claim_earlier_dumps(out, 0)) == []
    assert (out / "trainguard-hang-rank0-pid999999-live.txt").exists()  # not ours to remove


def test_a_file_under_a_live_file_name_without_the_watchdogs_header_is_neither_removed_nor_renamed(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    planted = out / "trainguard-hang-rank0-pid999999-live.txt"  # a dead PID: a leftover it would claim
    planted.write_text("notes someone keeps here\n")
    assert list(claim_earlier_dumps(out, 0)) == []
    assert planted.read_text() == "notes someone keeps here\n"  # the name alone is no reason to delete it
    assert sorted(p.name for p in out.iterdir()) == [planted.name]


@pytest.mark.parametrize(
    "content", ["[" * 5000 + "]" * 5000, '{"global_step": 1e999}', '{"global_step": "x"}', "[1]", "\xff"]
)
def test_preflight_reads_a_crafted_trainer_state_as_step_zero(tmp_path: Path, content: str) -> None:
    from trainguard.checks.preflight.plan import checkpoint_global_step

    ckpt = tmp_path / "checkpoint-10"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(content)
    assert checkpoint_global_step(ckpt) == 0  # the safe side: plan for the whole run; CheckpointVerifier reports it
    os.unlink(ckpt / "trainer_state.json")
    os.mkfifo(ckpt / "trainer_state.json")
    assert checkpoint_global_step(ckpt) == 0


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ".txt"])
def test_validate_data_reports_a_fifo_of_every_format_without_blocking(tmp_path: Path, suffix: str) -> None:
    from trainguard.checks.data import validate_data

    fifo = tmp_path / f"train{suffix}"
    os.mkfifo(fifo)
    report = validate_data(fifo)
    assert not report.ok
    assert any("FIFO" in issue.message for issue in report.issues)


def test_a_read_only_output_dir_is_refused_at_trainer_init_naming_it() -> None:
    with mounted_tmpfs("3m") as folder:
        done = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only here ({done.stderr.strip()})")
        with pytest.raises(trainguard.PreflightError, match="is not writable") as info:
            make_trainer(folder, callbacks=trainguard.all_guards(), max_steps=2)
        assert info.value.where["file"].startswith(str(folder))
        assert "Read-only file system" in info.value.what
