"""The axolotl plugin, through axolotl's real `axolotl train` command on a tiny offline model, on CPU.

Runs only where axolotl is installed (the axolotl venv of .ci/run); elsewhere every test skips with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from _rig import CORPUS, OFFLINE_ENV, make_tokenizer, tiny_llama_config

pytest.importorskip("axolotl", reason="axolotl is not installed here (.ci/run tests it in its own venv)")

pytestmark = [pytest.mark.axolotl, pytest.mark.slow]

PLUGIN = "trainguard.integrations.axolotl.TrainguardPlugin"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama and a tokenizer trained here, saved with save_pretrained: what `base_model:` points at."""
    import torch
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("axolotl-model")
    make_tokenizer().save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    return folder


def write_config(tmp_path: Path, model_dir: Path, *, rows: list[str] | None = None, **extra: Any) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in (rows or CORPUS * 4)))
    cfg: dict[str, Any] = {
        "base_model": str(model_dir),
        "model_type": "AutoModelForCausalLM",
        "tokenizer_type": "AutoTokenizer",
        "datasets": [{"path": str(data), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "val_set_size": 0,
        "sequence_len": 32,
        "sample_packing": False,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 4,
        "save_steps": 2,
        "logging_steps": 1,
        "learning_rate": 0.001,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "output_dir": str(tmp_path / "out"),
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "flash_attention": False,
        "sdp_attention": False,
        "use_cpu": True,
        "plugins": [PLUGIN],
    }
    cfg.update(extra)
    path = tmp_path / "config.yml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def axolotl_train(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`axolotl train CONFIG --launcher python`, the command a YAML-only user runs, in a clean environment."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TRAINGUARD_")}
    environ.update(OFFLINE_ENV)
    environ.update({"AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "CUDA_VISIBLE_DEVICES": ""})
    environ.update(env)
    axolotl = Path(sys.executable).with_name("axolotl")
    return subprocess.run(
        [str(axolotl), "train", str(config), "--launcher", "python"],
        cwd=config.parent,
        env=environ,
        capture_output=True,
        text=True,
        timeout=540,
    )


def test_yaml_plugin_attaches_the_guards_with_the_yaml_options(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir, trainguard={"crash_loop_guard": False})
    run = axolotl_train(config)
    assert run.returncode == 0, run.stderr[-4000:]
    out = tmp_path / "out"
    for step in (2, 4):
        manifest = json.loads((out / f"checkpoint-{step}" / "trainguard-manifest.json").read_text())
        assert "model.safetensors" in json.dumps(manifest)
    assert (out / "trainguard-checkpoints.json").is_file()
    assert not (out / "trainguard-crashes.jsonl").exists()  # the YAML's crash_loop_guard: false


def test_auto_resume_skips_a_damaged_newest_checkpoint_and_sets_it_aside(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir, auto_resume_from_checkpoints=True)
    assert axolotl_train(config).returncode == 0
    out = tmp_path / "out"
    weights = out / "checkpoint-4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))

    config = write_config(tmp_path, tiny_model_dir, auto_resume_from_checkpoints=True, max_steps=6)
    run = axolotl_train(config)
    assert run.returncode == 0, run.stderr[-4000:]
    events = [json.loads(line) for line in (out / "trainguard-events.jsonl").read_text().splitlines()]
    assert any(e["guard"] == "auto_resume" and "picked checkpoint-4" in e["message"] for e in events), events
    verifier = [e for e in events if e["guard"] == "checkpoint_verifier"]
    assert any("checkpoint-4 failed verification, set aside" in e["message"] for e in verifier), verifier
    # max_steps changed from 4 to 6 on a constant schedule: nothing the run uses changed, so the resume attestation
    # has nothing to say; whatever it says, it says at the step the run resumed from.
    assert {e["step"] for e in verifier if "attestation" in e["message"]} <= {2}, verifier
    assert (out / "checkpoint-6" / "trainguard-manifest.json").is_file()
    set_aside = list((out / "trainguard-quarantine").glob("checkpoint-4*"))
    assert set_aside, sorted(str(p.relative_to(out)) for p in out.rglob("*"))  # the damaged folder, kept
    # Resumed after step 2: step 4 was trained again and saved anew, next to the damaged copy set aside.
    assert (out / "checkpoint-4" / "trainguard-manifest.json").is_file()


def test_a_misspelt_guard_in_the_yaml_is_refused_before_anything_loads(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir, trainguard={"nan_gaurd": {"action": "stop"}})
    run = axolotl_train(config)
    assert run.returncode != 0
    assert "nan_gaurd" in run.stderr + run.stdout and "is neither a trainguard guard" in run.stderr + run.stdout
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_kill_switch_runs_axolotl_without_guards(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir, max_steps=2)
    run = axolotl_train(config, TRAINGUARD_DISABLE="1")
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    assert not (tmp_path / "out" / "checkpoint-2" / "trainguard-manifest.json").exists()
    assert "trainguard is disabled" in run.stdout + run.stderr


def test_plugin_takes_sigint_for_graceful_stop_unless_the_yaml_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from axolotl.utils.dict import DictDefault

    from trainguard.integrations.axolotl import TrainguardPlugin

    for name in [n for n in os.environ if n.startswith("TRAINGUARD_")]:
        monkeypatch.delenv(name)
    plugin = TrainguardPlugin()
    guards = plugin.add_callbacks_pre_trainer(DictDefault({"output_dir": "out"}), model=None)
    stop = next(g for g in guards if g.guard_name == "graceful_stop")
    assert signal.SIGINT in stop.signals
    cfg = DictDefault({"output_dir": "out", "trainguard": {"graceful_stop": {"signals": ["SIGTERM"]}}})
    stop = next(g for g in plugin.add_callbacks_pre_trainer(cfg, model=None) if g.guard_name == "graceful_stop")
    assert signal.SIGINT not in stop.signals


def test_ctrl_c_during_training_leaves_a_verified_checkpoint_instead_of_bare_weights(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    import signal
    import time

    config = write_config(tmp_path, tiny_model_dir, max_steps=5000, save_steps=10000)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TRAINGUARD_")}
    environ.update(OFFLINE_ENV)
    environ.update({"AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "CUDA_VISIBLE_DEVICES": ""})
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("axolotl")), "train", str(config), "--launcher", "python"],
        cwd=tmp_path,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + 400
    while b"'loss'" not in seen and proc.poll() is None and time.monotonic() < deadline:
        seen += proc.stdout.read1(65536)  # the first logged loss: training (and GracefulStop's handler) is on
    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
        pytest.fail("axolotl did not exit within 240 s of SIGINT:\n" + (seen + rest).decode(errors="replace")[-4000:])
    seen += rest
    out = tmp_path / "out"
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, seen.decode(errors="replace")[-4000:]
    step = int(checkpoints[0].name.split("-")[1])
    assert 1 <= step < 5000
    for name in ("trainguard-manifest.json", "optimizer.pt", "scheduler.pt", "model.safetensors"):
        assert (checkpoints[0] / name).is_file(), name
