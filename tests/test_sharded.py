"""Every guard on real sharded engines: FSDP v1 and v2 (sharded and full state dicts) and DeepSpeed ZeRO-2/3, two
gloo ranks on CPU, the real Trainer (see tests/scripts/sharded_train.py and tests/_engines.py).

One launch per layout runs five scenarios: a job cut short after its save at step 4, a resume, a resume after rank 0
damaged a file of checkpoint-6 (a rank-1 shard, an optimizer file, a stale ``latest``), a NaN in rank 1's forward,
and a NaN put into rank 1's local shard of a weight just before a save.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

import trainguard
from trainguard.checks import checkpoint as ckpt
from trainguard.checks._layout import METADATA_NAME

from _engines import ENGINE_ENV, have_deepspeed
from _rig import TESTS_DIR, run_torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.sharded]

SCRIPT = TESTS_DIR / "scripts" / "sharded_train.py"
SCENARIOS = "train,resume,damage,nan_loss,nan_weights"
#: what rank 0 does to checkpoint-6 before the third run, per layout
DAMAGE = {
    "fsdp1_sharded": "flip:optimizer_0/__1_0.distcp",
    "fsdp1_full": "truncate:optimizer.bin",
    "fsdp2_sharded": "flip:pytorch_model_fsdp_0/__1_0.distcp",
    "fsdp2_full": "delete:rng_state_1.pth",
    "zero2": "delete:global_step6/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "zero3": "latest:global_step4",
}
ENGINE = {"fsdp": "DistributedType.FSDP", "zero": "DistributedType.DEEPSPEED"}


def needs_engine(layout: str) -> None:
    if layout.startswith("zero") and not have_deepspeed():
        pytest.skip("DeepSpeed is not installed (a test extra: DS_BUILD_OPS=0 pip install deepspeed)")


def launch(root: Path, layout: str, scenarios: str, *extra: str, output: Path | None = None) -> dict[str, Any]:
    reports = root / f"reports-{layout}-{scenarios.replace(',', '-')}"
    reports.mkdir()
    out = output or root / "out"
    result = run_torchrun(SCRIPT, str(out), str(reports), "--layout", layout, "--scenarios", scenarios, *extra,
                          timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-6000:]
    ranks = []
    for r in (0, 1):
        records = [json.loads(line) for line in (reports / f"rank{r}.jsonl").read_text().splitlines()]
        ranks.append({rec["scenario"]: rec for rec in records})
    return {"ranks": ranks, "out": out, "stderr": result.stderr}


@pytest.fixture(scope="module", params=list(DAMAGE))
def job(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    layout = request.param
    needs_engine(layout)
    root = tmp_path_factory.mktemp(layout)
    run = launch(root, layout, SCENARIOS, "--damage", DAMAGE[layout])
    run.update(layout=layout, root=root)
    return run


def both(job: dict[str, Any], scenario: str) -> list[dict[str, Any]]:
    return [ranks[scenario] for ranks in job["ranks"]]


def alerts(job: dict[str, Any], scenario: str) -> str:
    return "\n".join(line for rec in both(job, scenario) for line in rec["alerts"])


# ------------------------------------------------------------------------------------- train and resume
def test_every_guard_trains_saves_and_resumes_on_the_engine_itself(job: dict[str, Any]):
    for rec in both(job, "train"):
        assert rec["raised"] is None, rec.get("trace")
        assert rec["global_step"] == 4
        assert rec["distributed_type"] == ENGINE[job["layout"][:4]]  # really sharded, not a silent DDP fallback
    # the writing rank audited both saves (full shapes, not its own shard) and found nothing hollow
    assert "2 save(s) audited" in job["ranks"][0]["train"]["summaries"]["checkpoint_verifier"]
    assert [rec["first_step"] for rec in both(job, "resume")] == [4, 4]
    assert [rec["global_step"] for rec in both(job, "resume")] == [6, 6]


def test_every_rank_hashes_its_share_of_each_manifest_and_of_the_resume_verification(job: dict[str, Any]):
    rank1 = job["ranks"][1]
    for scenario in ("train", "resume"):  # two saves; then the verification of checkpoint-4 and one save
        said = rank1[scenario]["summaries"]["checkpoint_verifier"]
        match = re.search(r"hashed (\d+) file\(s\) as this rank's share", said)
        assert match and int(match.group(1)) > 0, said
    assert not list(job["out"].glob("checkpoint-*/.trainguard-hashes-*"))  # merged and removed by the writer
    for step in (2, 4, 6):
        assert trainguard.verify_checkpoint(job["out"] / f"checkpoint-{step}").ok


def test_the_manifest_is_written_once_after_every_rank_and_covers_every_ranks_files(job: dict[str, Any]):
    folder = job["out"] / "checkpoint-4"
    listed = set(ckpt.parse_sha256_file(folder / ckpt.MANIFEST_NAME))
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert on_disk - listed == {ckpt.MANIFEST_NAME}  # the metadata file lists itself
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= listed
    rank1_files = {n for n in listed if "__1_" in n or "zero_pp_rank_1_" in n}
    if job["layout"].endswith("sharded") or job["layout"].startswith("zero"):
        assert rank1_files, sorted(listed)  # rank 1's own shards or optimizer partition
    assert trainguard.verify_checkpoint(folder).ok


def test_a_clean_resume_continues_the_run_exactly(job: dict[str, Any]):
    if job["layout"] == "fsdp1_sharded":
        pytest.skip("FSDP1 SHARDED_STATE_DICT resumes lose the optimizer upstream: see the next test")
    # Ground truth read by the test's own callback: the optimizer's step count at the first resumed step.
    assert [rec["optimizer_step_at_first"] for rec in both(job, "resume")] == [4.0, 4.0]
    assert "resume attestation" not in alerts(job, "resume")


def test_an_fsdp1_sharded_resume_that_restarts_the_optimizer_is_named_before_its_first_update(job: dict[str, Any]):
    if job["layout"] != "fsdp1_sharded":
        pytest.skip("only FSDP1 SHARDED_STATE_DICT has this upstream gap (accelerate 1.15)")
    # What really happened: the resumed optimizer holds no state (accelerate loads into an empty template).
    assert [rec["optimizer_step_at_first"] for rec in both(job, "resume")] == [None, None]
    said = alerts(job, "resume")
    assert "the optimizer state was not restored: its step count is None, 4.0 at the save" in said
    assert "FSDP1 SHARDED_STATE_DICT" in said and "fsdp_version 2" in said


def test_a_damaged_file_of_rank_1_makes_every_rank_fall_back_to_the_same_checkpoint(job: dict[str, Any]):
    records = both(job, "damage")
    assert [rec["raised"] for rec in records] == [None, None], records[0].get("trace")
    assert [rec["first_step"] for rec in records] == [4, 4]
    damaged = DAMAGE[job["layout"]].split(":", 1)[1]
    named = damaged if not damaged.startswith("global_step4") else "latest"
    said = alerts(job, "damage")
    assert "checkpoint-6 failed verification" in said and named in said, said
    assert any((job["out"] / ckpt.QUARANTINE_DIR).glob("checkpoint-6.*Z"))


# ----------------------------------------------------------------------------------------------- NanGuard
def test_a_nan_in_rank_1s_forward_stops_every_rank_at_the_same_step(job: dict[str, Any]):
    records = both(job, "nan_loss")
    assert [rec["raised"] for rec in records] == ["NonFiniteError", "NonFiniteError"]
    assert [rec["global_step"] for rec in records] == [2, 2]
    assert all("at step 3 on rank 1" in rec["what"] for rec in records)
    # the update of step 3 never ran (DeepSpeed's ZeRO optimizer skips a step with non-finite gradients itself)
    assert [rec["weights_finite"] for rec in records] == [True, True]


def test_a_nan_in_rank_1s_shard_of_a_weight_refuses_the_save_on_every_rank(job: dict[str, Any]):
    records = both(job, "nan_weights")
    assert [rec["raised"] for rec in records] == ["NonFiniteError", "NonFiniteError"]
    assert records[1]["poisoned"] and records[1]["poisoned"].split(".")[-2] in records[1]["what"]
    assert "on another rank's shard" in records[0]["what"]
    folder = job["out"].parent / "out_nan_weights" / "checkpoint-2"
    assert not (folder / ckpt.MANIFEST_NAME).exists()


# ------------------------------------------------------------------------------- verify, without a manifest
def _copy_without_manifest(job: dict[str, Any], tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoint-4"
    shutil.copytree(job["out"] / "checkpoint-4", folder)
    for name in (ckpt.MANIFEST_NAME, METADATA_NAME):
        (folder / name).unlink()
    assert ckpt.check_checkpoint(folder).ok  # a complete legacy checkpoint passes its structural checks
    return folder


def _problems(folder: Path) -> str:
    return "; ".join(p.format() for p in ckpt.check_checkpoint(folder).problems)


def test_verify_knows_the_dcp_layout_a_missing_or_short_rank_1_shard_or_no_metadata_fails(
    job: dict[str, Any], tmp_path: Path
):
    if not job["layout"].endswith("_sharded"):
        pytest.skip("DCP folders are written by SHARDED_STATE_DICT only")
    folder = _copy_without_manifest(job, tmp_path)
    shard = folder / "pytorch_model_fsdp_0" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert "pytorch_model_fsdp_0/__1_0.distcp: truncated" in _problems(folder)
    (folder / "optimizer_0" / "__1_0.distcp").unlink()
    assert "optimizer_0/__1_0.distcp: missing (named by .metadata)" in _problems(folder)
    (folder / "pytorch_model_fsdp_0" / ".metadata").unlink()
    assert "pytorch_model_fsdp_0/.metadata: missing" in _problems(folder)


def test_verify_knows_the_deepspeed_layout_a_missing_rank_file_or_a_stale_latest_fails(
    job: dict[str, Any], tmp_path: Path
):
    if not job["layout"].startswith("zero"):
        pytest.skip("DeepSpeed layouts only")
    folder = _copy_without_manifest(job, tmp_path)
    (folder / "latest").write_text("global_step2")
    assert "latest: names 'global_step2', but this is checkpoint-4: a stale latest" in _problems(folder)
    (folder / "latest").write_text("global_step4")
    (folder / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert "missing the optim state of 1 of 2 rank(s): 1" in _problems(folder)


# ------------------------------------------------------------------------- configurations that cannot work
def test_a_run_that_asked_for_fsdp_and_got_ddp_is_refused_on_every_rank_before_step_1(tmp_path: Path):
    run = launch(tmp_path, "fsdp2_sharded", "train", "--no-shim")  # accelerate drops FSDP on CPU, silently
    for rec in (ranks["train"] for ranks in run["ranks"]):
        assert rec["raised"] == "PreflightError"
        assert "asked for FSDP" in rec["what"] and "MULTI_CPU" in rec["what"]
        assert rec["distributed_type"] == "DistributedType.MULTI_CPU" and rec.get("first_step") is None
    assert not list(run["out"].glob("checkpoint-*"))


def test_a_checkpoint_written_by_another_engine_is_refused_before_anything_loads(tmp_path: Path):
    needs_engine("zero2")
    written = launch(tmp_path, "zero2", "train")["out"]
    # Plain Trainer would load the 16-bit weights and start the optimizer from scratch, silently.
    run = launch(tmp_path, "ddp", "cross", output=written)
    for rec in (ranks["cross"] for ranks in run["ranks"]):
        assert rec["raised"] == "ResumeAttestationError"
        assert "written by DeepSpeed" in rec["what"] and "silently start the optimizer from scratch" in rec["what"]
        assert rec.get("first_step") is None


# ------------------------------------------------------------------------- process guards on FSDP
def test_when_rank_1_hangs_under_fsdp_both_ranks_dump_rank_0_inside_the_collective(tmp_path: Path):
    from trainguard.checks.watchdog import find_dumps

    from test_hang_watchdog import _main_thread_stack

    output_dir = tmp_path / "run"
    proc = run_torchrun(
        TESTS_DIR / "scripts" / "watchdog_train.py", str(output_dir), "--stall", "sleep", "--stall-rank", "1",
        "--stall-seconds", "200", "--action", "abort", "--timeout", "2", "--max-steps", "8",
        timeout=240, env={ENGINE_ENV: "fsdp2_sharded"},
    )  # fmt: skip
    assert proc.returncode != 0, proc.stderr[-3000:]
    rank0, rank1 = find_dumps(output_dir, rank=0), find_dumps(output_dir, rank=1)
    assert rank0 and rank1, (sorted(p.name for p in output_dir.iterdir()), proc.stderr[-3000:])
    assert "in sleep_in_step" in _main_thread_stack(rank1[0].read_text())
    waiting = _main_thread_stack(rank0[0].read_text())
    assert "sleep_in_step" not in waiting and "torch/distributed/fsdp" in waiting, waiting[-3000:]


# ------------------------------------------------------------------------------------------ LoRA on FSDP
def test_a_lora_run_on_fsdp_sharded_is_resumed_with_its_config_and_refused_with_another(tmp_path: Path):
    # FSDP's sharded state dict writes no adapter_config.json: the config the verifier recorded at the save is used.
    run = launch(tmp_path, "fsdp2_sharded", "lora,lora_alpha,lora_same")
    for ranks in run["ranks"]:
        assert ranks["lora"]["raised"] is None
        assert not (run["out"].parent / "out_lora" / "checkpoint-4" / "adapter_config.json").exists()
        assert ranks["lora_alpha"]["raised"] == "LoraConfigMismatchError"
        assert "lora_alpha: checkpoint 16, this run 32" in ranks["lora_alpha"]["what"]
        assert ranks["lora_same"]["raised"] is None, ranks["lora_same"].get("trace")
        assert ranks["lora_same"]["first_step"] == 4
