"""LoraConfigGuard: refuse a resume whose LoRA config differs from the checkpoint's, before anything is loaded."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import distributed
from ..bounds import yes_no
from ..checks._resume import on_main_then_share, resolve_resume_checkpoint
from ..checks.lora import check_lora_config, compare_adapter_weights, read_adapter_configs
from ..errors import LoraConfigMismatchError, TrainGuardError
from ._base import GuardCallback

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["LoraConfigGuard"]


def _peft_config(model: Any) -> dict[str, Any] | None:
    config = getattr(model, "peft_config", None)
    return config if isinstance(config, dict) and config else None


class LoraConfigGuard(GuardCallback):
    """Compares the checkpoint's ``adapter_config.json`` (every adapter) with the model's LoRA config before the
    Trainer loads the checkpoint, and after the resume confirms the adapter weights in the model are the
    checkpoint's.

    Plain Trainer resumes another ``lora_alpha`` or ``use_rslora`` silently, and fails on another ``r`` or
    ``target_modules`` only after loading everything, with a ``size mismatch`` dump or an optimizer error.

    Args:
        ignore: LoRA config fields to leave out of the comparison, on purpose (beyond those that cannot matter).
        check_weights: After a resume, compare each adapter tensor in the model with the checkpoint's file
            (default True: catches an adapter silently not restored; costs one read of the adapter file).
        alert_sinks: Replace the default alert sinks.
        webhook_url: Also POST alerts to this URL.

    Example::

        trainer = Trainer(..., model=get_peft_model(base, lora_config), callbacks=[trainguard.LoraConfigGuard()])
        trainer.train(resume_from_checkpoint=True)      # refused, naming the field, if the config changed
    """

    guard_name = "lora_config_guard"

    def __init__(
        self,
        *,
        ignore: Iterable[str] = (),
        check_weights: bool = True,
        alert_sinks: Any = None,
        webhook_url: str | None = None,
    ) -> None:
        super().__init__(alert_sinks=alert_sinks, webhook_url=webhook_url)
        self.ignore = tuple(ignore)
        self.check_weights = yes_no("check_weights", check_weights, owner="LoraConfigGuard")
        self._resumed_from: Path | None = None
        self._summary = "not run yet"

    def _check(self, checkpoint: Path, model: Any) -> list[str]:
        config = _peft_config(model)
        if config is None:
            if read_adapter_configs(checkpoint):
                raise LoraConfigMismatchError(
                    f"{checkpoint.name} holds LoRA adapter(s) but the model has none: the Trainer would not load them "
                    "and would train the base model instead",
                    where={"file": str(checkpoint / "adapter_config.json")},
                    next_step="Wrap the model with peft.get_peft_model(model, <the checkpoint's LoraConfig>) first.",
                )
            return []
        return check_lora_config(checkpoint, config, ignore=self.ignore)

    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> Any:
        checkpoint = resolve_resume_checkpoint(trainer.args.output_dir, resume_from_checkpoint)
        self._resumed_from = checkpoint
        if checkpoint is None:
            self._summary = "no resume" if _peft_config(trainer.model) else "no resume (not a LoRA model)"
            return resume_from_checkpoint
        try:
            warnings = on_main_then_share(self._check, checkpoint, trainer.model)
        except TrainGuardError as err:
            self._summary = f"refused the resume: {err.what}"
            if distributed.is_main_process():
                self.alert("error", err.what, evidence=err.evidence, raised=True)
            raise
        if distributed.is_main_process():
            for message in warnings:
                self.alert("warning", message)
        self._summary = (
            f"{checkpoint.name}: same LoRA config" if _peft_config(trainer.model) else f"{checkpoint.name}: no LoRA"
        )
        return resume_from_checkpoint

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        checkpoint = self._resumed_from
        model = kwargs.get("model")
        if not self.check_weights or checkpoint is None or state.global_step <= 0 or _peft_config(model) is None:
            return control
        problems = compare_adapter_weights(model, checkpoint)
        error: LoraConfigMismatchError | None = None
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            error = _not_restored(checkpoint, state.global_step, shown, problems)
            self._summary = "adapter weights not restored"
        self.refuse_together(
            error,
            placeholder=lambda: _not_restored(checkpoint, state.global_step, "on another rank", []),
            alert_level=None,
        )
        self._summary += "; adapter weights restored"
        return control

    def summary(self) -> str:
        return self._summary


def _not_restored(checkpoint: Any, step: int, shown: str, problems: list[str]) -> LoraConfigMismatchError:
    return LoraConfigMismatchError(
        f"after resuming from {checkpoint.name} the adapter weights in the model are not the checkpoint's "
        f"(adapter silently not restored): {shown}",
        where={"file": str(checkpoint), "step": step, "rank": distributed.rank()},
        next_step=(
            "Check that the model's adapter names match the checkpoint's folders (peft saves adapters other "
            "than 'default' in sub-folders) and that it was built with get_peft_model."
        ),
        evidence={"problems": problems},
    )
