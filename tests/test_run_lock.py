"""RunLock: one live run per output_dir, refused at once naming the holder; never a stale lock."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import trainguard
from trainguard.callbacks import GuardCallback
from trainguard.checks import crash_loop
from trainguard.checks import run_lock as rl

from _rig import TESTS_DIR, make_trainer, run_trainer, subprocess_env

HOLDER = (
    "import sys, time\n"
    "from trainguard.checks.run_lock import acquire_run_lock\n"
    "acquire_run_lock(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)

# Takes the lock, forks a child that outlives it (like a DataLoader worker), then waits to be killed.
FORKING_HOLDER = (
    "import os, sys, time\n"
    "from trainguard.checks.run_lock import acquire_run_lock\n"
    "acquire_run_lock(sys.argv[1])\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    time.sleep(120); os._exit(0)\n"
    "print(pid, flush=True)\n"
    "time.sleep(600)\n"
)


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=subprocess_env(), stdout=subprocess.PIPE, text=True
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture
def holder(output_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """Another live process holding the run lock on output_dir."""
    proc = _spawn(HOLDER, str(output_dir))
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        _stop(proc)


class _CountSteps(GuardCallback):
    guard_name = "count_steps"

    def __init__(self) -> None:
        super().__init__(alert_sinks=[])
        self.steps = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.steps += 1
        return control


def test_second_run_is_refused_at_once_naming_the_holders_pid_host_start_and_command(output_dir: Path, holder: Any):
    with pytest.raises(trainguard.RunLockedError) as info:
        rl.acquire_run_lock(output_dir)
    err = info.value
    assert err.where["pid"] == holder.pid
    assert f"PID {holder.pid}" in str(err)
    assert err.where["host"] == os.uname().nodename
    assert err.where["file"].endswith(".trainguard.lock")
    assert "started 20" in err.what and "Z, command" in err.what and "UTC" not in err.what
    assert "command: python" in err.what and "-c" in err.what


def test_real_trainer_with_runlock_is_refused_before_the_first_step_and_writes_nothing(output_dir: Path, holder: Any):
    before = sorted(p.name for p in output_dir.iterdir())
    counter = _CountSteps()
    with pytest.raises(trainguard.RunLockedError, match=f"PID {holder.pid}"):
        make_trainer(output_dir, callbacks=[trainguard.RunLock(), counter], max_steps=2)
    assert counter.steps == 0
    # the refused run wrote nothing into the folder another run owns (no events file, no record change)
    assert sorted(p.name for p in output_dir.iterdir()) == before


def test_after_sigkill_of_a_training_holder_the_next_run_starts_without_manual_steps(output_dir: Path):
    progress = output_dir.parent / "progress"
    child = subprocess.Popen(
        [
            sys.executable,
            str(TESTS_DIR / "scripts" / "guarded_train.py"),
            str(output_dir),
            "--max-steps",
            "100000",
            "--progress",
            str(progress),
        ],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (progress.exists() and progress.read_text().strip()):
            assert child.poll() is None, "the training child died before its first step"
            assert time.monotonic() < deadline, "the training child made no step"
            time.sleep(0.2)
        with pytest.raises(trainguard.RunLockedError, match=f"PID {child.pid}"):
            rl.acquire_run_lock(output_dir)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=60)
    # No cleanup of any kind: the kernel released the lock with the process.
    lock = trainguard.RunLock()
    _trainer, output = run_trainer(output_dir, callbacks=[lock, trainguard.CrashLoopGuard()], max_steps=2)
    assert output.global_step == 2
    assert lock.handle is not None and lock.handle.held
    # ...and the killed run is on record as an abnormal end of unknown type, the new one as clean.
    assert [r.outcome for r in crash_loop.load_runs(output_dir)] == ["unknown", "clean"]
    lock.release()


def test_one_process_may_lock_twice_and_holds_the_lock_until_the_last_release(output_dir: Path):
    first, second = trainguard.RunLock(), trainguard.RunLock()
    run_trainer(output_dir, callbacks=[first], max_steps=1)
    run_trainer(output_dir, callbacks=[second], max_steps=1)  # a second Trainer in the same notebook: fine
    assert first.handle is second.handle
    first.release()
    assert rl.lock_status(output_dir)["held"] is True
    probe = subprocess.run(
        [sys.executable, "-c", HOLDER.replace("time.sleep(600)", ""), str(output_dir)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode != 0 and f"PID {os.getpid()}" in probe.stderr
    second.release()
    assert rl.lock_status(output_dir)["held"] is False
    probe = subprocess.run(
        [sys.executable, "-c", HOLDER.replace("time.sleep(600)", ""), str(output_dir)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "locked"


def test_a_forked_child_that_outlives_the_killed_holder_does_not_keep_the_lock(output_dir: Path):
    proc = _spawn(FORKING_HOLDER, str(output_dir))
    grandchild = 0
    try:
        assert proc.stdout is not None
        grandchild = int(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        os.kill(grandchild, 0)  # still alive, still sharing the parent's open file
        handle = rl.acquire_run_lock(output_dir)
        assert handle.held
        handle.release()
    finally:
        _stop(proc)
        if grandchild:
            with contextlib.suppress(ProcessLookupError):
                os.kill(grandchild, signal.SIGKILL)


def test_lock_file_keeps_its_inode_and_the_holder_record_is_complete(output_dir: Path):
    with rl.acquire_run_lock(output_dir) as handle:
        inode = handle.lock_file.stat().st_ino
        record = rl.read_holder(handle.info_file)
        assert record is not None
        assert record["pid"] == os.getpid()
        assert record["host"] == os.uname().nodename
        assert record["started_utc"].endswith("Z")
        assert sys.argv[0].rsplit("/", 1)[-1] in record["command"]
    released = rl.read_holder(output_dir / rl.INFO_NAME)
    assert released is not None and "released_utc" in released
    with rl.acquire_run_lock(output_dir) as again:
        # never replaced by a rename: a new inode would let a second holder lock a different file
        assert again.lock_file.stat().st_ino == inode


@pytest.mark.parametrize(
    ("fstype", "options", "reach"),
    [
        ("ext4", "rw,relatime", "ok"),
        ("nfs4", "rw,vers=4.2,hard", "ok"),
        ("nfs4", "rw,vers=4.1,local_lock=flock", "node-local"),
        ("nfs", "rw,vers=3,nolock", "node-local"),
        ("nfs", "rw,vers=3", "uncertain"),
        ("lustre", "rw,flock", "ok"),
        ("lustre", "rw,localflock", "node-local"),
        ("lustre", "rw", "uncertain"),
        ("fuse.gcsfuse", "rw", "uncertain"),
    ],
)
def test_network_filesystems_are_classified_by_how_far_flock_reaches(fstype: str, options: str, reach: str):
    got, note = rl.lock_filesystem_note(rl.FilesystemInfo(fstype, "/mnt/x", tuple(options.split(","))))
    assert got == reach
    assert note


def test_the_real_filesystem_of_output_dir_is_read_from_proc_mounts(output_dir: Path):
    info = rl.filesystem_info(output_dir)  # output_dir does not exist yet: its nearest existing parent counts
    if not Path("/proc/mounts").exists():
        pytest.skip("no /proc/mounts on this system")
    assert info.fstype != "unknown" and info.mountpoint


def test_a_filesystem_that_refuses_flock_warns_by_default_and_refuses_when_asked(output_dir: Path, monkeypatch):
    # Lustre without -o flock answers flock() with ENOSYS; no such mount exists here, so the kernel answer is
    # stood in for at the one call that would return it.
    def refuse(fd: int, op: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(rl.fcntl, "flock", refuse)
    handle = rl.acquire_run_lock(output_dir)
    assert not handle.enforced and not handle.held and "ENOSYS" in handle.note
    with pytest.raises(trainguard.PreflightError) as info:
        rl.acquire_run_lock(output_dir, on_unsupported="error")
    assert info.value.where["file"].endswith(".trainguard.lock")
    guard = trainguard.RunLock()
    run_trainer(output_dir, callbacks=[guard], max_steps=1)  # runs, unprotected, and says so
    assert "NOT locked" in guard.summary()
    assert any("ENOSYS" in a.message for a in guard.alerter.history)
    with pytest.raises(ValueError, match="on_unsupported"):
        trainguard.RunLock(on_unsupported="ignore")


def test_release_at_train_end_frees_the_folder_when_train_returns_and_retakes_it_for_the_next_train(output_dir: Path):
    lock = trainguard.RunLock(release_at_train_end=True)
    trainer, _ = run_trainer(output_dir, callbacks=[lock], max_steps=1)
    assert rl.lock_status(output_dir)["held"] is False
    trainer.train()  # the same Trainer again: locked for the run, released after it
    assert rl.lock_status(output_dir)["held"] is False and lock.handle is None
    default = trainguard.RunLock()
    run_trainer(output_dir, callbacks=[default], max_steps=1)
    assert rl.lock_status(output_dir)["held"] is True  # the default keeps it for the process's life
    default.release()
