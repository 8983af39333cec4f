"""Rank facts and rank-consistent decisions, in one process and in a real 2-rank torchrun job (gloo, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainguard import distributed

from _rig import TESTS_DIR, free_port, run_python, run_torchrun, subprocess_env


def test_single_process_is_rank_zero_of_one_and_decisions_are_local(monkeypatch):
    for var in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "OMPI_COMM_WORLD_RANK",
        "PMI_RANK",
        "SLURM_PROCID",
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "SLURM_NTASKS",
    ):
        monkeypatch.delenv(var, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    assert distributed.is_main_process() and not distributed.is_distributed()
    assert distributed.any_rank(True) is True
    assert distributed.any_rank(False) is False
    assert distributed.broadcast_object("x") == "x"
    distributed.barrier()  # a no-op, not a hang


def test_launcher_environment_is_read_before_any_process_group_exists():
    # What accelerate launch / torchrun export to each worker; no process group is initialised here.
    code = (
        "import sys\n"
        "from trainguard import distributed as d\n"
        "print(d.rank(), d.world_size(), d.local_rank(), d.is_main_process(), 'torch' in sys.modules)\n"
    )
    result = run_python(code, env={"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert result.returncode == 0, result.stderr
    # and reading them never imported torch
    assert result.stdout.split() == ["3", "4", "1", "False", "False"]


def test_mpi_environment_is_understood_when_torchrun_variables_are_absent():
    code = "from trainguard import distributed as d; print(d.rank(), d.world_size(), d.local_rank())"
    result = run_python(
        code,
        env={"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2"},
    )
    assert result.stdout.split() == ["2", "8", "2"], result.stderr


def _accelerate_launch(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(launcher),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(script),
        *args,
    ]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_rank_job_every_rank_gets_the_same_decision(tmp_path: Path, launcher: str):
    script = TESTS_DIR / "scripts" / "dist_probe.py"
    if launcher == "torchrun":
        result = run_torchrun(script, str(tmp_path), nproc=2, timeout=180)
    else:
        # accelerate's multi-process launcher runs on CPU with gloo when no GPU is present
        result = _accelerate_launch(script, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    for r, doc in ranks.items():
        before, after = doc["before"], doc["after"]
        # the launcher's environment gives the right facts even before init_process_group
        assert (before["rank"], before["world_size"], before["local_rank"]) == (r, 2, r)
        assert after["rank"] == r and after["world_size"] == 2
        assert after["is_main"] is (r == 0)
        assert after["is_local_main"] is (r == 0)
        # only rank 1 raised the flag, yet both ranks decide the same
        assert after["any_only_rank1"] is True
        assert after["any_none"] is False
        assert after["all_only_rank0"] is False
        assert after["all_every"] is True
        assert after["broadcast"] == {"from": 1}
