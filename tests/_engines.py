"""Sharded engines on this CPU machine: the Trainer arguments of each layout, and what it takes to run them here.

Layouts: ``fsdp1_sharded``, ``fsdp1_full``, ``fsdp2_sharded``, ``fsdp2_full``, ``zero2``, ``zero3``, ``ddp``.

FSDP on CPU needs a shim (accelerate 1.15 silently trains DDP when ``use_cpu=True``; see
``shared/research/sharded_on_cpu.md``): it sets the FSDP distributed type where accelerate only does so for GPUs,
and turns off ``offload_to_cpu`` for FSDP1's full state dict (which segfaults on CPU). DeepSpeed needs
``DS_ACCELERATOR=cpu`` and falls back to gloo by itself.

A script run with ``TRAINGUARD_TEST_ENGINE=<layout>`` in its environment gets the layout from
:func:`_rig.training_args` (shim included), so a guard's distributed scenario runs unchanged on an engine.
"""

from __future__ import annotations

import os
from typing import Any

LAYOUTS = ("fsdp1_sharded", "fsdp1_full", "fsdp2_sharded", "fsdp2_full", "zero2", "zero3", "ddp")
ENGINE_ENV = "TRAINGUARD_TEST_ENGINE"
_shimmed = False


def engine_args(layout: str) -> dict[str, Any]:
    """``TrainingArguments`` overrides that make the Trainer use ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    if layout.startswith("fsdp"):
        version = int(layout[4])
        config: dict[str, Any] = {
            "version": version,
            "state_dict_type": "SHARDED_STATE_DICT" if layout.endswith("sharded") else "FULL_STATE_DICT",
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        }
        if version == 1:
            config["sync_module_states"] = "false"  # the sync looks for a GPU
        return {"fsdp": "full_shard auto_wrap", "fsdp_config": config}
    if layout.startswith("zero"):
        zero: dict[str, Any] = {"stage": int(layout[4])}
        if zero["stage"] == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        return {
            "deepspeed": {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto",
                "gradient_clipping": "auto",
                "zero_optimization": zero,
                "bf16": {"enabled": False},
                "fp16": {"enabled": False},
            }
        }
    return {}


def prepare(layout: str, *, shim: bool = True) -> None:
    """Set up this process for ``layout`` (before the Trainer is built): the environment, and the FSDP shim."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")  # FSDP1: "cpu" vs "cpu:0" device_id mismatch otherwise
    if layout.startswith("fsdp") and shim:
        install_cpu_fsdp_shim()


def install_cpu_fsdp_shim() -> None:
    """Make accelerate keep FSDP on CPU (it drops it silently for MULTI_CPU), and FSDP1's full state dict work."""
    global _shimmed
    if _shimmed:
        return
    _shimmed = True
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = init  # type: ignore[method-assign]
    import torch.distributed.fsdp as fsdp

    fsdp.FullStateDictConfig.offload_to_cpu = property(lambda self: False, lambda self, value: None)  # type: ignore


def from_env() -> dict[str, Any]:
    """The engine overrides named by ``TRAINGUARD_TEST_ENGINE`` (prepared), or none."""
    layout = os.environ.get(ENGINE_ENV)
    if not layout:
        return {}
    prepare(layout)
    return engine_args(layout)


def have_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None
