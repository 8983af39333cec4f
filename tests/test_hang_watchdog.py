"""HangWatchdog: a stalled step is dumped (every thread, even with the GIL held), alerted, then acted on.

Each behaviour runs in a real child process (``tests/scripts/watchdog_train.py``: a real Trainer on the tiny Llama
whose step ``--stall-at`` stalls in ``sleep_in_step`` or ``regex_in_step``). Budgets are small (2 s) so the tests
are quick; assertions never depend on exact timings, only on what the dumps contain and how the process ended.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

import trainguard
from trainguard.checks.watchdog import HangReport, Watchdog, find_dumps

from _rig import REPO_ROOT, TESTS_DIR, run_python, run_torchrun

SCRIPT = TESTS_DIR / "scripts" / "watchdog_train.py"


def _child(output_dir: Path, *args: str, timeout: float = 240) -> Any:
    return run_python(str(SCRIPT), str(output_dir), *args, timeout=timeout)


def _result(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout[-3000:]
    return dict(json.loads(lines[-1][len("RESULT ") :]))


def _main_thread_stack(dump: str) -> str:
    """The main thread's section of a dump (Python format or faulthandler format)."""
    main_id = re.search(r"main thread \(runs the training loop\): Thread (0x[0-9a-f]+)", dump)
    assert main_id, dump[:2000]
    sections = re.split(r"\n(?=Thread 0x|Timeout \()", dump)
    mine = [s for s in sections if s.startswith(f"Thread {main_id.group(1)}")]
    assert mine, dump[:3000]
    return "\n".join(mine)


def _events(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / "trainguard-events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------------------ a step that sleeps
@pytest.fixture(scope="module")
def sleep_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    output_dir = tmp_path_factory.mktemp("sleep") / "run"
    proc = _child(output_dir, "--stall", "sleep", "--stall-at", "3", "--stall-seconds", "7", "--timeout", "2")
    return output_dir, proc


def test_a_step_sleeping_in_python_past_the_budget_is_dumped_to_a_file_and_the_log_naming_the_stalled_function(
    sleep_run: tuple[Path, Any],
):
    output_dir, proc = sleep_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    dumps = find_dumps(output_dir)
    assert dumps, proc.stderr[-3000:]
    first = dumps[0]
    assert re.fullmatch(r"trainguard-hang-rank0-\d{8}T\d{6}\.\d{3}Z\.txt", first.name)
    text = first.read_text()
    assert "in sleep_in_step" in _main_thread_stack(text)
    assert "on_step_begin" in _main_thread_stack(text)
    assert "in step 3" in text and "budget 2 s (explicit timeout)" in text
    # time.sleep releases the GIL: the Python monitor answers (the C timer is only the backup, later)
    assert "detected by: the watchdog thread (Python)" in text
    # the same stacks in the log (stderr), and a critical alert through the sinks naming the file
    assert "sleep_in_step" in proc.stderr and str(first) in proc.stderr
    critical = [e for e in _events(output_dir) if e["level"] == "critical"]
    assert critical and critical[0]["guard"] == "hang_watchdog" and critical[0]["step"] == 3
    assert critical[0]["evidence"]["file"] == str(first)
    assert not list(output_dir.glob("trainguard-hang-*-live.txt")), "the live file without a dump is ours to remove"


def test_the_default_action_keeps_the_run_alive_dumps_again_and_reports_when_progress_resumes(
    sleep_run: tuple[Path, Any],
):
    output_dir, proc = sleep_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _result(proc.stdout)
    assert result["global_step"] == 5  # the run went on and finished
    stalls = [r for r in result["reports"] if r["kind"] == "stall" and r["step"] == 2]
    assert len(stalls) >= 2 and {r["dump_index"] for r in stalls} >= {1, 2}
    naming = [p for p in find_dumps(output_dir) if "sleep_in_step" in p.read_text()]
    assert len(naming) >= 2
    recovered = [r for r in result["reports"] if r["kind"] == "recovered"]
    assert recovered and recovered[-1]["stalled_for_s"] >= 6
    # the cycle with the reported stall was not measured: it must not teach the learned budget a 7 s step
    stalled_steps = {r["step"] + 1 for r in result["reports"] if r["kind"] == "stall"}
    assert 3 in stalled_steps
    measured = len({2, 3, 4, 5} - stalled_steps)  # step 1 is the first step: never measured
    assert f"{measured} step(s) measured" in result["summary"], result["summary"]
    assert f"; {len(stalls)} stall dump(s): trainguard-hang-rank0-" in result["summary"], result["summary"]


# ---------------------------------------------------------------------- a step stuck in C holding the GIL
def test_a_step_stuck_in_c_code_holding_the_gil_is_dumped_by_the_c_timer_naming_the_stalled_function(tmp_path: Path):
    output_dir = tmp_path / "run"
    proc = _child(output_dir, "--stall", "regex", "--stall-at", "3", "--regex-seconds", "9", "--timeout", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _result(proc.stdout)
    # the regex really held the GIL: no Python thread (the ticker, the watchdog's monitor) ran for seconds
    assert result["max_python_gap_s"] >= 4.5, result
    c_dumps = [p for p in find_dumps(output_dir) if "faulthandler's C-level timer" in p.read_text()]
    assert c_dumps, [p.read_text()[:500] for p in find_dumps(output_dir)]
    text = c_dumps[0].read_text()
    main = _main_thread_stack(text)
    assert "in regex_in_step" in main and "in on_step_begin" in main
    # written while the main thread was still inside the regex, not after it
    stamp = re.search(r"-(\d{8}T\d{6}\.\d{3})Z\.txt$", c_dumps[0].name)
    assert stamp
    from datetime import datetime, timezone

    fired = datetime.strptime(stamp.group(1), "%Y%m%dT%H%M%S.%f").replace(tzinfo=timezone.utc).timestamp()
    assert result["wall_start"] < fired < result["wall_end"]
    assert "regex_in_step" in proc.stderr  # logged once Python could run again
    assert any(e["level"] == "critical" and e["evidence"]["file"] == str(c_dumps[0]) for e in _events(output_dir))


# -------------------------------------------------------------------------------------------- abort
def test_abort_ends_the_process_with_a_non_zero_code_after_dumping_and_alerting(tmp_path: Path):
    output_dir = tmp_path / "run"
    proc = _child(
        output_dir, "--stall", "sleep", "--stall-seconds", "120", "--action", "abort", "--timeout", "2", timeout=100
    )
    assert proc.returncode == 124, proc.stderr[-3000:]
    assert "RESULT" not in proc.stdout
    dumps = find_dumps(output_dir)
    assert len(dumps) == 1 and "in sleep_in_step" in _main_thread_stack(dumps[0].read_text())
    assert any(e["level"] == "critical" for e in _events(output_dir))
    assert "exit status 124" in proc.stderr
    assert not list(output_dir.glob("trainguard-hang-*-live.txt"))


def test_abort_while_the_gil_is_held_exits_via_the_c_timer_and_the_next_start_reports_its_dump(tmp_path: Path):
    output_dir = tmp_path / "run"
    proc = _child(
        output_dir, "--stall", "regex", "--regex-seconds", "40", "--action", "abort", "--timeout", "2", timeout=100
    )
    # faulthandler's exit=True: status 1, long before the 40 s regex could end; Python never ran again
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert find_dumps(output_dir) == []
    # Python never ran again, yet the stacks are in a file a user sees and announced on stderr: both written
    # without this process's GIL (faulthandler's timer into a pipe, a helper process copying to both)
    live = list(output_dir.glob("trainguard-hang-rank0-pid*-live.txt"))
    assert len(live) == 1 and "regex_in_step" in live[0].read_text()
    announced = proc.stderr.split("trainguard hang watchdog: rank 0 (pid", 1)
    assert len(announced) == 2 and str(live[0]) in announced[1] and "regex_in_step" in announced[1]
    # the restarted run (same output_dir and rank) turns it into a dump file and reports it
    code = (
        "import json, sys\n"
        "from trainguard.checks.watchdog import Watchdog\n"
        "seen = []\n"
        f"wd = Watchdog(60, output_dir={str(output_dir)!r}, rank=0, on_report=seen.append)\n"
        "wd.start(); wd.stop()\n"
        "print('RESULT ' + json.dumps([r.evidence() for r in seen]))\n"
    )
    again = run_python(code, timeout=60)
    assert again.returncode == 0, again.stderr[-3000:]
    found = json.loads(again.stdout.split("RESULT ", 1)[1])
    assert [r["kind"] for r in found] == ["earlier"]
    dumps = find_dumps(output_dir)
    assert len(dumps) == 1 and "regex_in_step" in dumps[0].read_text() and found[0]["file"] == str(dumps[0])
    assert not list(output_dir.glob("trainguard-hang-*-live.txt"))
    assert "regex_in_step" in again.stderr  # now in the log too


# -------------------------------------------------------------------------------- no false alarm
def test_a_normal_run_with_slow_evaluation_and_slow_saves_is_never_dumped(tmp_path: Path):
    output_dir = tmp_path / "run"
    # The save and compute_metrics each take longer than the step budget (no Trainer event fires inside them),
    # evaluation batches are slow too: only the phase budgets keep this quiet.
    proc = _child(
        output_dir,
        # a save alone after step 2, an evaluation alone after step 3, both after step 4
        "--max-steps",
        "4",
        "--eval-steps",
        "3",
        "--save-steps",
        "2",
        "--timeout",
        "3",
        "--eval-timeout",
        "12",
        "--save-timeout",
        "12",
        "--slow-save",
        "4.5",
        "--slow-metrics",
        "4.5",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _result(proc.stdout)
    assert result["global_step"] == 4
    assert result["reports"] == [], result["reports"]
    assert find_dumps(output_dir) == [] and not list(output_dir.glob("trainguard-hang-*-live.txt"))
    assert (output_dir / "checkpoint-2").is_dir() and (output_dir / "checkpoint-4").is_dir()
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    evals = [entry["step"] for entry in state["log_history"] if "eval_probe" in entry]
    assert 3 in evals  # compute_metrics really ran, after a step with no save


# ---------------------------------------------------------------------------------------- 2 ranks
@pytest.mark.distributed
def test_when_rank_1_hangs_both_ranks_are_dumped_and_the_job_ends_for_a_restart(tmp_path: Path):
    output_dir = tmp_path / "run"
    proc = run_torchrun(
        SCRIPT,
        str(output_dir),
        "--stall",
        "sleep",
        "--stall-rank",
        "1",
        "--stall-seconds",
        "200",
        "--action",
        "abort",
        "--timeout",
        "2",
        "--max-steps",
        "8",
        timeout=180,
    )
    assert proc.returncode != 0, proc.stderr[-3000:]
    rank0, rank1 = find_dumps(output_dir, rank=0), find_dumps(output_dir, rank=1)
    assert rank0 and rank1, (sorted(p.name for p in output_dir.iterdir()), proc.stderr[-3000:])
    stalled = _main_thread_stack(rank1[0].read_text())
    assert "in sleep_in_step" in stalled
    waiting = _main_thread_stack(rank0[0].read_text())
    # rank 0 is not in the stalled function: it waits for rank 1 inside DDP / torch.distributed
    assert "sleep_in_step" not in waiting and "torch/nn/parallel/distributed.py" in waiting
    assert "rank 0 of 2" in rank0[0].read_text() and "rank 1 of 2" in rank1[0].read_text()
    assert "exitcode  : 124" in proc.stderr


# ----------------------------------------------------------------------------------- budgets, options
def test_the_learned_budget_is_the_floor_until_warm_up_then_ten_times_the_slowest_step_never_below_the_floor():
    wd = Watchdog(floor=300, multiplier=10, warmup_steps=5)
    assert wd.step_budget()[0] == 300
    for seconds in (1.0, 2.0, 50.0, 3.0):
        wd.observe_step(seconds)
    assert wd.step_budget() == (300, "floor: learning, 4/5 step(s) measured")
    wd.observe_step(4.0)
    budget, rule = wd.step_budget()
    assert budget == 500 and rule.startswith("learned: 10 x slowest step 50")
    fast = Watchdog(floor=300, warmup_steps=2)
    fast.observe_step(0.1)
    fast.observe_step(0.2)
    assert fast.step_budget()[0] == 300  # 10 x 0.2 s is below the floor


def test_each_phase_has_its_own_budget_never_below_the_step_budget_unless_set_explicitly():
    wd = Watchdog(timeout=60)
    assert wd.budget("step")[0] == 60
    assert wd.budget("first_step")[0] == 1800 and wd.budget("eval")[0] == 1800
    assert wd.budget("save")[0] == 1800 and wd.budget("finalize")[0] == 1800
    assert wd.budget("resume")[0] == 3600
    big = Watchdog(timeout=5000)
    assert big.budget("save") == (5000, "save budget = step budget (explicit timeout)")
    explicit = Watchdog(timeout=60, eval_timeout=5, save_timeout=7, first_step_timeout=9, resume_timeout=11)
    assert [explicit.budget(p)[0] for p in ("eval", "save", "first_step", "resume")] == [5, 7, 9, 11]


def test_the_first_step_and_the_time_of_a_save_do_not_feed_the_learned_budget():
    wd = Watchdog(warmup_steps=1, floor=1, multiplier=2)
    time.sleep(0.3)  # compilation, warm-up: the first step (phase first_step) is never measured
    wd.step_end(1)
    assert wd.steps_measured == 0
    wd.enter("step")
    wd.step_end(2)
    wd.enter("save")
    time.sleep(0.3)  # a save after step 2: not a step's time
    wd.enter("step")
    wd.step_end(3)
    assert wd.steps_measured == 2 and wd.slowest_step < 0.3


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": "10"}, "timeout"),
        ({"action": "kill"}, "action"),
        ({"floor": -1}, "floor"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"exit_code": 0}, "exit_code"),
        ({"eval_timeout": float("nan")}, "eval_timeout"),
    ],
)
def test_bad_options_are_refused_at_construction_naming_the_option(kwargs: dict[str, Any], needle: str):
    with pytest.raises(ValueError, match=needle):
        trainguard.HangWatchdog(**kwargs)


def test_all_guards_includes_the_watchdog_last_so_it_sees_the_final_save_and_eval_flags():
    from transformers import TrainerCallback

    guards = trainguard.all_guards()
    at = next(i for i, g in enumerate(guards) if isinstance(g, trainguard.HangWatchdog))
    # Only guards without step events (RunReporter: train begin and end) may follow it.
    assert all(type(g).on_step_end is TrainerCallback.on_step_end for g in guards[at + 1 :])
    assert guards[at].watchdog.action == "dump"  # the default never kills a run on a false alarm
    assert not any(isinstance(g, trainguard.HangWatchdog) for g in trainguard.all_guards(hang_watchdog=False))


def test_a_report_is_a_hang_error_naming_file_step_rank_and_phase():
    report = HangReport(
        kind="stall",
        rank=1,
        phase="save",
        step=50,
        budget=1800,
        budget_rule="save_timeout default 1800 s",
        stalled_for=1801.0,
        action="dump",
        detected_by="the watchdog thread (Python)",
        file=Path("out/trainguard-hang-rank1-20260807T120305.123Z.txt"),
    )
    err = report.error()
    assert isinstance(err, trainguard.HangError)
    assert err.where == {"file": str(report.file), "step": 50, "rank": 1, "phase": "save"}
    assert "the save of checkpoint-50" in str(err) and "compare the dumps of every rank" in str(err)


@pytest.mark.skipif(shutil.which("py-spy") is None, reason="py-spy is not installed (pip install py-spy)")
def test_with_py_spy_installed_the_dump_also_holds_native_stacks(tmp_path: Path):
    output_dir = tmp_path / "run"
    proc = _child(output_dir, "--stall", "sleep", "--stall-seconds", "60", "--action", "abort", "--timeout", "2")
    assert proc.returncode == 124, proc.stderr[-3000:]
    text = find_dumps(output_dir)[0].read_text()
    native = text.split("== Native stacks (py-spy dump --native) ==", 1)[1]
    if "py-spy needs ptrace permission" in native:
        pytest.skip(f"py-spy may not attach here (no ptrace permission): {native.strip()[:300]}")
    assert "sleep_in_step" in native and "libc" in native  # Python and native frames of the stalled thread


# ------------------------------------------------------------------------------------------ example
def test_the_example_dumps_a_stalled_step_and_finishes(tmp_path: Path):
    result = run_python(str(REPO_ROOT / "examples" / "hang_watchdog.py"), str(tmp_path / "run"), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stalled_data_loader" in result.stdout
    assert "dump file(s)" in result.stdout
