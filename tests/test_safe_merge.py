"""safe_merge: a real PEFT LoRA trained a few steps with the real Trainer, merged into immutable versions on real
filesystems (a real tmpfs for the full-disk cases)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from trainguard import (
    CheckpointIntegrityError,
    LoraConfigMismatchError,
    NonFiniteError,
    PreflightError,
    safe_merge,
)
from trainguard.checks import merge as merge_module
from trainguard.checks.merge import VERSION_METADATA, list_versions

from _rig import REPO_ROOT, make_lm_dataset, make_tiny_llama, mounted_tmpfs, run_python, run_trainer

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved base model, a PEFT checkpoint trained 3 steps on it (B != 0), and an untrained adapter (B == 0)."""
    root = tmp_path_factory.mktemp("merge")
    make_tiny_llama(seed=0).save_pretrained(root / "base")
    model = peft.get_peft_model(make_tiny_llama(seed=0), peft.LoraConfig(**LORA))
    run_trainer(root / "run", model=model, max_steps=3, save_strategy="steps", save_steps=3, learning_rate=1e-2)
    untrained = peft.get_peft_model(make_tiny_llama(seed=0), peft.LoraConfig(**LORA))
    untrained.save_pretrained(root / "untrained")
    return {"base": root / "base", "checkpoint": root / "run" / "checkpoint-3", "untrained": root / "untrained"}


def _leftovers(versions_dir: Path) -> list[str]:
    return sorted(os.listdir(versions_dir)) if versions_dir.exists() else []


def _check_manifest(version: Path) -> None:
    from trainguard.checks.checkpoint import MANIFEST_NAME, verify_checkpoint

    assert (version / MANIFEST_NAME).is_file()
    report = verify_checkpoint(version, require_manifest=True)
    assert report.mode == "manifest"


def _logits(model: Any) -> Any:
    ids = torch.tensor([make_lm_dataset(n_rows=1)[0]["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_publishes_v001_then_v002_each_verifiable_loadable_and_described(
    trained: dict[str, Path], tmp_path: Path
):
    from transformers import LlamaForCausalLM

    from trainguard.checks.checkpoint import verify_checkpoint

    versions = tmp_path / "versions"
    v1 = safe_merge(
        trained["checkpoint"],
        trained["base"],
        versions,
        dataset_fingerprint="sha256:abc123",
        metrics={"eval_loss": 1.25},
        metadata={"ticket": "T-7"},
    )
    v2 = safe_merge(trained["checkpoint"], trained["base"], versions)
    assert (v1.name, v2.name) == ("v001", "v002")
    assert list_versions(versions) == [v1, v2]
    assert _leftovers(versions) == ["v001", "v002"]  # no staging folder left behind
    for version in (v1, v2):
        _check_manifest(version)
    meta = json.loads((v1 / VERSION_METADATA).read_text())
    assert meta["source_checkpoint"] == str(trained["checkpoint"].resolve())
    assert meta["source_step"] == 3
    assert meta["base_model"]["name_or_path"] == str(trained["base"].resolve())
    assert meta["base_model"]["class"] == "LlamaForCausalLM"
    assert meta["dataset_fingerprint"] == "sha256:abc123"
    assert meta["metrics"] == {"eval_loss": 1.25}
    assert meta["extra"] == {"ticket": "T-7"}
    assert meta["lora_config"]["r"] == 4 and meta["lora_config"]["lora_alpha"] == 8
    assert sorted(meta["lora_config"]["target_modules"]) == ["q_proj", "v_proj"]
    assert meta["created_utc"].endswith("Z")
    assert {"trainguard", "torch", "transformers", "peft"} <= set(meta["software"])
    assert meta["merge_checks"]["changed_layers"] == meta["merge_checks"]["adapter_layers"] == 4
    assert meta["merge_checks"]["tensors"] == meta["merge_checks"]["base_tensors"]
    # the published model is the base with the adapter applied: same outputs as base + adapter through peft
    merged = LlamaForCausalLM.from_pretrained(v1)
    reference = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(trained["base"]), trained["checkpoint"])
    base = LlamaForCausalLM.from_pretrained(trained["base"])
    torch.testing.assert_close(_logits(merged), _logits(reference), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_logits(merged), _logits(base))
    # verifiable later too: one flipped byte in the published weights is caught
    weights = v2 / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match=r"model\.safetensors"):
        verify_checkpoint(v2)


def test_merge_accepts_a_loaded_base_model_and_saves_the_tokenizer(
    trained: dict[str, Path], tmp_path: Path, tokenizer: Any
):
    from transformers import AutoTokenizer, LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(trained["base"])
    version = safe_merge(trained["checkpoint"], base, tmp_path / "v", tokenizer=tokenizer)
    assert version.name == "v001"
    assert json.loads((version / VERSION_METADATA).read_text())["merge_checks"]["changed_layers"] == 4
    assert AutoTokenizer.from_pretrained(version).encode("the run resumed") == tokenizer.encode("the run resumed")
    _check_manifest(version)  # the manifest covers the tokenizer files too


def test_untrained_adapter_is_refused_because_weights_did_not_change(trained: dict[str, Path], tmp_path: Path):
    versions = tmp_path / "versions"
    with pytest.raises(CheckpointIntegrityError, match="weights did not change") as info:
        safe_merge(trained["untrained"], trained["base"], versions)
    err = info.value
    assert "every lora_B matrix of the adapter is zero" in err.what
    assert err.where["file"].endswith("adapter_model.safetensors")
    assert err.evidence["lora_B_all_zero"] is True
    assert "allow_unchanged=True" in err.next_step
    assert _leftovers(versions) == []
    # on purpose, it can still be published
    assert safe_merge(trained["untrained"], trained["base"], versions, allow_unchanged=True).name == "v001"


def test_adapter_that_never_reaches_the_saved_weights_is_caught_by_the_read_back(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # unsloth #869: the "merged" model equals the base. Simulate a merge that drops the adapter instead of merging.
    monkeypatch.setattr(peft.tuners.lora.LoraModel, "merge_and_unload", lambda self, **kw: self.unload())
    versions = tmp_path / "versions"
    with pytest.raises(CheckpointIntegrityError, match="weights did not change") as info:
        safe_merge(trained["checkpoint"], trained["base"], versions)
    assert "was not applied" in info.value.what
    assert _leftovers(versions) == []  # the staging folder was written, then removed


def test_nan_in_the_adapter_is_refused_naming_the_tensor(trained: dict[str, Path], tmp_path: Path):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "nan-adapter"
    shutil.copytree(trained["checkpoint"], adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if "layers.1.self_attn.v_proj.lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    versions = tmp_path / "versions"
    with pytest.raises(NonFiniteError, match="non-finite") as info:
        safe_merge(adapter, trained["base"], versions)
    assert info.value.where["field"] == key
    assert info.value.evidence["non_finite"] == 1
    assert _leftovers(versions) == []


def test_full_disk_is_refused_before_loading_and_leaves_nothing(trained: dict[str, Path]):
    with mounted_tmpfs("3m") as disk:
        filler = disk / "user-data.bin"
        free = shutil.disk_usage(disk).free
        filler.write_bytes(b"\0" * (free - 96 * 1024))  # the merged weights alone are ~115 KiB
        versions = disk / "versions"
        with pytest.raises(PreflightError, match="not enough free disk space for the merged model") as info:
            safe_merge(trained["checkpoint"], trained["base"], versions, disk_margin_bytes=0)
        err = info.value
        assert err.evidence["needed_bytes"] > err.evidence["free_bytes"]
        assert "MiB" in err.what or "KiB" in err.what
        assert _leftovers(versions) == []
        assert filler.stat().st_size == free - 96 * 1024  # the user's file is untouched


def test_disk_filling_during_the_save_leaves_no_partial_version_and_no_staging(
    trained: dict[str, Path], monkeypatch: pytest.MonkeyPatch
):
    # The pre-flight is made blind to the small files so that it passes with room for the weights only; the save
    # then really hits ENOSPC on a real tmpfs, as when another process fills the disk during a merge.
    monkeypatch.setattr(merge_module, "_SMALL_FILES_BYTES", 0)
    with mounted_tmpfs("3m") as disk:
        versions = disk / "versions"
        versions.mkdir()
        (versions / "v001").mkdir()  # an earlier version the user has
        (versions / "v001" / "model.safetensors").write_bytes(b"old")
        weights = sum(p.stat().st_size for p in trained["base"].glob("*.safetensors"))
        filler = disk / "other-job.bin"
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - weights - 8 * 1024))
        with pytest.raises(PreflightError, match="disk filled while the merged model was being written") as info:
            safe_merge(trained["checkpoint"], trained["base"], versions, disk_margin=0.0, disk_margin_bytes=0)
        assert "staging folder was removed" in info.value.next_step
        assert _leftovers(versions) == ["v001"]  # no v002, no .staging-*
        assert (versions / "v001" / "model.safetensors").read_bytes() == b"old"


def test_an_existing_version_or_empty_folder_is_never_replaced(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    versions = tmp_path / "versions"
    (versions / "v001").mkdir(parents=True)  # the user's empty folder: a plain rename() would replace it
    (versions / "v002").mkdir()
    (versions / "v002" / "notes.txt").write_text("mine")
    # another process "takes" v001 and v002 between our look-up and our rename: we must move on to v003
    monkeypatch.setattr(merge_module, "_next_number", lambda folder: 1)
    version = safe_merge(trained["checkpoint"], trained["base"], versions)
    assert version.name == "v003"
    assert os.listdir(versions / "v001") == []
    assert (versions / "v002" / "notes.txt").read_text() == "mine"


def test_rename_never_replaces_an_empty_folder(tmp_path: Path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    with pytest.raises(FileExistsError):
        merge_module._rename_noreplace(src, dst)
    assert src.is_dir() and dst.is_dir()


def test_bad_adapter_folders_are_refused_naming_the_file(trained: dict[str, Path], tmp_path: Path):
    versions = tmp_path / "versions"
    with pytest.raises(CheckpointIntegrityError, match="not a folder"):
        safe_merge(tmp_path / "missing", trained["base"], versions)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointIntegrityError, match=r"adapter_config\.json not found") as info:
        safe_merge(empty, trained["base"], versions)
    assert info.value.where["file"] == str(empty / "adapter_config.json")
    broken = tmp_path / "broken"
    shutil.copytree(trained["checkpoint"], broken)
    (broken / "adapter_config.json").write_text('{\n  "r": 4,\n  "lora_alpha": \n')
    with pytest.raises(CheckpointIntegrityError, match="unreadable") as info:
        safe_merge(broken, trained["base"], versions)
    assert info.value.where["line"] == 4
    for crafted in ("[" * 5000 + "]" * 5000, '{"r": 4, "lora_alpha": 1e999}', "\ufeff\x00"):
        (broken / "adapter_config.json").write_text(crafted)
        with pytest.raises(CheckpointIntegrityError, match="unreadable") as info:
            safe_merge(broken, trained["base"], versions)
        assert info.value.where["file"] == str(broken / "adapter_config.json")
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "adapter_config.json")
    with pytest.raises(CheckpointIntegrityError, match="FIFO"):  # refused without blocking
        safe_merge(fifo, trained["base"], versions)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(trained["checkpoint"] / "adapter_config.json", no_weights)
    with pytest.raises(CheckpointIntegrityError, match="no weights"):
        safe_merge(no_weights, trained["base"], versions)
    with pytest.raises(CheckpointIntegrityError, match=r"no config\.json"):
        safe_merge(trained["checkpoint"], tmp_path, versions)
    assert _leftovers(versions) == []


def test_adapter_for_another_base_is_refused(trained: dict[str, Path], tmp_path: Path):
    other = tmp_path / "other-base"
    make_tiny_llama(hidden_size=48, intermediate_size=96).save_pretrained(other)
    versions = tmp_path / "versions"
    with pytest.raises(LoraConfigMismatchError, match="does not fit this base model"):
        safe_merge(trained["checkpoint"], other, versions)
    assert _leftovers(versions) == []


def test_safe_merge_example_runs(tmp_path: Path):
    result = run_python(str(REPO_ROOT / "examples" / "safe_merge.py"), str(tmp_path / "work"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "published" in result.stdout and "v001" in result.stdout
    assert "refused" in result.stdout and "weights did not change" in result.stdout
    assert (tmp_path / "work" / "versions" / "v001" / VERSION_METADATA).is_file()
