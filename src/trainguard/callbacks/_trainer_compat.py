"""The one seam between trainguard and the Trainer's internals: the only module that touches a private Trainer
attribute, wraps a Trainer method, or recognises a Trainer class by anything but its public API.

What goes through it, and why there is no public way:

- :func:`find_trainer`: callback events are not given the Trainer; ``on_init_end`` fires from ``Trainer.__init__``,
  so the instance is ``self`` a few frames up.
- :func:`install_checkpoint_hooks`: no "a save begins" event, no event for saves that bypass ``on_save`` (JIT
  checkpoints), and rotation happens inside the save: wraps ``_save_checkpoint``, and routes rotation
  (``rotate_checkpoints``/``sort_checkpoints`` of ``transformers.trainer`` on 5.x; ``_rotate_checkpoints``/
  ``_sorted_checkpoints`` on 4.x).
- :func:`install_step_hooks`: the raw loss of every micro-batch and the gradient norm the Trainer computes are not
  passed to any event: wraps ``training_step`` and ``_get_grad_norm`` (5.x) or ``accelerator.clip_grad_norm_`` (4.x).
- :func:`set_train_batch_size`: ``Trainer.__init__`` copies the batch size to ``_train_batch_size``, which
  ``train()`` builds its dataloader from.
- :func:`is_jit_sigterm_handler`: whether a SIGTERM handler is transformers' JIT checkpointing (5.x).
- :func:`load_checkpoint_weights`: load a checkpoint's weights the way a resume does (sharded, PEFT, FSDP layouts):
  ``_load_from_checkpoint``.
- :func:`save_spec`: what a save of the live run must hold, as ``save_pretrained`` will write it (5.x: the tie
  removal of ``transformers.modeling_utils.remove_tied_weights_from_state_dict``, which also raises the first-save
  "shared tensors" crash in advance; 4.x: storage-sharing names dropped), under the names and shapes it writes them
  (5.x: ``transformers.core_model_loading.revert_weight_conversion`` replayed on meta tensors; 4.52+: the model's
  ``_checkpoint_conversion_mapping`` reversed).
- :func:`resume_facts`: the run's step, optimizer step count, learning rates and the settings that define them.
- :func:`install_upload_filter`: the Trainer's Hub uploads (``push_to_hub``, and ``_push_from_checkpoint`` after each
  save) pass a fixed ``ignore_patterns`` to ``upload_folder`` with no option to add to it, and ``upload_folder`` reads
  no ``.gitignore``: routes ``transformers.trainer.hf_api`` (5.x) or ``upload_folder`` (4.x) while they run.

Every touch is:

- **instance-scoped**: wrappers are set on the trainer instance, never on the class. Module functions are replaced
  once per process by a dispatcher that calls the original unless the *current thread* is inside a guarded call of a
  trainer (a :class:`contextvars.ContextVar`), so two Trainers in one process never see each other's routing;
- **gated** on what the installed transformers has; what is missing is returned by name so the guard can log
  which of its features is off.

Example::

    missing = install_checkpoint_hooks(trainer, trainguard.CheckpointVerifier())   # [] on transformers 5.24
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, Protocol

from .._util import feature_off
from ..checks._layout import CheckpointLayout
from ._patches import PatchHandle, process_patches, routing
from ._patches import install_dispatcher as _install_dispatcher

__all__ = [
    "CheckpointHooks",
    "PatchHandle",
    "as_saved",
    "engine_layout",
    "engine_name",
    "find_trainer",
    "install_checkpoint_hooks",
    "install_step_hooks",
    "install_upload_filter",
    "is_jit_sigterm_handler",
    "load_checkpoint_weights",
    "output_dir_for",
    "process_patches",
    "resume_facts",
    "routing",
    "save_spec",
    "set_callback_order",
    "set_train_batch_size",
    "weights_on_rank0_only",
    "wrap_train",
    "zero_stage",
]

_MARK = "_trainguard_checkpoint_hooks"


class CheckpointHooks(Protocol):
    """What a guard implements to be called around the Trainer's saves and rotation."""

    def before_save(self, trainer: Any, run_dir: str) -> bool:
        """On every rank, before the Trainer writes anything; False skips this save on every rank."""
        ...

    def after_save(self, trainer: Any, run_dir: str) -> None:
        """On every rank, after the Trainer's save returned (before ``on_save``, which bypassing saves never get)."""
        ...

    def rotate(self, run_dir: str, limit: int | None, best: str | None) -> None:
        """Instead of the Trainer's ``save_total_limit`` rotation inside a save."""
        ...

    def end_of_training_candidates(self, run_dir: str, best: str | None) -> list[str]:
        """The checkpoints the Trainer's end-of-training cleanup (``save_total_limit=1`` with a best checkpoint) may
        delete, besides the best one."""
        ...


def output_dir_for(trainer: Any, trial: Any = None) -> str:
    """Where this trainer writes ``checkpoint-N`` folders (a hyper-parameter search trial has its own): for
    ``trial`` None, the trial the trainer runs now (``hyperparameter_search`` keeps it as ``trainer._trial``)."""
    if trial is None:
        trial = getattr(trainer, "_trial", None)
    get = getattr(trainer, "_get_output_dir", None)
    if callable(get):
        with contextlib.suppress(Exception):
            return str(get(trial=trial))
    return str(trainer.args.output_dir)


def checkpoint_layout(trainer: Any, args: Any = None) -> CheckpointLayout:
    """The ``checkpoint-N`` folders of ``trainer``'s run now (:func:`output_dir_for`: a search trial's own run
    folder); of ``args.output_dir`` when the trainer is not known (a callback used without ``on_init_end``)."""
    if trainer is None:
        return CheckpointLayout(str(args.output_dir))
    return CheckpointLayout(output_dir_for(trainer))


def _bind(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], needed: tuple[str, ...], feature: str
) -> dict[str, Any] | None:
    """The arguments of a call of ``fn``, by its real signature (``inspect.signature(fn).bind``), or None when the
    call does not fit it or the signature lacks a name in ``needed``: the transformers release changed the
    function, so ``feature`` is off for this call (said once in the log) instead of reading the wrong argument."""
    try:
        signature = inspect.signature(fn)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError) as err:
        feature_off(f"{getattr(fn, '__qualname__', fn)!s} takes other arguments than expected ({err})", feature)
        return None
    lacking = [name for name in needed if name not in signature.parameters]
    if lacking:
        feature_off(f"{getattr(fn, '__qualname__', fn)!s} has no argument {', '.join(lacking)}", feature)
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


_ROTATE_ARGS = ("output_dir", "save_total_limit", "best_model_checkpoint")
_SORT_ARGS = ("output_dir", "best_model_checkpoint")


def install_checkpoint_hooks(trainer: Any, hooks: CheckpointHooks) -> list[str]:
    """Call ``hooks`` around every save of ``trainer`` and route its rotation to them. Once per trainer.

    Returns:
        The features that could not be installed on this transformers version, by name (empty when all are on).
    """
    if getattr(trainer, _MARK, False):
        return []
    missing: list[str] = []
    original_save = getattr(trainer, "_save_checkpoint", None)
    if original_save is None:
        return ["save hooks (Trainer._save_checkpoint is missing)", "rotation protection"]

    import transformers.trainer as trainer_module

    # 5.x: rotation and sorting are module functions looked up in transformers.trainer at call time.
    module_rotation = _install_dispatcher(trainer_module, "rotate_checkpoints")
    module_sorting = _install_dispatcher(trainer_module, "sort_checkpoints")

    def routed_rotation(original: Any, *args: Any, **kwargs: Any) -> None:
        bound = _bind(original, args, kwargs, _ROTATE_ARGS, "rotation protection")
        if bound is None:
            return original(*args, **kwargs)
        hooks.rotate(str(bound.get("output_dir")), bound.get("save_total_limit"), bound.get("best_model_checkpoint"))

    @functools.wraps(original_save)
    def _save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        bound = _bind(original_save, args, kwargs, ("trial",), "save hooks")
        if bound is None:
            return original_save(*args, **kwargs)
        trial = bound.get("trial")
        run_dir = output_dir_for(trainer, trial)
        if not hooks.before_save(trainer, run_dir):
            return None
        with routing(rotate_checkpoints=routed_rotation):
            result = original_save(*args, **kwargs)
        hooks.after_save(trainer, run_dir)
        return result

    trainer._save_checkpoint = _save_checkpoint

    if not module_rotation:
        # 4.x: rotation is the instance method _rotate_checkpoints(use_mtime=False, output_dir=None).
        original_rotate = getattr(trainer, "_rotate_checkpoints", None)
        if original_rotate is None:
            missing.append("rotation protection (no rotate_checkpoints / Trainer._rotate_checkpoints)")
        else:

            @functools.wraps(original_rotate)
            def _rotate_checkpoints(*args: Any, **kwargs: Any) -> None:
                bound = _bind(original_rotate, args, kwargs, ("output_dir",), "rotation protection")
                if bound is None:
                    return original_rotate(*args, **kwargs)
                run_dir = bound.get("output_dir") or trainer.args.output_dir
                hooks.rotate(str(run_dir), trainer.args.save_total_limit, trainer.state.best_model_checkpoint)

            trainer._rotate_checkpoints = _rotate_checkpoints

    original_finalize = getattr(trainer, "_finalize_training", None)
    if module_sorting and original_finalize is not None:

        def routed_sorting(original: Any, *args: Any, **kwargs: Any) -> list[str]:
            bound = _bind(original, args, kwargs, _SORT_ARGS, "end-of-training cleanup protection")
            if bound is None:
                return original(*args, **kwargs)
            return hooks.end_of_training_candidates(str(bound.get("output_dir")), bound.get("best_model_checkpoint"))

        @functools.wraps(original_finalize)
        def _finalize_training(*args: Any, **kwargs: Any) -> Any:
            with routing(sort_checkpoints=routed_sorting):
                return original_finalize(*args, **kwargs)

        trainer._finalize_training = _finalize_training
    else:
        # 4.x: the end-of-training cleanup sorts with the instance method _sorted_checkpoints.
        original_sorted = getattr(trainer, "_sorted_checkpoints", None)
        if original_sorted is None:
            missing.append("end-of-training cleanup protection (no sort_checkpoints / Trainer._sorted_checkpoints)")
        else:

            @functools.wraps(original_sorted)
            def _sorted_checkpoints(*args: Any, **kwargs: Any) -> list[str]:
                bound = _bind(original_sorted, args, kwargs, ("output_dir",), "end-of-training cleanup protection")
                if bound is None:
                    return original_sorted(*args, **kwargs)
                run_dir = bound.get("output_dir") or trainer.args.output_dir
                return hooks.end_of_training_candidates(str(run_dir), trainer.state.best_model_checkpoint)

            trainer._sorted_checkpoints = _sorted_checkpoints
    setattr(trainer, _MARK, True)
    return missing


# ------------------------------------------------------------------------------------------------- Hub uploads
_UPLOAD_MARK = "_trainguard_upload_filter"


def _with_ignored(kwargs: dict[str, Any], patterns: Sequence[str]) -> dict[str, Any]:
    """``upload_folder``'s keyword arguments with ``patterns`` added to its ``ignore_patterns`` (a new list:
    huggingface_hub extends the list it is given in place)."""
    given = kwargs.get("ignore_patterns")
    given_list = [given] if isinstance(given, str) else list(given or [])
    return {**kwargs, "ignore_patterns": [*given_list, *patterns]}


class _FilteringApi:
    """An ``HfApi`` whose ``upload_folder`` also ignores ``patterns``; everything else is the wrapped instance's."""

    def __init__(self, api: Any, patterns: Sequence[str]) -> None:
        self._api = api
        self._patterns = tuple(patterns)

    def upload_folder(self, *args: Any, **kwargs: Any) -> Any:
        return self._api.upload_folder(*args, **_with_ignored(kwargs, self._patterns))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)


def install_upload_filter(trainer: Any, patterns: Sequence[str]) -> list[str]:
    """Keep files matching ``patterns`` out of every Hub upload ``trainer`` makes (``push_to_hub=True``, its
    ``push_to_hub()``, the per-save pushes of ``hub_strategy``); on this instance only, once.

    The Trainer's own ``ignore_patterns`` (``_*``, ``checkpoint-*``) are kept: only ``patterns`` are added, so what it
    uploads of the user's files is unchanged.

    Returns:
        The features that are off on this transformers version, by name (empty when all are on).

    Example::

        install_upload_filter(trainer, ["trainguard-events.jsonl"])   # [] on transformers 5.24
    """
    if getattr(trainer, _UPLOAD_MARK, False):
        return []
    setattr(trainer, _UPLOAD_MARK, True)
    import transformers.trainer as trainer_module

    handlers: dict[str, Callable[..., Any]]
    if _install_dispatcher(trainer_module, "hf_api"):  # 5.x: hf_api().upload_folder(...)

        def routed_api(original: Any, *args: Any, **kwargs: Any) -> Any:
            return _FilteringApi(original(*args, **kwargs), patterns)

        handlers = {"hf_api": routed_api}
    elif _install_dispatcher(trainer_module, "upload_folder"):  # 4.x: huggingface_hub's upload_folder(...)

        def routed_upload(original: Any, *args: Any, **kwargs: Any) -> Any:
            return original(*args, **_with_ignored(kwargs, patterns))

        handlers = {"upload_folder": routed_upload}
    else:
        return ["keeping trainguard's records out of Hub uploads (no transformers.trainer.hf_api / upload_folder)"]

    missing: list[str] = []
    for name in ("push_to_hub", "_push_from_checkpoint"):
        original = getattr(trainer, name, None)
        if not callable(original):
            missing.append(f"keeping trainguard's records out of Hub uploads by Trainer.{name} (it is missing)")
            continue

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(original)
            def upload(*args: Any, **kwargs: Any) -> Any:
                with routing(**handlers):
                    return original(*args, **kwargs)

            return upload

        setattr(trainer, name, make(original))
    return missing


# ------------------------------------------------------------------------------------------------- the Trainer
def find_trainer(max_depth: int = 12) -> Any:
    """The ``transformers.Trainer`` whose ``__init__`` (or method) is on the call stack, or None.

    Callback events do not receive the Trainer, and ``on_init_end`` is fired from ``Trainer.__init__``, so the
    instance is ``self`` a few frames up. Used once per run, never per step.
    """
    from transformers import Trainer

    frame: FrameType | None = sys._getframe(1)
    depth = 0
    while frame is not None and depth < max_depth:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
        depth += 1
    return None


# ------------------------------------------------------------------------------------------- train() and order
_TRAIN_WRAP = "_trainguard_train_wrap"


class TrainWrap:
    """The handle :func:`wrap_train` returns: :meth:`remove` gives the instance its own ``train`` back."""

    def __init__(self, trainer: Any, original: Callable[..., Any]) -> None:
        self._trainer = trainer
        self._original = original

    def remove(self) -> None:
        if getattr(self._trainer, _TRAIN_WRAP, None) is self:
            del self._trainer.train  # the instance attribute: the class's train() shows through again
            delattr(self._trainer, _TRAIN_WRAP)


def wrap_train(trainer: Any, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> TrainWrap:
    """Replace ``trainer.train`` (this instance only, once) with ``make(original)``; a second call returns the first
    handle. The user's code still calls ``trainer.train(...)``. ``make`` builds the replacement itself, so a refusal
    leaves ``train()`` through one trainguard frame, not one more for this seam."""
    existing = getattr(trainer, _TRAIN_WRAP, None)
    if isinstance(existing, TrainWrap):
        return existing
    original = trainer.train
    handle = TrainWrap(trainer, original)
    trainer.train = functools.wraps(original)(make(original))
    setattr(trainer, _TRAIN_WRAP, handle)
    return handle


def set_callback_order(trainer: Any, callbacks: Sequence[Any]) -> None:
    """Make ``callbacks`` (the same callbacks, reordered) the order every later event reaches them in. A new list,
    not an in-place change: an event being dispatched now goes on over the list it started with."""
    handler = trainer.callback_handler
    if sorted(map(id, handler.callbacks)) != sorted(map(id, callbacks)):
        raise ValueError("set_callback_order only reorders the attached callbacks")
    handler.callbacks = list(callbacks)


def set_train_batch_size(trainer: Any, per_device: int, gradient_accumulation_steps: int) -> bool:
    """Change the batch the next ``train()`` uses: ``args`` and the copy ``Trainer.__init__`` made of it.

    Returns:
        False when this transformers version keeps no copy (``args`` alone then decides, which is enough there).
    """
    trainer.args.per_device_train_batch_size = per_device
    trainer.args.gradient_accumulation_steps = gradient_accumulation_steps
    if not hasattr(trainer, "_train_batch_size"):
        return False
    trainer._train_batch_size = trainer.args.train_batch_size
    return True


def is_jit_sigterm_handler(handler: Any) -> bool:
    """True when ``handler`` (from ``signal.signal``) is transformers' JIT-checkpoint SIGTERM handler (5.x)."""
    owner = getattr(handler, "__self__", None)
    if owner is None:
        return False
    try:
        from transformers.trainer_jit_checkpoint import CheckpointManager
    except ImportError:  # 4.x: no JIT checkpointing
        return False
    return isinstance(owner, CheckpointManager)


def install_step_hooks(
    trainer: Any,
    owner: object,
    *,
    on_loss: Callable[[Any, tuple[Any, ...], dict[str, Any]], None] | None = None,
    on_grad_norm: Callable[[Any], None] | None = None,
    before_step: Callable[[tuple[Any, ...], dict[str, Any]], None] | None = None,
) -> list[str]:
    """Call ``on_loss(loss, args, kwargs)`` after every ``training_step`` of ``trainer`` (each micro-batch's raw
    loss) and ``on_grad_norm(norm)`` whenever it computes the gradient norm; on this instance only, once per
    ``owner``.

    Returns:
        The features that are off on this version or with these arguments, by name (empty when all are on).
    """
    installed: list[object] = getattr(trainer, "_trainguard_step_hooks", [])
    if any(item is owner for item in installed):
        return []
    missing: list[str] = []
    original_step = trainer.training_step

    @functools.wraps(original_step)
    def training_step(*args: Any, **kwargs: Any) -> Any:
        if before_step is not None:
            before_step(args, kwargs)  # training_step(model, inputs, num_items_in_batch), before the forward pass
        loss = original_step(*args, **kwargs)
        if on_loss is not None:
            on_loss(loss, args, kwargs)
        return loss

    trainer.training_step = training_step
    if on_grad_norm is None:
        trainer._trainguard_step_hooks = [*installed, owner]
        return missing
    # 5.x computes the logged norm in _get_grad_norm, clipping or not; 4.x calls accelerate's clip_grad_norm_
    # inline, and only when max_grad_norm > 0.
    if callable(getattr(trainer, "_get_grad_norm", None)):
        holder, name = trainer, "_get_grad_norm"
    else:
        holder, name = trainer.accelerator, "clip_grad_norm_"
        if not (getattr(trainer.args, "max_grad_norm", 0) or 0) > 0:
            missing.append("gradient-norm check (transformers 4.x computes the norm only when max_grad_norm > 0)")
    original_norm = getattr(holder, name)

    @functools.wraps(original_norm)
    def grad_norm(*args: Any, **kwargs: Any) -> Any:
        norm = original_norm(*args, **kwargs)
        on_grad_norm(norm)
        return norm

    setattr(holder, name, grad_norm)
    trainer._trainguard_step_hooks = [*installed, owner]
    return missing


def load_checkpoint_weights(trainer: Any, checkpoint: Any) -> None:
    """Load ``checkpoint``'s weights into ``trainer.model`` exactly as ``train(resume_from_checkpoint=...)`` does
    (for a PEFT model: the adapter weights), without its optimizer, schedule or state.

    Raises:
        NotImplementedError: This transformers version has no ``Trainer._load_from_checkpoint``.
    """
    loader = getattr(trainer, "_load_from_checkpoint", None)
    if not callable(loader):
        raise NotImplementedError(
            "this transformers version has no Trainer._load_from_checkpoint to load the weights with"
        )
    loader(str(checkpoint))


# ------------------------------------------------------------------------------------------ what a save holds
def _tensor_spec(tensor: Any) -> Any:
    from ..checks.checkpoint.audit import TensorSpec, safetensors_dtype

    # ZeRO-3 keeps the full shape in ds_shape (the local tensor is empty); a DTensor's .shape is already global.
    shape = getattr(tensor, "ds_shape", None) or tuple(tensor.shape)
    return TensorSpec(tuple(int(d) for d in shape), safetensors_dtype(tensor.dtype))


def _storage_key(tensor: Any) -> Any:
    try:
        return (tensor.device, tensor.untyped_storage().data_ptr())
    except Exception:  # meta, sharded or exotic tensors: no sharing to find
        return id(tensor)


def saved_weights(model: Any) -> tuple[dict[str, Any], str, dict[str, str], str]:
    """The tensors ``save_pretrained`` writes for ``model`` (saved name -> :class:`TensorSpec`, see :func:`as_saved`),
    ``"adapter"`` or ``"model"``, the names it drops because they share memory with a saved one (the run's name -> the
    run's name of the saved one), and why the saved names could not be mapped (``""``: they could).

    Raises:
        RuntimeError: The model has shared tensors ``save_pretrained`` will refuse ("contained shared tensors ...
            which are not properly defined"), the crash of a tied-weight model at its first save.
    """
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        from peft import get_peft_model_state_dict

        adapter = get_peft_model_state_dict(model)
        return {name: _tensor_spec(t) for name, t in adapter.items()}, "adapter", {}, ""
    full = dict(model.state_dict())
    import transformers.modeling_utils as modeling

    remove_tied = getattr(modeling, "remove_tied_weights_from_state_dict", None)
    if remove_tied is not None:
        kept = remove_tied(dict(full), model)
    else:  # 4.x: save_pretrained drops names that share storage with one it keeps
        seen: set[Any] = set()
        kept = {}
        for name, tensor in full.items():
            key = _storage_key(tensor)
            if key not in seen:
                seen.add(key)
                kept[name] = tensor
    by_storage = {_storage_key(t): n for n, t in kept.items()}
    tied = {n: by_storage.get(_storage_key(t), "") for n, t in full.items() if n not in kept}
    weights, unmapped = as_saved(model, kept)
    return weights, "model", tied, unmapped


def as_saved(model: Any, tensors: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """``tensors`` (the run's names -> tensors or parameters) as ``save_pretrained`` writes them: name ->
    :class:`TensorSpec` after transformers' key conversion (5.x saves Mixtral's fused ``mlp.experts.gate_up_proj``
    per expert, ViT's ``vit.layers.N.attention.q_proj`` as ``vit.encoder.layer.N.attention.attention.query``), and
    ``""``; or the unconverted specs and why the conversion could not be replayed.

    The conversion runs on meta tensors of the same shapes and dtypes: names and shapes, no data, a few milliseconds.

    Example::

        specs, unmapped = as_saved(model, model.state_dict())   # unmapped == "" when the names are the saved ones
    """
    specs = {name: _tensor_spec(t) for name, t in tensors.items()}
    loading: Any
    try:
        loading = importlib.import_module("transformers.core_model_loading")
    except ImportError:  # 4.x: no conversion machinery
        loading = None
    revert = getattr(loading, "revert_weight_conversion", None)
    if loading is not None and not callable(revert):
        return specs, "this transformers converts weight names at save through an API trainguard does not know"
    if callable(revert):
        import torch

        meta = {
            name: torch.empty(specs[name].shape, dtype=getattr(t, "dtype", None), device="meta")
            for name, t in tensors.items()
        }
        try:
            converted = revert(model, meta)
        except Exception as err:  # an unknown conversion op, or one that needs the data: names cannot be mapped
            first = str(err).splitlines()[0][:200] if str(err) else ""
            return (
                specs,
                f"{type(model).__name__}'s key conversion could not be replayed ({type(err).__name__}: {first})",
            )
        return {name: _tensor_spec(t) for name, t in converted.items()}, ""
    mapping = getattr(model, "_checkpoint_conversion_mapping", None)
    if isinstance(mapping, Mapping) and mapping:
        return {_reverse_key(name, mapping): spec for name, spec in specs.items()}, ""
    return specs, ""


def _reverse_key(name: str, mapping: Mapping[str, str]) -> str:
    """transformers 4.52-4.57 ``save_pretrained``: the first of the model's ``_checkpoint_conversion_mapping``
    patterns, reversed, that matches renames the key."""
    import re

    for pattern, replacement in {v: k for k, v in mapping.items()}.items():
        replacement = re.sub(r"\(.*\)", "", replacement.lstrip("^"))
        name, count = re.subn(pattern, replacement, name)
        if count:
            break
    return name


def engine_layout(trainer: Any) -> str:
    """What ``trainer``'s saves look like: ``plain``, ``fsdp_sharded``, ``fsdp_full`` or ``deepspeed``."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return "deepspeed"
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = getattr(getattr(trainer.accelerator, "state", None), "fsdp_plugin", None)
        kind = str(getattr(plugin, "state_dict_type", "") or "")
        return "fsdp_full" if "FULL" in kind.upper() else "fsdp_sharded"
    return "plain"


def fp16_scaler_active(trainer: Any) -> bool:
    """Whether an enabled fp16 ``GradScaler`` steps the optimizer (it skips overflowing steps by itself, and its step
    needs the gradients it unscaled)."""
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    if scaler is None:
        return False
    is_enabled = getattr(scaler, "is_enabled", None)
    return bool(is_enabled()) if callable(is_enabled) else True


def engine_name(trainer: Any) -> str:
    """:func:`engine_layout` with the FSDP version: ``plain``, ``fsdp1_sharded``, ``fsdp2_full``, ``deepspeed``..."""
    layout = engine_layout(trainer)
    if layout.startswith("fsdp_"):
        return f"fsdp{2 if getattr(trainer.accelerator, 'is_fsdp2', False) else 1}_{layout[5:]}"
    return layout


def zero_stage(trainer: Any) -> int | None:
    """DeepSpeed's ZeRO stage of ``trainer`` (None without DeepSpeed)."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None)
    return int(stage) if isinstance(stage, int) else None


def weights_on_rank0_only() -> bool:
    """Whether ``save_pretrained`` writes only on global rank 0 whatever ``is_main_process`` says (transformers 5:
    ``should_save_on_this_rank``), so a node-local ``save_on_each_node`` copy on another node gets no weights."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return hasattr(PreTrainedModel, "should_save_on_this_rank")


def _sharded_weights(model: Any) -> dict[str, Any]:
    """Full shapes of a sharded model's parameters (DTensor global shapes, ZeRO-3's ``ds_shape``), never its
    state_dict (a collective under FSDP1, placeholders under ZeRO-3). Shared parameters are listed once."""
    return {name: _tensor_spec(param) for name, param in model.named_parameters()}


def save_spec(trainer: Any) -> Any:
    """What a save of ``trainer``'s live run must hold (:class:`~trainguard.checks.checkpoint.audit.SaveSpec`).

    Weights are compared for the plain layout, FSDP2 and DeepSpeed (full shapes, not a rank's shard); FSDP1's flat
    parameters do not name the saved tensors, so its weights are not compared (its files and shards still are).
    """
    from ..checks.checkpoint.audit import SaveSpec

    args = trainer.args
    layout = engine_layout(trainer)
    model = trainer.model
    peft_config = getattr(model, "peft_config", None)
    fsdp1 = layout.startswith("fsdp") and not getattr(trainer.accelerator, "is_fsdp2", False)
    unmapped = ""
    if layout == "plain":
        weights, kind, tied, unmapped = saved_weights(model)
    elif (isinstance(peft_config, dict) and peft_config) or fsdp1:
        weights, kind, tied = {}, "model", {}  # partitioned adapters and flat parameters: files and shards only
    elif layout == "fsdp_sharded":  # DCP writes the module names, no conversion
        weights, kind, tied = _sharded_weights(model), "model", {}
    else:  # gathered full weights go through save_pretrained and its key conversion
        (weights, unmapped), kind, tied = as_saved(model, dict(model.named_parameters())), "model", {}
    optimizer = getattr(trainer, "optimizer", None)
    inner = getattr(optimizer, "optimizer", optimizer)
    groups = getattr(inner, "param_groups", None)
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    enabled = getattr(scaler, "is_enabled", None)
    return SaveSpec(
        weights=weights,
        layout=layout,
        weights_kind=kind,
        tied=tied,
        model_only=bool(getattr(args, "save_only_model", False)),
        world_size=int(getattr(args, "world_size", 1) or 1),
        fp16_scaler=bool(enabled()) if callable(enabled) else scaler is not None,
        optimizer_params=sum(len(g.get("params", [])) for g in groups) if groups else None,
        optimizer_states=len(getattr(inner, "state", {}) or {}) if groups else None,
        unmapped=unmapped,
    )


def _optimizer_step(trainer: Any) -> float | None:
    optimizer = getattr(trainer, "optimizer", None)
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in (getattr(inner, "state", None) or {}).values():
        step = state.get("step") if isinstance(state, dict) else None
        if step is not None:
            return float(step)
    return None


def _lora_configs(model: Any) -> dict[str, Any]:
    """Each adapter's config as JSON (sets sorted, enums by value): LoraConfigGuard compares it on resume where the
    engine writes no ``adapter_config.json`` (FSDP's sharded state dict)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return {}

    def plain(value: Any) -> Any:
        if isinstance(value, (set, frozenset)):
            return sorted(plain(v) for v in value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        return getattr(value, "value", str(value))

    return {str(name): plain(cfg.to_dict()) for name, cfg in configs.items() if hasattr(cfg, "to_dict")}


def resume_facts(trainer: Any, train_dataloader: Any = None) -> dict[str, Any]:
    """The facts a resume must continue: the step, the optimizer's own step count, the learning rate now and after
    the next step (``LambdaLR`` schedules, which ``get_scheduler`` makes), and the settings behind them."""
    args, state = trainer.args, trainer.state
    facts: dict[str, Any] = {
        "global_step": int(state.global_step),
        "max_steps": int(getattr(state, "max_steps", 0) or 0),
        "args_max_steps": int(getattr(args, "max_steps", 0) or 0),
        "num_train_epochs": getattr(args, "num_train_epochs", None),
        "optimizer_step": _optimizer_step(trainer),
        "engine": engine_name(trainer),
    }
    scheduler = getattr(trainer, "lr_scheduler", None)
    last = getattr(scheduler, "get_last_lr", None)
    if callable(last):
        facts["last_lr"] = [float(x) for x in last()]
    lambdas, bases = getattr(scheduler, "lr_lambdas", None), getattr(scheduler, "base_lrs", None)
    if lambdas is not None and bases is not None:
        epoch = int(getattr(scheduler, "last_epoch", 0)) + 1
        facts["next_lr"] = [float(base * fn(epoch)) for fn, base in zip(lambdas, bases, strict=False)]
    for name in (
        "learning_rate",
        "warmup_steps",
        "optim",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "world_size",
        "seed",
        "data_seed",
        "group_by_length",
        "dataloader_drop_last",
        "ignore_data_skip",
    ):
        value = getattr(args, name, None)
        facts[name] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    facts["lr_scheduler_type"] = str(getattr(args, "lr_scheduler_type", ""))
    facts["lr_scheduler_kwargs"] = str(getattr(args, "lr_scheduler_kwargs", None) or {})
    lora = _lora_configs(getattr(trainer, "model", None))
    if lora:
        facts["lora"] = lora
    dataset = getattr(trainer, "train_dataset", None)
    try:
        facts["train_rows"] = len(dataset) if dataset is not None else None
    except TypeError:
        facts["train_rows"] = None  # an iterable dataset
    if train_dataloader is not None:
        try:
            facts["steps_per_epoch"] = max(1, len(train_dataloader) // max(1, int(args.gradient_accumulation_steps)))
        except TypeError:
            facts["steps_per_epoch"] = None
    return facts


# ------------------------------------------------------------------------------------------ a save on demand
def save_checkpoint_as_at_save_step(trainer: Any) -> str:
    """Save ``checkpoint-{state.global_step}`` exactly as the Trainer does at a save step: ``_save_checkpoint``
    (weights, optimizer, scheduler, RNG, ``trainer_state.json``, rotation; through any save hooks installed on the
    instance, so :class:`~trainguard.CheckpointVerifier` prepares the folder) and then the ``on_save`` event (where
    CheckpointVerifier audits the save and commits its manifest). ``control.should_save`` is set first, as a save
    step's ``on_step_end`` leaves it, and ``on_save`` clears it.

    Supported: transformers 4.47 to 5.x (``_save_checkpoint(model, trial)`` and ``callback_handler.on_save`` in
    both). Not for hyper-parameter search trials (the trial's folder is not known here).

    Returns:
        The checkpoint folder's path.

    Raises:
        RuntimeError: The Trainer has no ``_save_checkpoint`` or runs a hyper-parameter search.

    Example::

        folder = save_checkpoint_as_at_save_step(trainer)   # ".../checkpoint-3"  # not run here: needs a Trainer
    """

    save = getattr(trainer, "_save_checkpoint", None)
    if save is None:
        raise RuntimeError("this transformers release has no Trainer._save_checkpoint")
    if getattr(trainer, "hp_search_backend", None) is not None:
        raise RuntimeError("a hyper-parameter search trial: its checkpoint folder is not known here")
    model = getattr(trainer, "model_wrapped", None)
    model = trainer.model if model is None else model
    trainer.control.should_save = True
    save(model, None)
    trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
    return str(checkpoint_layout(trainer).folder_for(int(trainer.state.global_step)))
