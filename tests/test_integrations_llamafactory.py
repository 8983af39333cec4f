"""The LLaMA-Factory entry point: `trainguard-llamafactory train config.yaml` around LLaMA-Factory's real run_exp,
on a tiny offline model, on CPU.

The runs need LLaMA-Factory (the llamafactory venv of .ci/run) and skip elsewhere with the reason; reading the
`trainguard:` key needs only trainguard and runs everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trainguard.config import ConfigError
from trainguard.integrations.llamafactory import guards_for

from _rig import CORPUS, OFFLINE_ENV, make_tokenizer, tiny_llama_config

needs_llamafactory = pytest.mark.skipif(
    importlib.util.find_spec("llamafactory") is None,
    reason="LLaMA-Factory is not installed here (.ci/run tests it in its own venv)",
)

# The PyPI torchaudio wheel is a CUDA build: beside the CPU torch these venvs get from local disk its import fails
# (libc10_cuda.so), and LLaMA-Factory imports it unconditionally (data/mm_plugin.py) though a text run never uses
# it. .ci/run uninstalls it and puts this empty stand-in on the path; a user's CUDA install has the real one.
TORCHAUDIO_STANDIN = '"""Stand-in for the CUDA-only torchaudio wheel; text training never calls it."""\n'


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [n for n in os.environ if n.startswith("TRAINGUARD_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_trainguard_key_is_removed_and_turned_into_guards() -> None:
    args: dict[str, Any] = {"stage": "sft", "output_dir": "out", "trainguard": {"nan_guard": {"action": "stop"}}}
    guards = {g.guard_name: g for g in guards_for(args)}
    assert "trainguard" not in args  # LLaMA-Factory's parser refuses unknown keys
    assert guards["nan_guard"].action == "stop" and "hang_watchdog" in guards
    assert "auto_resume" in guards  # LLaMA-Factory resumes a non-empty output_dir by itself


def test_a_bad_trainguard_key_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="has no option 'actoin'") as err:
        guards_for({"trainguard": {"nan_guard": {"actoin": "stop"}}}, source="sft.yaml")
    assert err.value.where["field"] == "trainguard.nan_guard.actoin" and err.value.where["file"] == "sft.yaml"
    with pytest.raises(ConfigError, match="must be a mapping"):
        guards_for({"trainguard": ["nan_guard"]})


def test_a_named_checkpoint_is_not_redirected() -> None:
    guards = guards_for({"output_dir": "out", "resume_from_checkpoint": "out/checkpoint-2"})
    assert "auto_resume" not in {g.guard_name for g in guards}


# ------------------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a trained tokenizer (save_pretrained), two local datasets, and the torchaudio stand-in."""
    import torch
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("llamafactory")
    make_tokenizer().save_pretrained(root / "model")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(root / "model")
    data = root / "data"
    data.mkdir()
    (data / "a.json").write_text(json.dumps([{"text": t} for t in CORPUS * 4]))
    (data / "b.json").write_text(json.dumps([{"text": t[::-1]} for t in CORPUS * 4]))
    info = {name: {"file_name": f"{name}.json", "columns": {"prompt": "text"}} for name in ("a", "b")}
    (data / "dataset_info.json").write_text(json.dumps(info))
    (root / "stub" / "torchaudio").mkdir(parents=True)
    (root / "stub" / "torchaudio" / "__init__.py").write_text(TORCHAUDIO_STANDIN)
    return root


def write_yaml(folder: Path, workdir: Path, **extra: Any) -> Path:
    cfg: dict[str, Any] = {
        "model_name_or_path": str(workdir / "model"),
        "stage": "pt",
        "do_train": True,
        "finetuning_type": "full",
        "dataset": "a",
        "dataset_dir": str(workdir / "data"),
        "template": "empty",
        "cutoff_len": 16,
        "output_dir": str(folder / "out"),
        "per_device_train_batch_size": 2,
        "max_steps": 4,
        "save_steps": 2,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
    }
    cfg.update(extra)
    path = folder / "config.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def trainguard_llamafactory(
    config: Path, workdir: Path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The console script, as a user runs it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TRAINGUARD_")}
    environ.update(OFFLINE_ENV)
    environ.update({"DISABLE_VERSION_CHECK": "1", "CUDA_VISIBLE_DEVICES": ""})
    environ.update(env or {})
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(workdir / "stub"), environ.get("PYTHONPATH")]))
    script = Path(sys.executable).with_name("trainguard-llamafactory")
    return subprocess.run(
        [str(script), "train", str(config), *argv],
        cwd=config.parent,
        env=environ,
        capture_output=True,
        text=True,
        timeout=540,
    )


@needs_llamafactory
@pytest.mark.llamafactory
@pytest.mark.slow
def test_yaml_run_attaches_the_guards_and_a_changed_dataset_is_refused_on_resume(tmp_path: Path, workdir: Path) -> None:
    config = write_yaml(tmp_path, workdir, trainguard={"crash_loop_guard": False})
    run = trainguard_llamafactory(config, workdir)
    assert run.returncode == 0, run.stderr[-4000:]
    out = tmp_path / "out"
    for step in (2, 4):
        assert (out / f"checkpoint-{step}" / "trainguard-manifest.json").is_file()
    assert not (out / "trainguard-crashes.jsonl").exists()  # the YAML's crash_loop_guard: false

    # Same output_dir, other data: LLaMA-Factory resumes checkpoint-4 on its own; the dataset guard refuses.
    run = trainguard_llamafactory(config, workdir, "dataset=b", "max_steps=6")
    assert run.returncode != 0
    assert "DatasetMismatchError" in run.stderr, run.stderr[-4000:]
    assert not (out / "checkpoint-6").exists()
    events = [json.loads(line) for line in (out / "trainguard-events.jsonl").read_text().splitlines()]
    assert any(e["guard"] == "auto_resume" and "checkpoint-4" in e["message"] for e in events)


@needs_llamafactory
@pytest.mark.llamafactory
@pytest.mark.slow
def test_kill_switch_runs_llamafactory_without_guards(tmp_path: Path, workdir: Path) -> None:
    config = write_yaml(tmp_path, workdir, max_steps=2, trainguard={"nan_guard": {"action": "stop"}})
    run = trainguard_llamafactory(config, workdir, env={"TRAINGUARD_DISABLE": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    assert not (tmp_path / "out" / "checkpoint-2" / "trainguard-manifest.json").exists()


def test_the_command_without_train_and_a_config_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    from trainguard.integrations.llamafactory import main

    assert main(["export", "config.yaml"]) == 2
    assert "usage: trainguard-llamafactory train CONFIG" in capsys.readouterr().err
    assert main(["--help"]) == 0
