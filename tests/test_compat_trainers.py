"""all_guards() on the trainer classes users attach it to: Trainer, Seq2SeqTrainer and TRL's SFTTrainer with LoRA.

Each one trains for real on CPU with saves, reports every guard, writes verified manifests, and resumes from its
newest checkpoint with every guard attached (no false refusal); then the same on 2 ranks under torchrun.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import trainguard
from trainguard.callbacks import _GUARDS
from trainguard.errors import LoraConfigMismatchError

from _rig import TESTS_DIR, run_torchrun

SCRIPT = TESTS_DIR / "scripts" / "compat_trainers.py"
GUARD_NAMES = [key for key, _ in _GUARDS]
EXPECTED_CLASS = {"trainer": "Trainer", "seq2seq": "Seq2SeqTrainer", "sft_lora": "SFTTrainer"}


def _compat() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compat_trainers", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_sensible_summaries(summaries: dict[str, str], *, resumed: bool, kind: str) -> None:
    assert list(summaries) == GUARD_NAMES, "every guard attached, in all_guards() order"
    silent = {"run_reporter"} | ({"adapter_guard"} if kind != "sft_lora" else set())  # nothing to tell: ""
    for name, line in summaries.items():
        assert isinstance(line, str) and (line.strip() or name in silent), name
        assert "\n" not in line, name
        assert "not checked" not in line, (name, line)
    assert summaries["run_reporter"] == ""  # report_to="none": nothing was published
    assert summaries["run_lock"].endswith(" locked against other runs until this process exits")
    assert "no crash loop" in summaries["crash_loop_guard"]
    assert "no stop requested" in summaries["graceful_stop"]
    assert "save(s) checked for space" in summaries["preflight_guard"]
    assert summaries["nan_guard"] == "all values finite"
    assert "step(s) measured" in summaries["hang_watchdog"] and "stall" not in summaries["hang_watchdog"]
    assert "checked 32 row(s)" in summaries["data_guard"]
    if kind == "sft_lora":
        assert summaries["adapter_guard"].startswith("every adapter parameter trains (checked through step ")
    else:
        assert summaries["adapter_guard"] == ""
    if resumed:
        assert summaries["checkpoint_verifier"].startswith("1 manifest(s) written, lineage ")
        assert ", resumed from checkpoint-4, " in summaries["checkpoint_verifier"]
        assert ", 1 save(s) audited" in summaries["checkpoint_verifier"]
        assert "resumed from checkpoint-4: same data and batch" in summaries["dataset_guard"]
        expected_lora = "checkpoint-4: same LoRA config" if kind == "sft_lora" else "checkpoint-4: no LoRA"
        assert summaries["lora_config_guard"].startswith(expected_lora)
    else:
        assert summaries["checkpoint_verifier"].startswith("2 manifest(s) written, lineage ")
        assert summaries["checkpoint_verifier"].endswith(", 2 save(s) audited")  # none hollow
        assert summaries["dataset_guard"].endswith("no resume")
        assert summaries["lora_config_guard"].startswith("no resume")


def _assert_checkpoints_verify(output_dir: Path, steps: list[int]) -> None:
    for step in steps:
        folder = output_dir / f"checkpoint-{step}"
        assert (folder / "trainguard-manifest.sha256").is_file(), folder
        assert (folder / "trainguard-manifest.json").is_file(), folder
        assert trainguard.verify_checkpoint(folder).ok


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["trainer", "seq2seq", "sft_lora"])
def test_all_guards_train_save_and_resume_from_newest_checkpoint(kind: str, tmp_path: Path) -> None:
    compat = _compat()
    out = tmp_path / "run"

    trainer = compat.build_trainer(kind, out, max_steps=4, save_steps=2)
    assert type(trainer).__name__ == EXPECTED_CLASS[kind]
    trainer.train()
    assert trainer.state.global_step == 4
    _assert_sensible_summaries(compat.guard_summaries(trainer), resumed=False, kind=kind)
    _assert_checkpoints_verify(out, [2, 4])

    resumed = compat.build_trainer(kind, out, max_steps=6, save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    _assert_sensible_summaries(compat.guard_summaries(resumed), resumed=True, kind=kind)
    _assert_checkpoints_verify(out, [2, 4, 6])


def test_seq2seq_model_without_position_limit_is_summarised_plainly(tmp_path: Path) -> None:
    # T5 uses relative positions: its config names no limit, and the summary says so in words.
    trainer = _compat().build_trainer("seq2seq", tmp_path / "run", max_steps=1, save_steps=10)
    trainer.train()
    [guard] = [g for g in trainer.callback_handler.callbacks if isinstance(g, trainguard.DataGuard)]
    assert guard.summary().endswith("0 empty, no position limit in the config")


def test_sft_lora_checkpoint_is_an_adapter_and_a_changed_lora_rank_is_refused_on_resume(tmp_path: Path) -> None:
    compat = _compat()
    out = tmp_path / "run"
    trainer = compat.build_trainer("sft_lora", out, max_steps=2, save_steps=2)
    trainer.train()
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoint-2" / "model.safetensors").exists()

    changed = compat.build_trainer("sft_lora", out, max_steps=4, save_steps=2, lora_r=8)
    with pytest.raises(LoraConfigMismatchError) as err:
        changed.train(resume_from_checkpoint=True)
    assert "checkpoint-2" in str(err.value)
    assert changed.state.global_step == 0, "refused before the first step"


def _results(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line.split("RESULT ", 1)[1]) for line in stdout.splitlines() if line.startswith("RESULT ")]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["trainer", "seq2seq", "sft_lora"])
def test_all_guards_on_two_ranks_train_save_and_resume(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_torchrun(SCRIPT, kind, str(out), "--phases", "train,resume", timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    first, second = _results(proc.stdout)
    for result in (first, second):
        assert result["world_size"] == 2
        assert result["trainer_class"] == EXPECTED_CLASS[kind]
    assert (first["phase"], first["global_step"]) == ("train", 4)
    assert (second["phase"], second["global_step"]) == ("resume", 6)
    # The rig's 32 rows over 2 ranks: each rank's data guard checks its own view of the same 32-row dataset.
    _assert_sensible_summaries(first["summaries"], resumed=False, kind=kind)
    _assert_sensible_summaries(second["summaries"], resumed=True, kind=kind)
    assert "global batch 4" in first["summaries"]["dataset_guard"]
    # Both ranks write into one folder: the resume verification was split between them (this rank hashed its share).
    assert "file(s) as this rank's share" in second["summaries"]["checkpoint_verifier"]
    _assert_checkpoints_verify(out, [2, 4, 6])
