"""The plain functions behind the sharded and multi-node checks: what a node's copy lacks, agreeing on a step, which
engine wrote a checkpoint, and a run that asked for an engine it did not get."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainguard.checks.checkpoint import nodes
from trainguard.checks.checkpoint.layouts import checkpoint_layout, loader_mismatch
from trainguard.checks.preflight import engine_fallback, requested_engine
from trainguard.checks.preflight.sizing import param_stats


def test_what_each_node_copy_lacks_depends_on_the_engine_and_on_where_rank_0_is():
    def paths(engine: str, ranks: list[int], **kw: object) -> list[str]:
        return [g.path for g in nodes.blocking(nodes.node_copy_gaps(engine, node_ranks=ranks, world_size=2, **kw))]

    assert paths("fsdp_sharded", [1]) == [
        "pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/__0_0.distcp",
        "optimizer_0/.metadata", "optimizer_0/__0_0.distcp",
    ]  # fmt: skip
    assert paths("fsdp_sharded", [0]) == ["pytorch_model_fsdp_0/__1_0.distcp", "optimizer_0/__1_0.distcp"]
    assert paths("plain", [0]) == []  # only rank 1's RNG state, which rank 1 loads from its own node
    assert paths("plain", [1], weights_on_rank0_only=True) == ["model.safetensors", "config.json"]
    assert paths("plain", [1], weights_on_rank0_only=False) == []
    assert paths("deepspeed", [1], zero_stage=3) == [
        "latest", "global_stepN/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "global_stepN/zero_pp_rank_0_mp_rank_00_model_states.pt",
    ]  # fmt: skip


def test_nodes_agree_only_on_one_step_every_node_verified():
    assert nodes.agreed_step([6, 6]) == 6
    assert nodes.agreed_step([6, 4]) is None
    assert nodes.agreed_step([6, None]) is None
    assert nodes.storage_groups({0: [0, 1], 1: [0, 1]}) == [[0, 1]]
    assert nodes.storage_groups({0: [0], 1: [1]}) == [[0], [1]]
    assert nodes.storage_groups({0: [], 1: [1]}) == [[0], [1]]  # a node that could not write its probe


def test_a_probe_is_seen_by_every_node_sharing_the_folder_and_leaves_nothing_behind(tmp_path: Path):
    probes = [nodes.write_probe(tmp_path / "out", "ab12", n) for n in (0, 1)]
    assert nodes.seen_probes(tmp_path / "out", "ab12") == [0, 1]
    assert nodes.seen_probes(tmp_path / "out", "ffff") == []
    for probe in probes:
        nodes.remove_probe(probe)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("files", "layout"),
    [
        (["global_step4/mp_rank_00_model_states.pt", "latest"], "deepspeed"),
        (["pytorch_model_fsdp_0/.metadata", "optimizer_0/.metadata"], "fsdp_sharded"),
        (["pytorch_model_fsdp.bin", "optimizer.bin"], "fsdp_full"),
        (["model.safetensors", "optimizer.pt"], "plain"),
        (["rng_state_1.pth", "scheduler.pt"], None),  # one node's copy: too little to tell
    ],
)
def test_which_engine_wrote_a_checkpoint_is_read_from_its_files(tmp_path: Path, files: list[str], layout: str):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert checkpoint_layout(tmp_path) == layout


def test_only_a_checkpoint_of_another_engine_is_a_loader_mismatch():
    assert loader_mismatch("deepspeed", "deepspeed") is None
    assert loader_mismatch(None, "plain") is None
    assert "silently start the optimizer from scratch" in (loader_mismatch("deepspeed", "plain") or "")
    assert "cannot read it" in (loader_mismatch("fsdp_sharded", "fsdp_full") or "")


def test_a_run_that_asked_for_an_engine_and_got_another_is_named():
    assert requested_engine(True, None) == "fsdp"
    assert requested_engine("full_shard auto_wrap", None) == "fsdp"
    assert requested_engine([], None) is None
    assert requested_engine(False, {"zero_optimization": {}}) == "deepspeed"
    assert requested_engine(None, None, {"ACCELERATE_USE_FSDP": "true"}) == "fsdp"
    assert engine_fallback("fsdp", active="fsdp") is None
    assert engine_fallback(None, active="MULTI_CPU") is None
    said = engine_fallback("fsdp", active="MULTI_CPU", setting="fsdp=True") or ""
    assert "asked for FSDP (fsdp=True) but the Trainer set up MULTI_CPU, without FSDP" in said


def test_a_zero3_partitioned_parameter_counts_its_full_size_in_the_checkpoint_estimate():
    import torch

    class Partitioned(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # what deepspeed.zero.Init leaves on every rank: an empty placeholder that knows its full size
            self.weight = torch.nn.Parameter(torch.empty(0))
            self.weight.ds_numel = 1000  # type: ignore[attr-defined]

    stats = param_stats(Partitioned())
    assert stats.total_params == 1000 and stats.saved_bytes == 4000


def test_shares_are_balanced_by_bytes_and_the_same_for_the_same_listing():
    from trainguard.checks.checkpoint.split import partition

    sizes = {f"shard-{i}": size for i, size in enumerate([900, 500, 400, 300, 200, 100, 100])}
    shares = partition(sizes, 2)
    loads = [sum(sizes[n] for n in share) for share in shares]
    assert sorted(n for share in shares for n in share) == sorted(sizes)
    assert abs(loads[0] - loads[1]) <= 100
    assert partition(dict(reversed(list(sizes.items()))), 2) == shares


def test_the_writer_merges_the_other_ranks_shares_and_hashes_what_is_missing_or_changed(tmp_path: Path):
    import time

    from trainguard.checks.checkpoint import split
    from trainguard.checks.checkpoint.manifest import hash_many, known_digests, list_files

    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    for name in ("a.bin", "b.bin", "c.bin"):
        (folder / name).write_bytes(name.encode() * 1000)
    sizes = list_files(folder)
    split.write_partial(folder, 1, split.hash_share(folder, ["a.bin", "b.bin"], workers=1, fsync=False))
    merged = split.collect_partials(folder, [1, 2], timeout=0.2)  # rank 2 never delivers: not waited for forever
    assert sorted(Path(k).name for k in merged) == ["a.bin", "b.bin"]
    assert not list(folder.glob(".trainguard-hashes-*")) and ".trainguard-hashes-rank1.json" not in sizes
    time.sleep(0.01)
    (folder / "b.bin").write_bytes(b"changed after its share was hashed" * 100)  # another size and mtime
    with known_digests(merged):
        digests = hash_many(folder, sizes, list_files(folder), 1)
    assert digests == hash_many(folder, sizes, list_files(folder), 1)  # b.bin and c.bin hashed here, correctly
    # a share still valid for its file is taken as it is: the file is not read a second time
    key = str((folder / "a.bin").resolve())
    with known_digests({key: (*merged[key][:2], "f" * 64)}):
        assert hash_many(folder, ["a.bin"], list_files(folder), 1) == {"a.bin": "f" * 64}
