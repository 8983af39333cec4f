"""The checks that need CUDA, as one script for a machine with a GPU (``tests/gpu/run_gpu_checks.sh``).

The test suite runs on CPU; these are the paths it can only stand in for there. Each check prints one ``CHECK``
line (``ok``, ``FAILED`` or ``skipped``, with the evidence) and the script exits 1 when any failed. It needs torch,
transformers, accelerate, safetensors, filelock, psutil, rich and xxhash (no ``datasets``, no downloads), and
``src/`` on ``PYTHONPATH``. About two minutes on one GPU.

1. NanGuard on CUDA in bf16 and fp16: a clean step makes no host-device synchronisation (CUDA's sync debug mode set
   to raise); a NaN at step 6 is detected one step late (the asynchronous read), the run stops, no checkpoint of the
   bad state is written; an inf gradient under fp16's GradScaler is a skipped step, not an alarm.
2. The save audit and the resume attestation on CUDA: a save is audited clean, and a resume of the same run finds
   nothing (the CUDA RNG state is part of the digest) while ``ignore_data_skip=True`` is named.
3. The memory pre-flight's GPU summary, and ``all_guards()`` training, saving and resuming on the GPU.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import trainguard

RESULTS: list[dict[str, Any]] = []
#: ``TRAINGUARD_GPU_CHECKS_ON_CPU=1`` runs the script's logic on the CPU (bf16 only, no sync check): to test the
#: script itself before spending GPU time on it.
ON_CPU = os.environ.get("TRAINGUARD_GPU_CHECKS_ON_CPU") == "1"


class Rows(Dataset):
    """Random token rows with labels; a map-style dataset without the ``datasets`` package."""

    def __init__(self, n: int = 64, seq: int = 32, vocab: int = 256, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def model(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
              "attention_dropout": 0.1, **overrides}  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**config))


def trainer(out: Path, callbacks: list[Any], m: Any = None, **args: Any) -> Trainer:
    settings = {"use_cpu": ON_CPU, "output_dir": str(out), "per_device_train_batch_size": 4, "max_steps": 8,
                "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "steps", "save_steps": 4,
                "report_to": "none", "dataloader_num_workers": 0, "disable_tqdm": True, "seed": 0, **args}  # fmt: skip
    return Trainer(model=m if m is not None else model(), args=TrainingArguments(**settings), train_dataset=Rows(),
                   callbacks=callbacks)  # fmt: skip


def check(name: str) -> Callable[[Callable[[Path], str]], None]:
    def run(fn: Callable[[Path], str]) -> None:
        began = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"trainguard-gpu-{name}-") as tmp:
            try:
                status, evidence = "ok", fn(Path(tmp))
            except _Skip as skip:
                status, evidence = "skipped", str(skip)
            except Exception as err:
                status, evidence = "FAILED", f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"
        RESULTS.append({"check": name, "status": status, "evidence": evidence,
                        "seconds": round(time.monotonic() - began, 1)})  # fmt: skip
        print(f"CHECK {name}: {status} ({time.monotonic() - began:.1f} s): {evidence}", flush=True)

    return run


class _Skip(Exception):
    pass


class NanAt(TrainerCallback):
    """A NaN in the logits of the forward of optimizer step ``step`` (1-based)."""

    def __init__(self, m: Any, step: int) -> None:
        self.step, self.current = step, 0
        m.lm_head.register_forward_hook(lambda mod, i, out: out * float("nan") if self.current == self.step else out)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.current = state.global_step + 1


class NoSyncWhenClean(TrainerCallback):
    """Raises on any host-device synchronisation between on_step_begin and on_step_end of clean steps 3 and 4."""

    def __init__(self) -> None:
        self.checked = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step in (2, 3):
            self.armed = True
            if not ON_CPU:
                torch.cuda.set_sync_debug_mode("error")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if getattr(self, "armed", False):
            self.armed = False
            if not ON_CPU:
                torch.cuda.set_sync_debug_mode("default")
            self.checked += 1


def main() -> int:
    if not torch.cuda.is_available() and not ON_CPU:
        print("CHECK all: skipped (no CUDA device here)")
        return 0
    print(f"GPU {torch.cuda.get_device_name(0) if not ON_CPU else 'none (CPU dry run)'}; torch {torch.__version__}; "
          f"transformers {__import__('transformers').__version__}", flush=True)  # fmt: skip

    for precision in ("bf16",) if ON_CPU else ("bf16", "fp16"):

        @check(f"nan_guard_{precision}")
        def nan_guard(tmp: Path, precision: str = precision) -> str:
            # The clean steps: NanGuard's flags stay on the device, read one step late, never a sync in the step.
            guard, probe = trainguard.NanGuard(), NoSyncWhenClean()
            t = trainer(tmp / "clean", [guard, probe], max_steps=6, save_strategy="no", **{precision: True})
            t.train()
            assert probe.checked == 2, f"sync checked on {probe.checked} steps"
            assert guard.tripped is None, guard.summary()
            # A NaN at step 6: detected (at step 6 or 7), stopped, nothing poisoned saved.
            m = model()
            nan = NanAt(m, 6)
            guard = trainguard.NanGuard(action="stop")
            t = trainer(tmp / "nan", [guard, nan], m=m, max_steps=12, save_steps=4, **{precision: True})
            t.train()
            assert guard.tripped is not None and guard.tripped.step == 6, guard.summary()
            saved = sorted(int(p.name.split("-")[1]) for p in (tmp / "nan").glob("checkpoint-*"))
            assert saved == [4], saved
            return f"no sync on 2 clean steps; NaN at step 6 stopped at step {t.state.global_step}; saved {saved}"

    @check("nan_guard_fp16_scaler_skip")
    def scaler_skip(tmp: Path) -> str:
        if ON_CPU:
            raise _Skip("fp16 needs CUDA")

        class InfGrad(TrainerCallback):
            def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
                if state.global_step + 1 == 3:
                    next(model.parameters()).grad.fill_(float("inf"))

        guard = trainguard.NanGuard()
        t = trainer(tmp, [guard, InfGrad()], max_steps=6, save_strategy="no", fp16=True, optim="adamw_torch")
        t.train()
        assert guard.tripped is None, guard.summary()
        return guard.summary()

    @check("save_audit_and_attestation_cuda")
    def attestation(tmp: Path) -> str:
        verifier = trainguard.CheckpointVerifier()
        trainer(tmp, [verifier], max_steps=8, bf16=True).train()
        assert "2 save(s) audited" in verifier.summary() and "hollow" not in verifier.summary(), verifier.summary()
        findings = []
        for extra in ({}, {"ignore_data_skip": True}):
            v = trainguard.CheckpointVerifier()
            trainer(tmp, [v], max_steps=8, bf16=True, **extra).train(resume_from_checkpoint=str(tmp / "checkpoint-4"))
            findings.append([(f.level, f.what[:60]) for f in v._auditor.findings])
        assert findings[0] == [], findings[0]
        assert any("first batch" in what for _, what in findings[1]), findings[1]
        return f"clean resume: no finding; ignore_data_skip: {findings[1]}"

    @check("all_guards_cuda")
    def all_guards(tmp: Path) -> str:
        t = trainer(tmp, trainguard.all_guards(hang_watchdog={"floor": 60}), max_steps=8, bf16=True)
        t.train()
        t = trainer(tmp, trainguard.all_guards(hang_watchdog={"floor": 60}), max_steps=12, bf16=True)
        t.train(resume_from_checkpoint=True)
        summaries = {type(g).__name__: g.summary() for g in t.callback_handler.callbacks if hasattr(g, "guard_name")}
        gpus = trainguard.check_memory(raise_error=False).gpus
        assert ON_CPU or (gpus and gpus[0]["total"] > 0), gpus
        return f"resumed to step {t.state.global_step}; gpus: {gpus}; {json.dumps(summaries)[:700]}"

    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_checks.json").write_text(json.dumps(RESULTS, indent=2))
    failed = [r["check"] for r in RESULTS if r["status"] == "FAILED"]
    print(
        f"SUMMARY {len(RESULTS) - len(failed)}/{len(RESULTS)} ok" + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
