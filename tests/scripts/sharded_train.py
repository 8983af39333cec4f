"""Run under torchrun (gloo, CPU): the real Trainer on a sharded engine, with every trainguard guard.

    sharded_train.py OUTPUT_DIR REPORT_DIR --layout LAYOUT [--scenarios train,resume,damage,nan_loss,nan_weights]
        [--damage SPEC] [--save-on-each-node] [--no-shim] [--guards all|verifier|none]

LAYOUT: see ``tests/_engines.py``. Scenarios, in order, in one launch (a launch costs more than a run):

Every run is planned for 8 steps with a save every 2; a job cut short stops after its save:

- ``train``: stops after step 4 (checkpoint-2, checkpoint-4).
- ``resume``: ``resume_from_checkpoint=True``, stops after step 6 (lands on checkpoint-4, saves checkpoint-6).
- ``damage``: rank 0 (``--damage-rank``) damages checkpoint-6 of its OUTPUT_DIR as SPEC says (``flip:REL`` a
  byte in the middle of REL, ``truncate:REL`` to half, ``delete:REL``, ``latest:TEXT`` rewrites DeepSpeed's
  ``latest``), then every rank resumes with
  ``resume_from_checkpoint=True`` and trains to step 8: all must fall back to checkpoint-4 together.
- ``locked``: a Trainer on OUTPUT_DIR_locked, which a process outside the job holds the RunLock of: every rank must
  be refused at ``Trainer(...)``.
- ``cross``: resume checkpoint-4 of OUTPUT_DIR, written by another layout's launch: every rank must refuse
  before anything loads.
- ``lora``, ``lora_alpha``, ``lora_same``: a LoRA run (PEFT) cut short after step 4, resumed with another
  ``lora_alpha`` (every rank must refuse before anything loads), then with the same config (it must resume).
- ``nan_loss``: a fresh folder; rank 1's forward produces NaN at step 3.
- ``nan_weights``: a fresh folder; just before the save at step 2, the last rank (rank 1) puts a NaN into its local
  shard of one weight (FSDP2: a DTensor's local part; ZeRO-3: its partition).

Each scenario of each rank appends one JSON line to REPORT_DIR/rank{r}.jsonl: the step where training began, the
optimizer's own step count there (the ground truth of a resume), what the run really trained with, every guard's
summary and every alert line, or the error it raised.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import trainguard
from trainguard import distributed
from trainguard.alerts import get_logger

import _engines
from _rig import exit_worker, make_lm_dataset, make_tiny_llama, training_args


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def optimizer_step(trainer: Any) -> float | None:
    """The optimizer's own step count (any parameter's ``step``), read independently of trainguard."""
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)
    for state in getattr(inner, "state", {}).values():
        if isinstance(state, dict) and "step" in state:
            return float(state["step"])
    return None


def local_part(param: Any) -> Any:
    if hasattr(param, "to_local"):
        return param.to_local()
    if getattr(param, "ds_tensor", None) is not None and param.numel() == 0:
        return param.ds_tensor
    return param


def make_witness(
    holder: dict[str, Any], record: dict[str, Any], *, stop_at: int | None = None, nan_weights: bool = False
) -> Any:
    """A callback placed before the guards: it records the ground truth, and poisons a weight for ``nan_weights``."""
    from transformers import TrainerCallback

    class Witness(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if "first_step" not in record:
                record["first_step"] = int(state.global_step)
                record["optimizer_step_at_first"] = optimizer_step(holder["trainer"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step == stop_at:
                control.should_training_stop = True  # a job cut short after its save: the next one resumes
            if nan_weights and distributed.rank() == distributed.world_size() - 1 and state.global_step == 2:
                import torch

                for name, param in holder["trainer"].model_wrapped.named_parameters():
                    part = local_part(param)
                    if part.numel() > 0 and part.is_floating_point():
                        with torch.no_grad():
                            part.view(-1)[0] = float("nan")
                        record["poisoned"] = name
                        break

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
            if logs and "loss" in logs:
                record.setdefault("losses", []).append(float(logs["loss"]))

    return Witness()


def weights_finite(trainer: Any) -> bool:
    """Every weight this rank holds is finite (its shard, for sharded engines)."""
    import torch

    return all(bool(torch.isfinite(local_part(p)).all()) for p in trainer.model_wrapped.parameters())


def nan_forward_on_rank1(model: Any, at_call: int = 3) -> None:
    calls = [0]

    def hook(module: Any, inputs: Any, output: Any) -> Any:
        if not module.training:
            return output
        calls[0] += 1
        return (
            output * float("nan")
            if distributed.rank() == distributed.world_size() - 1 and calls[0] == at_call
            else output
        )

    model.lm_head.register_forward_hook(hook)


def damage(folder: Path, spec: str) -> None:
    how, _, rel = spec.partition(":")
    target = folder / rel
    if how == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif how == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif how == "delete":
        target.unlink()
    elif how == "latest":
        (folder / "latest").write_text(rel)
    else:
        raise SystemExit(f"unknown damage {spec!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("report_dir")
    parser.add_argument("--layout", choices=_engines.LAYOUTS, required=True)
    parser.add_argument("--scenarios", default="train,resume")
    parser.add_argument("--damage", default="")
    parser.add_argument("--damage-rank", type=int, default=0, help="the rank that damages its own OUTPUT_DIR")
    parser.add_argument("--guards", default="all")
    parser.add_argument("--save-on-each-node", action="store_true")
    parser.add_argument("--no-shim", action="store_true")
    opts = parser.parse_args()
    _engines.prepare(opts.layout, shim=not opts.no_shim)
    from transformers import Trainer

    lines = Lines()
    get_logger().addHandler(lines)
    report = Path(opts.report_dir) / f"rank{distributed.rank()}.jsonl"
    output_dir = Path(opts.output_dir)
    for scenario in opts.scenarios.split(","):
        lines.lines.clear()
        out, stop_at = output_dir, {"train": 4, "resume": 6}.get(scenario)
        resume: Any = True if scenario in ("resume", "damage") else None
        engine = _engines.engine_args(opts.layout)
        if scenario == "cross":  # checkpoint-4 of OUTPUT_DIR, written by another engine (a launch keeps its engine)
            resume = str(out / "checkpoint-4")
        if scenario.startswith("nan_") or scenario == "locked":
            out = output_dir.parent / f"{output_dir.name}_{scenario}"
        if scenario.startswith("lora"):  # a LoRA run cut short at step 4, resumed with another alpha, then the same
            out = output_dir.parent / f"{output_dir.name}_lora"
            stop_at, resume = (4, None) if scenario == "lora" else (None, True)
        if scenario == "damage":
            if distributed.rank() == opts.damage_rank:
                damage(out / "checkpoint-6", opts.damage)
            distributed.barrier()
        guards = {"all": trainguard.all_guards, "verifier": lambda: [trainguard.CheckpointVerifier()], "none": list}[
            opts.guards
        ]()
        args = training_args(
            out,
            max_steps=8,
            save_strategy="steps",
            save_steps=2,
            save_on_each_node=opts.save_on_each_node,
            **engine,
        )
        model = make_tiny_llama()
        if scenario.startswith("lora"):
            from peft import LoraConfig, get_peft_model

            alpha = 32 if scenario == "lora_alpha" else 16
            config = LoraConfig(r=8, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
            model = get_peft_model(model, config)
        if scenario == "nan_loss":
            nan_forward_on_rank1(model)
        record: dict[str, Any] = {"scenario": scenario, "layout": opts.layout, "rank": distributed.rank()}
        holder: dict[str, Any] = {}
        witness = make_witness(holder, record, stop_at=stop_at, nan_weights=scenario == "nan_weights")
        trainer = None
        try:
            trainer = Trainer(model=model, args=args, train_dataset=make_lm_dataset(), callbacks=[witness, *guards])
            holder["trainer"] = trainer
            trainer.train(resume_from_checkpoint=resume)
            record["raised"] = None
        except BaseException as err:  # DCP's CheckpointException is not an Exception
            record["raised"] = type(err).__name__
            record["what"] = getattr(err, "what", str(err))[:2000]
            record["where"] = getattr(err, "where", None)
            record["trace"] = traceback.format_exc()[-3000:]
        preflight = next((g for g in guards if isinstance(g, trainguard.PreflightGuard)), None)
        if trainer is not None:
            record.update(
                global_step=trainer.state.global_step,
                distributed_type=str(trainer.accelerator.state.distributed_type),
                fsdp=bool(trainer.is_fsdp_enabled),
                deepspeed=bool(trainer.is_deepspeed_enabled),
                weights_finite=weights_finite(trainer),
            )
        record.update(
            summaries={g.guard_name: g.summary() for g in guards},
            alerts=[line for line in lines.lines if line.startswith("[")],
            estimate=preflight.estimate.to_dict() if preflight is not None and preflight.estimate else None,
        )
        with open(report, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
        distributed.barrier()
    sys.stdout.flush()
    exit_worker()


if __name__ == "__main__":
    main()
