"""Dead adapters: LoRA/PEFT adapter parameters that receive no gradient, or whose zero-initialised matrices
(``lora_B``) are still exactly zero after the steps that should have moved them.

Both failures train for hours without a sign: the loss moves a little (a head or ``modules_to_save`` still learns),
nothing raises, and the saved adapter is a no-op. The usual causes: gradient checkpointing with
``use_reentrant=True`` while the model's inputs do not require grad (no ``model.enable_input_require_grads()``), a
learning rate of 0, gradients that are all zero, an adapter loaded frozen.

Everything here works on plain inputs: ``(name, tensor)`` pairs as ``model.named_parameters()`` yields them. Nothing
imports peft: an adapter parameter is recognised by its name (``...q_proj.lora_B.default.weight``).

Example::

    import torch
    from trainguard.checks.adapter import adapter_parameters, zero_parameters
    params = {"model.q_proj.lora_A.default.weight": torch.ones(2, 4),
              "model.q_proj.lora_B.default.weight": torch.zeros(4, 2)}
    found = adapter_parameters(params.items())
    assert [p.module for p in found] == ["model.q_proj", "model.q_proj"]
    assert zero_parameters(params.items(), [p.name for p in found]) == ["model.q_proj.lora_B.default.weight"]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import AdapterError

__all__ = [
    "ADAPTER_KEYS",
    "AdapterParam",
    "adapter_parameters",
    "dead_adapter_error",
    "is_peft_model",
    "module_list",
    "no_grad_parameters",
    "zero_parameters",
]

#: The name segments PEFT's LoRA layers give their parameters (followed by the adapter's name).
ADAPTER_KEYS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})

_SHOWN = 8


@dataclass(frozen=True)
class AdapterParam:
    """One adapter parameter: its full ``name``, the ``module`` it adapts, its ``kind`` (``lora_B``, ...) and the
    ``adapter`` it belongs to (``default``)."""

    name: str
    module: str
    kind: str
    adapter: str
    trainable: bool


def is_peft_model(model: Any) -> bool:
    """True when ``model`` carries PEFT adapters (a ``PeftModel``, or a transformers model with ``add_adapter``):
    it has a non-empty ``peft_config`` dict. Nothing is imported.

    Example::

        from trainguard.checks.adapter import is_peft_model
        assert not is_peft_model(object())
    """
    config = getattr(model, "peft_config", None)
    return isinstance(config, dict) and bool(config)


def _parse(name: str) -> tuple[str, str, str] | None:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in ADAPTER_KEYS and i + 1 < len(parts):
            return ".".join(parts[:i]), part, parts[i + 1]
    return None


def adapter_parameters(named: Iterable[tuple[str, Any]], adapters: Sequence[str] | None = None) -> list[AdapterParam]:
    """The adapter parameters among ``named`` (``model.named_parameters()``), in order.

    Args:
        named: ``(name, parameter)`` pairs.
        adapters: Keep only these adapters (the active ones); None keeps all.

    Example::

        import torch
        from trainguard.checks.adapter import adapter_parameters
        found = adapter_parameters([("m.v_proj.lora_A.other.weight", torch.zeros(1))], adapters=["default"])
        assert found == []
    """
    found = []
    for name, tensor in named:
        parsed = _parse(name)
        if parsed is None:
            continue
        module, kind, adapter = parsed
        if adapters is not None and adapter not in adapters:
            continue
        found.append(AdapterParam(name, module, kind, adapter, bool(getattr(tensor, "requires_grad", False))))
    return found


def no_grad_parameters(named: Iterable[tuple[str, Any]], names: Iterable[str]) -> list[str]:
    """Those of ``names`` whose parameter has no gradient (``.grad is None``). Reads no tensor: no device sync.

    Example::

        import torch
        from trainguard.checks.adapter import no_grad_parameters
        p = torch.nn.Parameter(torch.zeros(2))
        assert no_grad_parameters([("a.lora_A.default.weight", p)], ["a.lora_A.default.weight"]) == [
            "a.lora_A.default.weight"]
    """
    wanted = set(names)
    return [name for name, tensor in named if name in wanted and getattr(tensor, "grad", None) is None]


def zero_parameters(named: Iterable[tuple[str, Any]], names: Iterable[str]) -> list[str]:
    """Those of ``names`` whose parameter is exactly zero everywhere (empty tensors, as on a rank holding no shard,
    are left out). One device sync per device for all of them together.

    Example::

        import torch
        from trainguard.checks.adapter import zero_parameters
        named = [("a", torch.zeros(3)), ("b", torch.ones(3))]
        assert zero_parameters(named, ["a", "b"]) == ["a"]
    """
    import torch

    wanted = set(names)
    picked = [(name, tensor) for name, tensor in named if name in wanted and tensor.numel() > 0]
    by_device: dict[Any, list[tuple[str, Any]]] = {}
    for name, tensor in picked:
        by_device.setdefault(tensor.device, []).append((name, tensor))
    zero: set[str] = set()
    with torch.no_grad():
        for group in by_device.values():  # one sync per device (a model split over devices has several)
            flags = torch.stack([tensor.detach().ne(0).any() for _, tensor in group]).tolist()
            zero.update(name for (name, _), nonzero in zip(group, flags, strict=True) if not nonzero)
    return [name for name, _ in picked if name in zero]


def module_list(modules: Iterable[str], shown: int = _SHOWN) -> str:
    """Module names for a message: the ``base_model.model.`` prefix dropped, each once, at most ``shown`` of them.

    Example::

        from trainguard.checks.adapter import module_list
        assert module_list(["base_model.model.a", "base_model.model.a", "b"]) == "a, b"
    """
    unique = list(dict.fromkeys(m.removeprefix("base_model.model.") for m in modules))
    text = ", ".join(unique[:shown])
    return text + (f" and {len(unique) - shown} more" if len(unique) > shown else "")


def dead_adapter_error(
    problem: str,
    params: Sequence[AdapterParam],
    *,
    step: int,
    total: int,
    cause: str,
    next_step: str | None = None,
    where: dict[str, Any] | None = None,
    evidence: dict[str, Any] | None = None,
) -> AdapterError:
    """The :class:`~trainguard.AdapterError` for dead adapter parameters: what (``problem``: ``"received no
    gradient"`` or ``"are still all zero"``), which modules, the likely cause, and what to do.

    Args:
        problem: What is wrong with ``params``, as a predicate.
        params: The dead adapter parameters.
        step: The step being trained (counting from 1), or the step reached.
        total: How many adapter parameters are trained in all.
        cause: The likely cause, one sentence.
        next_step: What to do (default: :class:`~trainguard.AdapterError`'s).
        where: More locations (``rank``), after ``step`` and ``field``.
        evidence: Extra facts.

    Example::

        from trainguard.checks.adapter import AdapterParam, dead_adapter_error
        p = AdapterParam("m.q_proj.lora_B.default.weight", "m.q_proj", "lora_B", "default", True)
        err = dead_adapter_error("received no gradient", [p], step=1, total=2, cause="frozen upstream")
        assert "m.q_proj" in err.what
    """
    modules = [p.module for p in params]
    kinds = sorted({p.kind for p in params})
    adapters = sorted({p.adapter for p in params})
    what = (
        f"{len(params)} of {total} trained adapter parameter(s) ({'/'.join(kinds)}; adapter "
        f"{', '.join(repr(a) for a in adapters)}) {problem} at step {step}, in module(s) {module_list(modules)}: "
        f"likely cause: {cause}"
    )
    facts = {"parameters": [p.name for p in params], "modules": list(dict.fromkeys(modules)), "cause": cause}
    facts.update(evidence or {})
    located: dict[str, Any] = {"step": step, "field": "/".join(kinds)}
    located.update(where or {})
    return AdapterError(what, where=located, next_step=next_step, evidence=facts)
