"""Disk and RAM pre-flight: check_disk_space, check_memory, the checkpoint-size estimate and PreflightGuard, on real
filesystems (a real tmpfs that really fills up) and real Trainer runs."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

import trainguard
from trainguard import PreflightError, PreflightGuard, check_disk_space, check_memory
from trainguard.checks.preflight import (
    directory_size,
    estimate_checkpoint_size,
    format_bytes,
    gpu_memory_summary,
    optimizer_state_bytes,
    param_stats,
    planned_checkpoints,
)

from _rig import TESTS_DIR, make_tiny_llama, make_trainer, mounted_tmpfs, run_torchrun, run_trainer

KIB = 1024


def _checkpoint_dirs(output_dir: Path) -> list[str]:
    if not output_dir.is_dir():
        return []
    return sorted((p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint-")), key=lambda n: int(n[11:]))


# --------------------------------------------------------------------------------------------- check_disk_space
def test_check_disk_space_refuses_naming_path_needed_and_free(tmpfs: Path):
    free = shutil.disk_usage(tmpfs).free
    with pytest.raises(PreflightError) as info:
        check_disk_space(tmpfs / "run", required_bytes=4 * 2**20, margin=0.1, margin_bytes=0, purpose="3 checkpoints")
    err = info.value
    assert "3 checkpoints" in err.what
    assert "4.4 MiB" in err.what  # 4 MiB + 10 %
    assert format_bytes(free) in err.what
    assert err.where["file"] == str(tmpfs / "run")
    assert err.evidence["free_bytes"] == free
    assert err.evidence["needed_bytes"] == 4 * 2**20 + 419431
    assert "Free at least" in err.next_step


def test_check_disk_space_measures_the_nearest_existing_parent_of_a_new_path(tmpfs: Path):
    result = check_disk_space(tmpfs / "not" / "yet" / "there", required_bytes=1 * 2**20, margin=0.1, margin_bytes=0)
    assert result.ok
    assert result.checked_path == str(tmpfs)
    assert result.total_bytes == 3 * 2**20
    assert not (tmpfs / "not").exists()  # measuring creates nothing


def test_check_disk_space_margin_is_the_larger_of_fraction_and_fixed_minimum(tmp_path: Path):
    assert check_disk_space(tmp_path, 1000, margin=0.1, margin_bytes=0).needed_bytes == 1100
    assert check_disk_space(tmp_path, 1000, margin=0.1, margin_bytes=5000).needed_bytes == 6000
    with pytest.raises(ValueError, match="negative"):
        check_disk_space(tmp_path, -1)


# ------------------------------------------------------------------------------------------------ check_memory
def test_check_memory_refuses_below_the_threshold_and_names_both():
    with pytest.raises(PreflightError) as info:
        check_memory(min_available_fraction=None, min_available_bytes=2**60)
    err = info.value
    assert "not enough free RAM" in err.what and "needs at least 1024.0 PiB" not in err.what
    assert err.evidence["min_available_bytes"] == 2**60
    assert err.evidence["available_bytes"] > 0
    status = check_memory(min_available_fraction=0.0)
    assert status.ok and 0 < status.available_fraction <= 1


def test_check_memory_rejects_a_fraction_outside_zero_to_one():
    with pytest.raises(ValueError, match="within"):
        check_memory(min_available_fraction=15)


def test_gpu_summary_is_skipped_without_cuda_and_the_guard_says_so(caplog: pytest.LogCaptureFixture, output_dir: Path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the skip message is for CPU-only machines")
    assert gpu_memory_summary() == []
    with caplog.at_level(logging.INFO, logger="trainguard"):
        run_trainer(output_dir, callbacks=[PreflightGuard()], max_steps=1)
    assert "no CUDA device visible, GPU memory summary skipped" in caplog.text
    assert "RAM:" in caplog.text


# --------------------------------------------------------------------------------------------------- estimate
def test_checkpoint_estimate_is_close_to_real_checkpoints_and_errs_on_the_large_side(output_dir: Path):
    model = make_tiny_llama()
    estimate = estimate_checkpoint_size(param_stats(model), optim="adamw_torch", log_entries=4)
    run_trainer(output_dir, model=model, max_steps=2, save_strategy="steps", save_steps=2)
    real = directory_size(output_dir / "checkpoint-2")
    assert real <= estimate.total_bytes <= real * 1.25, (real, estimate.to_dict())
    assert estimate.weights_bytes >= (output_dir / "checkpoint-2" / "model.safetensors").stat().st_size * 0.99
    assert estimate.optimizer_bytes >= (output_dir / "checkpoint-2" / "optimizer.pt").stat().st_size * 0.99


def test_peft_checkpoint_estimate_counts_only_the_adapter(output_dir: Path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        make_tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    stats = param_stats(model)
    assert stats.adapter_only and stats.saved_bytes == stats.trainable_bytes < stats.total_params * 4 / 10
    estimate = estimate_checkpoint_size(stats)
    run_trainer(output_dir, model=model, max_steps=2, save_strategy="steps", save_steps=2)
    real = directory_size(output_dir / "checkpoint-2")
    assert real <= estimate.total_bytes <= real * 1.5, (real, estimate.to_dict())


def test_optimizer_state_sizes_follow_the_optimizer():
    assert optimizer_state_bytes("adamw_torch", 4000, 1000) == 8000  # two fp32 states
    assert optimizer_state_bytes("adamw_torch_fused", 2000, 1000) == 4000  # bf16 params: bf16 states
    assert optimizer_state_bytes("adamw_bnb_8bit", 4000, 1000) == 2000
    assert optimizer_state_bytes("adafactor", 4000, 1000) == 0
    assert optimizer_state_bytes("sgd", 4000, 1000) == 4000
    assert optimizer_state_bytes("something_new", 4000, 1000) == 8000  # unknown: AdamW-sized, the safe side
    assert estimate_checkpoint_size(param_stats(make_tiny_llama()), save_only_model=True).optimizer_bytes == 0


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"save_strategy": "steps", "save_steps": 2, "max_steps": 20}, 10),
        ({"save_strategy": "steps", "save_steps": 3, "max_steps": 10}, 4),  # 3, 6, 9 and the final step
        ({"save_strategy": "steps", "save_steps": 2, "max_steps": 20, "save_total_limit": 2}, 3),  # rotation after
        (
            {
                "save_strategy": "steps",
                "save_steps": 2,
                "max_steps": 20,
                "save_total_limit": 1,
                "load_best_model_at_end": True,
            },
            3,
        ),  # best + newest kept, + the one being written
        ({"save_strategy": "steps", "save_steps": 2, "max_steps": 4, "save_total_limit": 5}, 2),
        ({"save_strategy": "steps", "save_steps": 2, "max_steps": 20, "start_step": 10}, 5),  # resumed at 10
        (
            {
                "save_strategy": "steps",
                "save_steps": 2,
                "max_steps": 20,
                "save_total_limit": 3,
                "existing_checkpoints": 3,
                "start_step": 10,
            },
            1,
        ),
        ({"save_strategy": "steps", "save_steps": 0.25, "max_steps": 20}, 4),  # a fraction of max_steps
        ({"save_strategy": "epoch", "max_steps": 30, "num_epochs": 3}, 3),
        ({"save_strategy": "no", "max_steps": 30}, 0),
        ({"save_strategy": "best", "max_steps": 20, "eval_strategy": "steps", "eval_steps": 5}, 4),
    ],
)
def test_planned_checkpoints_counts_what_is_on_disk_at_the_peak(kwargs: dict[str, Any], expected: int):
    assert planned_checkpoints(**kwargs) == expected


# ----------------------------------------------------------------------------------------- PreflightGuard: start
def test_run_whose_checkpoints_cannot_fit_is_refused_before_step_1_with_sizes(tmpfs: Path):
    output_dir = tmpfs / "run"
    guard = PreflightGuard(disk_margin_bytes=64 * KIB)
    # 10 full checkpoints (weights + 2x weights of AdamW state, ~400 KiB each) on a 3 MiB disk
    trainer = make_trainer(output_dir, callbacks=[guard], max_steps=20, save_strategy="steps", save_steps=2)
    with pytest.raises(PreflightError) as info:
        trainer.train()
    err = info.value
    assert trainer.state.global_step == 0  # not one step trained
    assert _checkpoint_dirs(output_dir) == []
    assert "refused before step 1" in err.what
    assert "10 checkpoint(s)" in err.what and "optimizer state" in err.what
    assert "MiB" in err.what and "free" in err.what
    assert err.evidence["needed_bytes"] > err.evidence["free_bytes"] >= shutil.disk_usage(tmpfs).free  # alert written
    assert err.evidence["checkpoints"] == 10
    assert "save_total_limit" in err.next_step
    assert err.where["step"] == 0 and err.where["field"] == "save_total_limit"


def test_run_that_fits_starts_and_finishes_on_the_same_small_disk(tmpfs: Path):
    output_dir = tmpfs / "run"
    guard = PreflightGuard(disk_margin_bytes=64 * KIB)
    _, output = run_trainer(
        output_dir, callbacks=[guard], max_steps=20, save_strategy="steps", save_steps=2, save_total_limit=2
    )
    assert output.global_step == 20
    assert _checkpoint_dirs(output_dir) == ["checkpoint-18", "checkpoint-20"]
    assert guard.planned == 3
    assert guard.saves_checked == 10
    assert "3 checkpoint(s) need" in guard.summary()


def test_ram_below_the_threshold_is_refused_before_step_1(output_dir: Path):
    # available RAM is always below 100 % of the total: a real refusal, no mock
    trainer = make_trainer(output_dir, callbacks=[PreflightGuard(min_available_memory=1.0)], max_steps=2)
    with pytest.raises(PreflightError, match="not enough free RAM") as info:
        trainer.train()
    assert trainer.state.global_step == 0
    assert info.value.evidence["min_available_bytes"] == info.value.evidence["total_bytes"]


def test_ram_check_can_be_turned_off(output_dir: Path):
    _, output = run_trainer(output_dir, callbacks=[PreflightGuard(min_available_memory=None)], max_steps=1)
    assert output.global_step == 1


def test_preflight_guard_is_in_all_guards_and_takes_options():
    guards = trainguard.all_guards(preflight_guard={"disk_margin": 0.5})
    mine = [g for g in guards if isinstance(g, PreflightGuard)]
    assert len(mine) == 1 and mine[0].disk_margin == 0.5
    with pytest.raises(ValueError, match="min_available_memory"):
        PreflightGuard(min_available_memory=85)


# ------------------------------------------------------------------------------------ PreflightGuard: each save
def _fill_up_run(output_dir: Path, callbacks: list[Any]) -> Any:
    # 3 MiB disk, a ~400 KiB checkpoint every 2 steps, all kept: the 8th checkpoint (step 16) cannot fit.
    return make_trainer(output_dir, callbacks=callbacks, max_steps=20, save_strategy="steps", save_steps=2)


def test_plain_trainer_dies_mid_save_and_leaves_a_partial_checkpoint_when_the_disk_fills(tmpfs: Path):
    # The failure the guard prevents, on the same setup as the next test: proof that the disk really fills.
    # torch.save reports ENOSPC as an opaque "[enforce fail at inline_container.cc] unexpected pos" error.
    output_dir = tmpfs / "run"
    trainer = _fill_up_run(output_dir, [])
    with pytest.raises(Exception, match=r"(No space left|os error 28|write failed|Errno 28|inline_container)"):
        trainer.train()
    last = output_dir / _checkpoint_dirs(output_dir)[-1]
    assert not (last / "trainer_state.json").exists()  # half a checkpoint: trainer_state.json is written last


def test_save_that_would_not_fit_is_not_started_and_the_run_stops_cleanly(
    tmpfs: Path, caplog: pytest.LogCaptureFixture
):
    output_dir = tmpfs / "run"
    guard = PreflightGuard(check_disk=False, disk_margin_bytes=16 * KIB)
    trainer = _fill_up_run(output_dir, [guard])
    with caplog.at_level(logging.CRITICAL, logger="trainguard"), pytest.raises(PreflightError) as info:
        trainer.train()
    err = info.value
    kept = _checkpoint_dirs(output_dir)
    stop_step = err.where["step"]
    assert trainer.state.global_step == stop_step < 20
    assert f"checkpoint-{stop_step}" not in kept  # nothing of it written: no partial folder
    assert kept == [f"checkpoint-{s}" for s in range(2, stop_step, 2)]
    for name in kept:  # every checkpoint on disk is complete
        assert (output_dir / name / "trainer_state.json").is_file()
    assert f"checkpoint-{stop_step} was not written" in err.what
    assert f"Newest complete checkpoint: {kept[-1]}" in err.what
    assert "free" in err.what and "KiB" in err.what
    assert err.evidence["free_bytes"] < err.evidence["needed_bytes"]
    assert "resume_from_checkpoint=True" in err.next_step
    assert "[preflight_guard] critical" in caplog.text
    events = (output_dir / "trainguard-events.jsonl").read_text()
    assert '"level": "critical"' in events and "was not written" in events


def test_stop_without_raising_when_asked(tmpfs: Path):
    output_dir = tmpfs / "run"
    guard = PreflightGuard(check_disk=False, disk_margin_bytes=16 * KIB, raise_after_stop=False)
    trainer = _fill_up_run(output_dir, [guard])
    output = trainer.train()  # returns: the run ended at a step boundary
    assert guard.stopped is not None and output.global_step == guard.stopped.where["step"] < 20
    assert f"checkpoint-{output.global_step}" not in _checkpoint_dirs(output_dir)
    assert "not enough disk" in guard.summary()


def test_first_save_is_checked_against_the_estimate(tmp_path: Path):
    # 640 KiB free: the guard's estimate of one checkpoint (~440 KiB) + a 256 KiB margin does not fit.
    with mounted_tmpfs("640k") as disk:
        output_dir = disk / "run"
        guard = PreflightGuard(check_disk=False, disk_margin_bytes=256 * KIB)
        trainer = make_trainer(output_dir, callbacks=[guard], max_steps=4, save_strategy="steps", save_steps=2)
        with pytest.raises(PreflightError, match="checkpoint-2 was not written") as info:
            trainer.train()
        assert info.value.evidence["basis"] == "the estimated checkpoint size"
        assert _checkpoint_dirs(output_dir) == []
        assert os.listdir(output_dir) == ["trainguard-events.jsonl"]


# --------------------------------------------------------------------------------------------------- 2 ranks
@pytest.mark.distributed
def test_two_ranks_refuse_together_and_stop_at_the_same_step_before_a_save_that_cannot_fit(tmpfs: Path, tmp_path: Path):
    script = TESTS_DIR / "scripts" / "preflight_full_disk.py"
    result = run_torchrun(script, str(tmpfs), str(tmp_path), nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 1. refused before step 1 on both ranks; rank 0 measured, rank 1 followed
    assert [r["refused"]["step"] for r in ranks] == [0, 0]
    assert "will not fit on disk" in ranks[0]["refused"]["what"]
    assert "another rank's pre-flight check failed" in ranks[1]["refused"]["what"]
    assert _checkpoint_dirs(tmpfs / "refused") == []
    # 2. both ranks stopped at the same step, before the checkpoint that could not fit
    steps = {r["stopped"]["step"] for r in ranks}
    assert len(steps) == 1
    stop = steps.pop()
    assert stop < 20 and ranks[0]["stopped"]["where_step"] == stop
    kept = _checkpoint_dirs(tmpfs / "fills")
    assert f"checkpoint-{stop}" not in kept and kept[-1] == f"checkpoint-{stop - 2}"
    for name in kept:  # complete, with both ranks' RNG states
        assert {"trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(tmpfs / "fills" / name))
