"""AdapterGuard: stop a LoRA/PEFT run whose adapters do not train, at the first optimizer step or at ``check_step``,
before more compute goes in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import distributed
from ..bounds import whole_number
from ..checks.adapter import (
    AdapterParam,
    adapter_parameters,
    dead_adapter_error,
    is_peft_model,
    no_grad_parameters,
    zero_parameters,
)
from ..errors import AdapterError
from ._base import GuardCallback
from ._trainer_compat import engine_layout

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["AdapterGuard"]

_GC_CAUSE = (
    "gradient checkpointing is on and the checkpointed layers' inputs do not require grad (use_reentrant=True "
    "without model.enable_input_require_grads()), so no gradient flows back into the adapters inside them"
)


def _checkpointing_kwargs_field() -> str:
    """The ``TrainingArguments`` field that takes ``torch.utils.checkpoint``'s keyword arguments on the installed
    transformers: ``activation_checkpointing_kwargs`` from 5.23 on, where the old name still works but warns
    (``FutureWarning``, removed in v6); ``gradient_checkpointing_kwargs`` before. Read from the dataclass's fields,
    not the version number, so a backport or a rename in a later release is followed as it is."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return (
        "activation_checkpointing_kwargs"
        if "activation_checkpointing_kwargs" in names
        else "gradient_checkpointing_kwargs"
    )


def _gc_next() -> str:
    # The advice is spelt for the installed release: advice that itself triggers a deprecation warning sends the user
    # to fix the wrong thing first.
    return (
        "Call model.enable_input_require_grads() before training (peft.prepare_model_for_kbit_training does it), or "
        f"pass {_checkpointing_kwargs_field()}={{'use_reentrant': False}} to TrainingArguments; then start the run "
        "again."
    )


_PATH_CAUSE = (
    "these modules are not on the path from the inputs to the loss (not called in forward, a target_modules entry "
    "that matches a module the forward pass skips, or everything upstream detached)"
)
_ZERO_NEXT = (
    "Check the learning rate (and its schedule), that the loss depends on the adapter (labels not all masked) and "
    "that the optimizer holds the adapter parameters (build it after get_peft_model); then start the run again."
)


def _active_adapters(model: Any) -> list[str] | None:
    active = getattr(model, "active_adapters", None)
    try:
        active = active() if callable(active) else active
    except Exception:  # transformers' integrated PEFT raises when no adapter is loaded
        return None
    if isinstance(active, str):
        return [active]
    return [str(a) for a in active] if isinstance(active, (list, tuple)) else None


def _sharded(trainer: Any, args: Any) -> bool:
    if trainer is not None and engine_layout(trainer) != "plain":
        return True
    return bool(getattr(args, "deepspeed", None)) or bool(getattr(args, "fsdp", None))


def _checkpointing(model: Any, args: Any) -> bool:
    """Whether activation (gradient) checkpointing is on: the model's flag (set however it was enabled), else the
    argument; the 5.x names first, so no deprecation warning."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        value = getattr(model, name, None)
        if isinstance(value, bool):
            return value
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        value = getattr(args, name, None)
        if isinstance(value, bool):
            return value
    return False


def _current_lr(scheduler: Any) -> float | None:
    try:
        return max(float(lr) for lr in scheduler.get_last_lr())
    except Exception:
        return None


class AdapterGuard(GuardCallback):
    """Stops a PEFT/LoRA run whose adapters are dead: adapter parameters that receive no gradient, or zero-initialised
    matrices (``lora_B``) still exactly zero after ``check_step`` optimizer steps. Plain Trainer trains such a run to
    the end and saves an adapter that does nothing.

    - At the first optimizer step: trainable adapter parameters with no gradient, when gradient checkpointing is on
      (the known cause) or when no adapter parameter has one, are an error at once.
    - Until ``check_step``: each parameter that gets a gradient on any step counts as alive (``.grad is None`` reads
      no tensor: no device sync); one never alive by then is an error.
    - At ``check_step``: every adapter matrix that was exactly zero when training began and still is (one device sync)
      is an error, with the likely cause (a learning rate of 0, zero gradients, not in the optimizer).

    A model without adapters is left alone (nothing of peft is imported). Where parameters are sharded or their
    gradients live in the engine (FSDP, DeepSpeed) the guard checks nothing and says so in :meth:`summary`.

    Args:
        check_step: Optimizer steps (of this ``train()`` call) after which the gradient and zero checks conclude;
            default ``min(50, the run's planned steps)``, at least 2 so that a warmup starting at 0 is not an alarm.
        action: ``"raise"`` (default): alert and raise :class:`~trainguard.AdapterError` on every rank; ``"warn"``:
            alert and train on.
        alert_sinks: Replace the default alert sinks.
        webhook_url: Also POST alerts to this URL.

    Raises:
        AdapterError: With ``action="raise"``, when adapters are dead.
        ValueError: ``action`` is neither ``"raise"`` nor ``"warn"``, or ``check_step`` is below 1.

    Example::

        trainer = Trainer(..., model=get_peft_model(base, lora_config), callbacks=[trainguard.AdapterGuard()])
        trainer.train()          # AdapterError at step 1 if no gradient reaches the adapters
    """

    guard_name = "adapter_guard"

    def __init__(
        self,
        *,
        check_step: int | None = None,
        action: str = "raise",
        alert_sinks: Any = None,
        webhook_url: str | None = None,
    ) -> None:
        super().__init__(alert_sinks=alert_sinks, webhook_url=webhook_url)
        if action not in ("raise", "warn"):
            raise ValueError(f"AdapterGuard(action={action!r}): use 'raise' or 'warn'")
        self.check_step = whole_number("check_step", check_step, low=1, allow_none=True, owner="AdapterGuard")
        self.action = action
        self._reset()
        self._summary = "not run yet"

    def _reset(self) -> None:
        self._params: list[AdapterParam] = []
        self._named: list[tuple[str, Any]] = []  # the adapter parameters themselves: no model walk per step
        self._alive: set[str] = set()
        self._zero_at_start: list[str] = []
        self._steps = 0
        self._until = 0
        self._max_lr: float | None = None
        self._active = False

    # ------------------------------------------------------------------------------------------------ events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        self._reset()
        model: Any = kwargs.get("model")
        if not is_peft_model(model):
            self._summary = ""  # nothing to tell: a summary row saying so would be filler
            return control
        if _sharded(self.trainer, args):
            self._summary = "skipped: parameters are sharded or their gradients live in the engine (FSDP/DeepSpeed)"
            return control
        named = list(model.named_parameters())
        params = [p for p in adapter_parameters(named, _active_adapters(model)) if p.trainable]
        if not params:
            self._summary = "the active adapter(s) have no trainable parameters: nothing to check"
            return control
        planned = int(getattr(state, "max_steps", 0) or 0)
        self._until = self.check_step or max(2, min(50, planned - state.global_step if planned > 0 else 50))
        self._params = params
        wanted = {p.name for p in params}
        self._named = [(name, tensor) for name, tensor in named if name in wanted]
        self._zero_at_start = zero_parameters(named, [p.name for p in params])
        self._active = True
        self._summary = f"checking {len(params)} adapter parameter(s) until step {self._until} of this run"
        return control

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        if not self._active:
            return control
        names = [p.name for p in self._params]
        missing = set(no_grad_parameters(self._named, names))
        self._alive.update(n for n in names if n not in missing)
        lr = _current_lr(kwargs.get("lr_scheduler"))
        if lr is not None:
            self._max_lr = lr if self._max_lr is None else max(self._max_lr, lr)
        if self._steps == 0:  # the first optimizer step of this run: every rank is here together
            error = None
            dead = [p for p in self._params if p.name in missing]
            checkpointing = _checkpointing(kwargs.get("model"), args)
            if dead and (checkpointing or len(dead) == len(self._params)):
                cause = _GC_CAUSE if checkpointing else _PATH_CAUSE
                error = self._error(
                    "received no gradient", dead, state.global_step + 1, cause, _gc_next() if checkpointing else None
                )
            self._decide(error, state.global_step + 1)
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        if not self._active:
            return control
        self._steps += 1
        if self._steps < self._until:
            return control
        self._active = False  # concluded: no further cost
        step = state.global_step
        dead = [p for p in self._params if p.name not in self._alive]
        error: AdapterError | None = None
        if dead:
            error = self._error("received no gradient", dead, step, _PATH_CAUSE, None)
        else:
            still = set(zero_parameters(self._named, self._zero_at_start))
            zero = [p for p in self._params if p.name in still]
            if zero:
                error = self._error("are still all zero", zero, step, self._zero_cause(zero, kwargs), _ZERO_NEXT)
        self._decide(error, step)
        if error is None:
            self._summary = f"every adapter parameter trains (checked through step {step})"
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        if self._active:
            self._active = False
            self._summary = (
                f"{len(self._alive)} of {len(self._params)} adapter parameter(s) got a gradient; the run ended after "
                f"{self._steps} step(s), "
                f"before check_step {self._until}: the zero check did not run"
            )
        return super().on_train_end(args, state, control, **kwargs)

    def summary(self) -> str:
        return self._summary

    # ------------------------------------------------------------------------------------------------ helpers
    def _zero_cause(self, zero: list[AdapterParam], kwargs: dict[str, Any]) -> str:
        optimizer = kwargs.get("optimizer")
        held: set[int] = set()
        for group in getattr(optimizer, "param_groups", None) or []:
            held.update(id(p) for p in group.get("params", []))
        by_name = dict(kwargs["model"].named_parameters())
        if held and any(id(by_name[p.name]) not in held for p in zero if p.name in by_name):
            return "the optimizer does not hold these parameters (it was built before get_peft_model, or by hand)"
        if self._max_lr is not None and self._max_lr == 0.0:
            return "the learning rate was 0 at every step"
        return (
            "their gradients were zero at every step (labels all masked, a loss that does not depend on the adapter) "
            "or every optimizer step was skipped (fp16 overflow)"
        )

    def _error(
        self, problem: str, dead: list[AdapterParam], step: int, cause: str, next_step: str | None
    ) -> AdapterError:
        return dead_adapter_error(
            problem,
            dead,
            step=step,
            total=len(self._params),
            cause=cause,
            next_step=next_step,
            where={"rank": distributed.rank()},
            evidence={"max_learning_rate": self._max_lr, "check_step": self._until},
        )

    def _decide(self, error: AdapterError | None, step: int) -> None:
        if self.action == "warn":
            if error is not None:
                self._active = False
                self._summary = f"warned: {error.what}"
                if distributed.is_main_process():
                    self.alert("warning", error.what, step=step, evidence=error.evidence)
            return
        if error is not None:
            self._active = False
            self._summary = f"stopped the run: {error.what}"
        main = distributed.is_main_process()
        self.refuse_together(
            error,
            placeholder=lambda: AdapterError(
                f"another rank found dead adapter parameters at step {step}",
                where={"step": step, "rank": distributed.rank()},
            ),
            alert_level="error" if main else None,
            step=step,
        )
