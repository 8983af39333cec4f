"""Two nodes simulated on this machine: two torchrun agents (``--nnodes 2``, one process each, rendezvous on
127.0.0.1), with a shared ``output_dir`` or each node its own folder (node-local disks, ``save_on_each_node``).

Measured upstream (transformers 5.24, accelerate 1.15, DeepSpeed 0.19): with node-local folders every save works,
but no node can resume from its own copy (FSDP sharded: node 1 has no ``.metadata``; DeepSpeed: no ``latest``;
FSDP full state and, since transformers 5, plain DDP: no weights). trainguard says so before step 1 and refuses the
resume on every node naming what each copy lacks; where upstream can resume node-local copies (transformers 4), a
resume lands on the newest step verified on every node.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trainguard.callbacks._trainer_compat import weights_on_rank0_only
from trainguard.checks import checkpoint as ckpt
from trainguard.checks import lineage

from _engines import have_deepspeed
from _rig import TESTS_DIR, run_torchrun_nodes, subprocess_env
from test_process_guards_distributed import HOLDER

pytestmark = [pytest.mark.distributed, pytest.mark.sharded]

SCRIPT = TESTS_DIR / "scripts" / "sharded_train.py"


def launch(root: Path, layout: str, scenarios: str, *extra: str, node_local: bool, damage: str = "") -> dict[str, Any]:
    reports = root / "reports"
    reports.mkdir()
    outs = [root / (f"node{n}" if node_local else "shared") / "out" for n in range(2)]
    args = ["--layout", layout, "--scenarios", scenarios, "--damage", damage, *extra]
    results = run_torchrun_nodes(SCRIPT, [[str(out), str(reports), *args] for out in outs], timeout=600)
    for result in results:
        assert result.returncode == 0, result.stderr[-6000:]
    ranks = []
    for r in (0, 1):
        records = [json.loads(line) for line in (reports / f"rank{r}.jsonl").read_text().splitlines()]
        ranks.append({rec["scenario"]: rec for rec in records})
    return {"ranks": ranks, "outs": outs}


def both(run: dict[str, Any], scenario: str) -> list[dict[str, Any]]:
    return [ranks[scenario] for ranks in run["ranks"]]


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[Path]:
    """A process outside the job holding the RunLock of ``shared/out_locked``: another job, as far as the lock
    can tell."""
    locked = tmp_path / "shared" / "out_locked"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(locked)], env=subprocess_env(), stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield locked
    finally:
        holder.kill()
        holder.wait(timeout=60)
        if holder.stdout is not None:
            holder.stdout.close()


# ------------------------------------------------------------------------------------------ shared folder
def test_on_a_shared_folder_a_locked_dir_refuses_every_node_and_a_damaged_shard_makes_both_fall_back(
    tmp_path: Path, lock_holder: Path
):
    run = launch(tmp_path, "fsdp2_sharded", "locked,train,resume,damage", node_local=False,
                 damage="flip:pytorch_model_fsdp_0/__1_0.distcp")  # fmt: skip
    assert [rec["raised"] for rec in both(run, "locked")] == ["RunLockedError", "RunLockedError"]
    # one job: its rank on node 1 never locks the folder rank 0 holds
    assert [rec["raised"] for rec in both(run, "train")] == [None, None]
    assert [rec["first_step"] for rec in both(run, "resume")] == [4, 4]
    assert [rec["first_step"] for rec in both(run, "damage")] == [4, 4]
    out = run["outs"][0]
    listed = ckpt.parse_sha256_file(out / "checkpoint-4" / ckpt.MANIFEST_NAME)
    assert {"pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp"} <= set(listed)
    assert "0 manifest(s) written" in run["ranks"][1]["train"]["summaries"]["checkpoint_verifier"]


def test_save_on_each_node_on_a_shared_folder_is_named_and_trainguard_writes_its_files_once(tmp_path: Path):
    run = launch(tmp_path, "ddp", "train", "--save-on-each-node", node_local=False)
    assert [rec["raised"] for rec in both(run, "train")] == [None, None]  # both node writers hold one job's lock
    said = "\n".join(run["ranks"][0]["train"]["alerts"])
    assert "save_on_each_node=True, but all 2 nodes write into the same folder" in said
    assert "0 manifest(s) written" in run["ranks"][1]["train"]["summaries"]["checkpoint_verifier"]
    assert "2 manifest(s) written" in run["ranks"][0]["train"]["summaries"]["checkpoint_verifier"]


# ------------------------------------------------------------------------------------- node-local folders
NODE_LOCAL = ["ddp", "fsdp2_sharded", "fsdp1_full", "zero2"]


@pytest.mark.parametrize("layout", NODE_LOCAL)
def test_node_local_copies_no_node_can_resume_alone_are_named_before_step_1_and_the_resume_is_refused(
    tmp_path: Path, layout: str
):
    if layout.startswith("zero") and not have_deepspeed():
        pytest.skip("DeepSpeed is not installed (a test extra)")
    if layout == "ddp" and not weights_on_rank0_only():
        pytest.skip("transformers 4 writes the weights on every node: node-local DDP copies resume (tested below)")
    run = launch(tmp_path, layout, "train,resume", "--save-on-each-node", node_local=True)
    said = "\n".join(run["ranks"][0]["train"]["alerts"])
    assert "node-local checkpoints (save_on_each_node=True" in said and "resume from its own copy" in said, said
    assert [rec["raised"] for rec in both(run, "train")] == [None, None]  # the saves themselves go ahead
    # What each node's commit recorded it would lack is what really is missing there, and on the other node.
    lacking = []
    for node, out in enumerate(run["outs"]):
        folder = out / "checkpoint-4"
        record = lineage.checkpoint_origin(folder).record
        assert record["node_copy"]["node"] == node
        for gap in record["node_copy"]["lacks"]:
            name = gap["path"].replace("global_stepN", "global_step4")
            assert not (folder / name).exists(), name
            assert (run["outs"][1 - node] / "checkpoint-4" / name).exists(), name
            lacking.append(name)
    assert lacking
    for rec in both(run, "resume"):
        assert rec["raised"] == "CheckpointIntegrityError"
        assert "no checkpoint step verifies on every node" in rec["what"]
        assert rec.get("first_step") is None
    for out in run["outs"]:  # a copy that cannot resume alone is left where it is, for the user to gather
        assert not (out / ckpt.QUARANTINE_DIR).exists()
        assert (out / "checkpoint-4" / ckpt.MANIFEST_NAME).is_file()


def test_node_local_folders_without_save_on_each_node_are_named_before_step_1(tmp_path: Path):
    run = launch(tmp_path, "ddp", "train", node_local=True)
    said = "\n".join(run["ranks"][0]["train"]["alerts"])
    assert "the 2 nodes do not share" in said and "save_on_each_node=False" in said, said


@pytest.mark.compat
def test_node_local_copies_that_resume_land_on_the_newest_step_verified_on_every_node(tmp_path: Path):
    if weights_on_rank0_only():
        pytest.skip("transformers 5 writes the weights on global rank 0 only: no node-local copy resumes (above)")
    run = launch(tmp_path, "ddp", "train,resume,damage", "--save-on-each-node", "--damage-rank", "1",
                 node_local=True, damage="truncate:optimizer.pt")  # fmt: skip
    assert [rec["first_step"] for rec in both(run, "resume")] == [4, 4]
    # node 1's copy of checkpoint-6 is damaged, node 0's is fine: both resume from checkpoint-4
    assert [rec["first_step"] for rec in both(run, "damage")] == [4, 4]
    assert any("checkpoint-6 verifies here but not on every node" in a for a in run["ranks"][0]["damage"]["alerts"])
    assert any("node 1: checkpoint-6 failed verification" in a for a in run["ranks"][1]["damage"]["alerts"])
