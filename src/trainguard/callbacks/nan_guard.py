"""``NanGuard``: stop at the first non-finite step, never save a poisoned checkpoint, all ranks agree."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .. import distributed
from ..alerts import AlertSink
from ..checks._resume import checkpoint_dirs, checkpoint_step
from ..checks.numerics import (
    LossHealth,
    NonFiniteFinding,
    Patience,
    describe_value,
    nonfinite_flag,
    nonfinite_metrics,
    nonfinite_parameters,
)
from ..errors import NonFiniteError
from ._base import GuardCallback, find_trainer

__all__ = ["NanGuard"]

_ACTIONS = ("raise", "stop", "warn")
_HOOK_MARK = "_trainguard_nan_guard_hooks"


@dataclass
class _StepFlags:
    """What one optimizer step left behind: device flags and the values behind them (for the message)."""

    step: int
    # [loss_bad, grad_bad, empty, loss rank code, grad rank code] all-reduced (MAX) across ranks, then this rank's
    # [loss_bad, grad_bad, empty]: as host ints when the flags were already on the host (CPU training) ...
    values: list[int] | None = None
    # ... else as int32 tensors on the device, read later
    vector: Any = None
    local: Any = None  # int32 [loss_bad, grad_bad, empty] on this rank
    host: Any = None  # host copy of cat(vector, local), filled asynchronously on CUDA
    event: Any = None  # CUDA event recorded after the copy
    losses: list[Any] = field(default_factory=list)
    grad_norm: Any = None


@dataclass(frozen=True)
class _Verdict:
    step: int
    loss_bad: bool
    grad_bad: bool
    empty: bool
    loss_rank: int | None
    grad_rank: int | None
    local_loss_bad: bool
    local_grad_bad: bool
    losses: list[Any]
    grad_norm: Any

    @property
    def bad(self) -> bool:
        return self.loss_bad or self.grad_bad


def newest_checkpoint_before(output_dir: str | None, step: int) -> Path | None:
    """The newest ``checkpoint-N`` in ``output_dir`` with ``N < step`` (None when there is none)."""
    if not output_dir:
        return None
    try:
        older = [d for d in checkpoint_dirs(output_dir) if (checkpoint_step(d) or 0) < step]
    except OSError:
        return None
    return older[-1] if older else None


class NanGuard(GuardCallback):
    """Stop a run at its first non-finite training loss, gradient norm, weight or evaluation metric, before a
    checkpoint of the bad state is written, at the same step on every rank.

    What it watches, and where:

    - **every micro-batch's raw training loss**, as returned by ``Trainer.training_step`` (before
      ``logging_nan_inf_filter`` hides it in the log), and **the gradient norm** the Trainer already computes
      for clipping. Both become flags on their device (plain floats on CPU, where reading is free); no value is
      copied from an accelerator to the host per step. A step without any label token (``num_items_in_batch ==
      0``: its loss is 0/0 and its gradients are zero) is not an alarm but counts toward the zero-loss warning.
    - **the weights, before each save** (one pass over the parameters; the save reads them all anyway).
    - **evaluation metrics** (``eval_loss`` and any numeric metric) at ``on_evaluate``.

    When the flags are read: with ``sync=True`` (the default on CPU, where reading is free, and whenever
    ``patience > 0``) at ``on_pre_optimizer_step``, so a bad step is caught *before its update is applied*. With
    ``sync=False`` (the default on CUDA) the flags are all-reduced and copied to the host asynchronously at
    ``on_step_end`` and read one step later, so there is no extra host-device synchronisation per step; on a step
    that will save, evaluate or end training they are read at once, so a bad step is never checkpointed.

    Every rank shares its flags in one tiny all-reduce per step, so a NaN seen by one rank stops all of them at
    the same step. With an active fp16 ``GradScaler``, a step whose loss is finite but whose gradients overflow is
    the scaler's own skip, not an alarm, until more than ``max_skipped_steps`` happen in a row.

    Args:
        action: ``"raise"`` (default): raise :class:`~trainguard.NonFiniteError` from ``train()``, so a script
            does not go on to ``save_model()`` or push a poisoned model. ``"stop"``: end ``train()`` normally
            without saving the bad step (check :attr:`stopped`). ``"warn"``: alert only, change nothing.
        patience: Consecutive non-finite training steps tolerated before ``action``. A tolerated step is
            *skipped*: its gradients are dropped before ``optimizer.step()``, so the weights do not change; the
            LR schedule still advances. Needs ``sync=True`` (it is set automatically).
        sync: Read the flags before each optimizer step (True) or one step later without a host sync (False).
            None (default): True on CPU or when ``patience > 0``, False on CUDA and other accelerators.
        check_eval: Check evaluation metrics.
        check_params_on_save: Check the weights are finite before each checkpoint is written.
        max_skipped_steps: With an fp16 loss scaler, this many overflow skips in a row are normal loss-scale
            search; one more means the loss scale has collapsed and counts as a non-finite failure.
        spike_factor: Warn when a logged loss exceeds this many times the median of the last ``spike_window``
            logged losses (after ``spike_warmup`` of them). None disables it.
        spike_window: Baseline length, in logged losses.
        spike_warmup: Logged losses seen before spikes are judged.
        zero_loss_steps: Warn when this many logged losses in a row are exactly 0.0 (all labels masked). None
            disables it.
        alert_sinks: Replace the default alert sinks.
        webhook_url: Also POST warnings and worse to this URL.

    Raises:
        NonFiniteError: From ``trainer.train()`` with ``action="raise"``; it names the step, the rank, the value
            and the newest checkpoint written before the bad step.
        ValueError: An unknown ``action``, a negative ``patience``, or ``patience > 0`` with ``sync=False``.

    Example::

        guard = trainguard.NanGuard()                      # or: callbacks=trainguard.all_guards()
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[guard])
        try:
            trainer.train()
        except trainguard.NonFiniteError as err:
            print(err.where["step"], err.where["field"], err.evidence.get("resume_from"))
    """

    guard_name: ClassVar[str] = "nan_guard"

    def __init__(
        self,
        *,
        action: str = "raise",
        patience: int = 0,
        sync: bool | None = None,
        check_eval: bool = True,
        check_params_on_save: bool = True,
        max_skipped_steps: int = 25,
        spike_factor: float | None = 10.0,
        spike_window: int = 100,
        spike_warmup: int = 20,
        zero_loss_steps: int | None = 5,
        alert_sinks: list[AlertSink] | None = None,
        webhook_url: str | None = None,
    ) -> None:
        super().__init__(alert_sinks=alert_sinks, webhook_url=webhook_url)
        if action not in _ACTIONS:
            raise ValueError(f"NanGuard action must be one of {_ACTIONS}, not {action!r}")
        if patience < 0:
            raise ValueError(f"NanGuard patience must be >= 0, got {patience}")
        if patience > 0 and sync is False:
            raise ValueError(
                "NanGuard patience > 0 skips the bad step's update, which needs the check before the optimizer "
                "step: use sync=True or leave sync=None"
            )
        if max_skipped_steps < 0:
            raise ValueError(f"NanGuard max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.action = action
        self.patience = int(patience)
        self.sync = sync
        self.check_eval = check_eval
        self.check_params_on_save = check_params_on_save
        self.max_skipped_steps = int(max_skipped_steps)
        self.loss_health = LossHealth(
            spike_factor=spike_factor,
            spike_window=spike_window,
            spike_warmup=spike_warmup,
            zero_loss_steps=zero_loss_steps,
        )
        #: The finding that triggered ``action`` (None while the run is healthy).
        self.tripped: NonFiniteFinding | None = None
        #: Every non-finite observation of the run, tolerated ones included.
        self.findings: list[NonFiniteFinding] = []
        #: Steps whose update NanGuard skipped under ``patience``.
        self.skipped_steps = 0
        #: Steps the fp16 loss scaler skipped (gradient overflow), which are not alarms.
        self.scaler_skipped_steps = 0
        self._patience = Patience(self.patience)
        self._scaler_streak = Patience(self.max_skipped_steps)
        self._hooked = False
        # Keep flags as device tensors even for CPU tensors (the accelerator path); tests set it to cover that path.
        self._device_flags = False
        self._update_pending = True
        self._topology: tuple[int, int, Any] | None = None  # (world size, rank, process group or None)
        self._sync_now = True
        self._device: Any = None
        self._losses: list[Any] = []
        self._loss_bad: Any = None
        self._empty: Any = None
        self._grad_norm: Any = None
        self._grad_bad: Any = None
        self._pending: _StepFlags | None = None
        self._host_buffers: list[Any] = []
        self._events: list[Any] = []
        self._flip = 0
        self._nonfinite_since_log = False
        self._empty_since_log = False
        self._warned_streak = False

    # ------------------------------------------------------------------------------------------------ state
    @property
    def stopped(self) -> bool:
        """True when the guard ended (or is ending) the run: read it after ``train()`` with ``action="stop"``."""
        return self.tripped is not None and self.action != "warn"

    def summary(self) -> str:
        if self.tripped is not None:
            return f"{self._headline(self.tripped)}; action {self.action}"
        extra = []
        if self.skipped_steps:
            extra.append(f"{self.skipped_steps} step(s) skipped under patience")
        if self.scaler_skipped_steps:
            extra.append(f"{self.scaler_skipped_steps} fp16 overflow skip(s)")
        return "all values finite" + (f" ({', '.join(extra)})" if extra else "")

    # ------------------------------------------------------------------------------------------------ hooks
    def _install(self, trainer: Any) -> None:
        """Wrap this Trainer's ``training_step`` (raw loss of every micro-batch) and its grad-norm function (the
        norm it computes for clipping), on this instance only. On an accelerator both only queue a device op; on the
        CPU they read the value (one ``.item()``), which costs less than any tensor op."""
        installed: list[NanGuard] = getattr(trainer, _HOOK_MARK, [])
        if any(guard is self for guard in installed):
            self._hooked = True
            return
        original_step = trainer.training_step

        @functools.wraps(original_step)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            loss = original_step(*args, **kwargs)
            self._after_training_step(loss, args, kwargs)
            return loss

        trainer.training_step = training_step
        # 5.x computes the logged norm in _get_grad_norm (clipping or not); 4.x calls accelerate's
        # clip_grad_norm_ inline, and only when max_grad_norm > 0.
        if callable(getattr(trainer, "_get_grad_norm", None)):
            owner, name = trainer, "_get_grad_norm"
        else:
            owner, name = trainer.accelerator, "clip_grad_norm_"
        original_norm = getattr(owner, name)

        @functools.wraps(original_norm)
        def grad_norm(*args: Any, **kwargs: Any) -> Any:
            norm = original_norm(*args, **kwargs)
            self._after_grad_norm(norm)
            return norm

        setattr(owner, name, grad_norm)
        setattr(trainer, _HOOK_MARK, [*installed, self])
        self._hooked = True

    # Both run on every micro-batch / step, with cold caches, where Python costs several times its timeit figure:
    # the common case (a finite value on the CPU) is one .item() and a few attribute reads.
    def _after_training_step(self, loss: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._device_flags and getattr(loss, "is_cpu", False) and loss.numel() == 1:
            value = loss.item()
            if math.isfinite(value):
                self._losses.append(value)
                if self._loss_bad is None:
                    self._loss_bad = False
                return
        # training_step(model, inputs, num_items_in_batch): the label-token count the loss is divided by.
        self._observe_loss(loss, kwargs.get("num_items_in_batch", args[2] if len(args) > 2 else None))

    def _after_grad_norm(self, norm: Any) -> None:
        if not self._device_flags and getattr(norm, "is_cpu", False) and norm.numel() == 1:
            self._grad_norm = value = norm.item()
            self._grad_bad = not math.isfinite(value)
        else:
            self._observe_grad_norm(norm)

    def _observe_loss(self, loss: Any, items: Any = None) -> None:
        # A step without a single label token (num_items_in_batch == 0, every label masked) has the loss 0/0 = NaN
        # and exactly zero gradients: nothing is poisoned, so it is a zero-loss step, not a non-finite alarm.
        on_host = not self._is_tensor(loss) or (loss.device.type == "cpu" and not self._device_flags)
        if self._is_tensor(items) and items.numel() == 1:
            # Reading a CPU tensor is free; on an accelerator the comparison stays a device op.
            items_on_host = items.device.type == "cpu" and not self._device_flags
            empty: Any = float(items) == 0 if items_on_host else items.detach().reshape(()) == 0
        else:
            empty = isinstance(items, (int, float)) and not isinstance(items, bool) and items == 0
        if on_host:
            # CPU: plain floats; a tensor op costs microseconds, reading the value costs nothing.
            value = float(loss)
            bad = not math.isfinite(value) and not self._host_bool(empty)
            self._loss_bad = self._or_host(self._loss_bad, bad)
            self._losses.append(value)
        else:
            loss = loss.detach()
            flag = nonfinite_flag(loss)
            if empty is True:
                flag = flag & False
            elif empty is not False:
                flag = flag & ~empty.to(flag.device, non_blocking=True)
            self._loss_bad = flag if self._loss_bad is None else self._loss_bad | flag
            self._losses.append(loss)
        if empty is not False:
            self._empty = self._or_host(self._empty, empty)

    @staticmethod
    def _host_bool(value: Any) -> bool:
        return bool(value) if not NanGuard._is_tensor(value) else bool(value.item())

    def _observe_grad_norm(self, norm: Any) -> None:
        if norm is None:
            return
        if self._is_tensor(norm) and (norm.device.type != "cpu" or self._device_flags):
            self._grad_norm = norm.detach()
            self._grad_bad = nonfinite_flag(self._grad_norm)
        else:
            self._grad_norm = float(norm)
            self._grad_bad = not math.isfinite(self._grad_norm)

    @staticmethod
    def _is_tensor(value: Any) -> bool:
        return type(value).__module__.startswith("torch") and hasattr(value, "detach")

    @staticmethod
    def _or_host(flag: Any, value: bool) -> Any:
        if flag is None:
            return value
        return flag | value

    # ---------------------------------------------------------------------------------------- flag sharing
    def _take_step_flags(self, step: int) -> _StepFlags:
        """Turn this step's observations into one int32 vector on the device and all-reduce it (MAX).

        Layout ``[loss_bad, grad_bad, empty, loss rank code, grad rank code]`` where a rank code is
        ``world - rank`` on a rank that saw the value go bad (so MAX finds the lowest such rank): one collective says
        *which* value went bad and *where*, and it can stay on the device (NCCL) for the asynchronous read. Every
        rank calls this exactly once per optimizer step, so the collectives pair up.
        """
        import torch

        world, rank, group = self._ranks()
        raw = (self._loss_bad, self._grad_bad, self._empty)
        if not any(self._is_tensor(flag) for flag in raw):
            # Every flag is already on the host (CPU training): no tensor unless ranks must share them.
            mine = [int(bool(flag)) for flag in raw]
            code = world - rank
            values = [*mine, mine[0] * code, mine[1] * code]
            if group is not None:
                shared = torch.tensor(values, dtype=torch.int32, device=self._collective_device(group))
                group.all_reduce(shared, op=group.ReduceOp.MAX)
                values = [int(v) for v in shared.tolist()]
            flags = _StepFlags(step=step, values=values + mine, losses=self._losses, grad_norm=self._grad_norm)
            self._reset_step()
            return flags
        device = self._device if self._device is not None else torch.device("cpu")
        local = torch.zeros(3, dtype=torch.int32, device=device)
        for index, flag in ((0, self._loss_bad), (1, self._grad_bad), (2, self._empty)):
            if flag is None or flag is False:
                continue
            if flag is True:
                local[index] = 1
            else:
                local[index] = flag.to(device=device, dtype=torch.int32)
        vector = torch.zeros(5, dtype=torch.int32, device=device)
        vector[:3] = local
        vector[3:] = local[:2] * (world - rank)
        if group is not None:
            vector = vector.to(self._collective_device(group, vector.device))
            group.all_reduce(vector, op=group.ReduceOp.MAX)  # queued on the device stream: no host sync
        flags = _StepFlags(step=step, vector=vector, local=local, losses=self._losses, grad_norm=self._grad_norm)
        self._reset_step()
        return flags

    def _reset_step(self) -> None:
        self._losses = []
        self._loss_bad = None
        self._empty = None
        self._grad_norm = None
        self._grad_bad = None

    def _ranks(self) -> tuple[int, int, Any]:
        """World size, rank and ``torch.distributed`` (None alone), fixed for a ``train()``: looked up once."""
        if self._topology is None:
            self._topology = (distributed.world_size(), distributed.rank(), self._process_group())
        return self._topology

    @staticmethod
    def _process_group() -> Any:
        """``torch.distributed`` when more than one rank takes part, else None."""
        if distributed.world_size() <= 1:
            return None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist
        return None

    @staticmethod
    def _collective_device(dist: Any, preferred: Any = None) -> Any:
        import torch

        # NCCL reduces CUDA tensors only; gloo reduces CPU (and CUDA) tensors.
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return preferred if preferred is not None else torch.device("cpu")

    def _start_copy(self, flags: _StepFlags) -> None:
        """Queue the device-to-host copy of ``flags`` behind this step's work, without waiting for it."""
        import torch

        if flags.values is not None:
            return  # already on the host
        both = torch.cat([flags.vector, flags.local.to(flags.vector.device)])
        if both.device.type != "cuda":
            flags.host = both  # CPU: already on the host; other accelerators: read (and synchronised) later
            return
        if not self._host_buffers:
            self._host_buffers = [torch.empty(8, dtype=torch.int32, pin_memory=True) for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
        # Two alternating buffers: step k's copy is still pending while step k+1's is queued.
        self._flip ^= 1
        host = self._host_buffers[self._flip]
        host.copy_(both, non_blocking=True)
        event = self._events[self._flip]
        event.record()
        flags.host, flags.event = host, event

    def _read(self, flags: _StepFlags) -> _Verdict:
        if flags.values is not None:
            values = flags.values
        elif flags.host is None:
            import torch

            values = torch.cat([flags.vector, flags.local.to(flags.vector.device)]).tolist()
        else:
            if flags.event is not None:
                flags.event.synchronize()  # waits for that step only, not for work queued after it
            values = flags.host.tolist()
        loss_bad, grad_bad, empty, loss_code, grad_code, local_loss, local_grad, _ = (int(v) for v in values)
        world = self._ranks()[0]
        return _Verdict(
            step=flags.step,
            loss_bad=bool(loss_bad),
            grad_bad=bool(grad_bad),
            empty=bool(empty),
            loss_rank=(world - loss_code) if loss_code > 0 else None,
            grad_rank=(world - grad_code) if grad_code > 0 else None,
            local_loss_bad=bool(local_loss),
            local_grad_bad=bool(local_grad),
            losses=flags.losses,
            grad_norm=flags.grad_norm,
        )

    # -------------------------------------------------------------------------------------------- decisions
    def _scaler_active(self) -> bool:
        trainer = self.trainer
        scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
        if scaler is None:
            return False
        is_enabled = getattr(scaler, "is_enabled", None)
        return bool(is_enabled()) if callable(is_enabled) else True

    def _judge(
        self,
        verdict: _Verdict,
        args: Any,
        state: Any,
        control: Any,
        *,
        before_update: bool,
        optimizer: Any = None,
        detected_at: int | None = None,
    ) -> None:
        """Decide on one step's (already rank-consistent) flags: fine, scaler skip, tolerated, or ``action``."""
        if verdict.empty:
            self._empty_since_log = True
        if not verdict.bad:
            self._patience.update(False)
            self._scaler_streak.update(False)
            self._warned_streak = False
            return
        self._nonfinite_since_log = True
        scaler = self._scaler_active()
        if scaler and not verdict.loss_bad:
            # The GradScaler found inf/NaN gradients and skips this update on purpose, then lowers the scale.
            self.scaler_skipped_steps += 1
            if self._scaler_streak.update(True):
                finding = self._finding(
                    verdict,
                    "grad_norm",
                    detail=(
                        f"the fp16 loss scaler skipped {self._scaler_streak.streak} steps in a row: the loss scale "
                        "has collapsed"
                    ),
                )
                self._act(
                    finding,
                    args,
                    state,
                    control,
                    before_update=before_update,
                    optimizer=optimizer,
                    drop_grads=False,
                    detected_at=detected_at,
                )
            return
        finding = self._finding(verdict, "loss" if verdict.loss_bad else "grad_norm")
        self.findings.append(finding)
        if not self._patience.update(True):
            # Tolerated: drop the gradients so the optimizer leaves the weights as they were (a loss scaler skips
            # a step with a non-finite loss by itself).
            if before_update and not scaler:
                self._drop_gradients(optimizer)
            skipped = before_update or scaler
            self.skipped_steps += int(skipped)
            if distributed.is_main_process():
                self.alert(
                    "warning",
                    f"{self._headline(finding)}; {'update skipped' if skipped else 'tolerated'} "
                    f"({self._patience.streak} of {self.patience} tolerated in a row)",
                    step=finding.step,
                    evidence=self._evidence(finding),
                )
            return
        self._act(
            finding,
            args,
            state,
            control,
            before_update=before_update,
            optimizer=optimizer,
            drop_grads=not scaler,
            detected_at=detected_at,
        )

    def _finding(self, verdict: _Verdict, field_name: str, *, detail: str = "") -> NonFiniteFinding:
        value: float | None = None
        if field_name == "loss" and verdict.local_loss_bad:
            for index, loss in enumerate(verdict.losses):
                number = float(loss)
                if not math.isfinite(number):
                    value = number
                    if not detail and len(verdict.losses) > 1:
                        detail = f"micro-batch {index + 1} of {len(verdict.losses)}"
                    break
        elif field_name == "grad_norm" and verdict.grad_norm is not None:
            number = float(verdict.grad_norm)
            value = number if not math.isfinite(number) else None
        rank = verdict.loss_rank if field_name == "loss" else verdict.grad_rank
        return NonFiniteFinding(step=verdict.step, field=field_name, value=value, rank=rank, detail=detail)

    def _headline(self, finding: NonFiniteFinding) -> str:
        """``"loss is NaN at step 8 on rank 1 (micro-batch 3 of 4)"``."""
        verb = "are" if finding.field == "parameters" else "is"
        value = "non-finite" if finding.value is None else describe_value(finding.value)
        text = f"{finding.field} {verb} {value} at step {finding.step}{self._rank_text(finding)}"
        return f"{text} ({finding.detail})" if finding.detail else text

    @staticmethod
    def _rank_text(finding: NonFiniteFinding) -> str:
        if finding.rank is None or not distributed.is_distributed():
            return ""
        return f" on rank {finding.rank}"

    def _evidence(self, finding: NonFiniteFinding, **extra: Any) -> dict[str, Any]:
        evidence: dict[str, Any] = {"field": finding.field, "step": finding.step}
        if finding.value is not None:
            evidence["value"] = describe_value(finding.value)
        if finding.rank is not None:
            evidence["rank"] = finding.rank
        if finding.detail:
            evidence["detail"] = finding.detail
        evidence.update({k: v for k, v in extra.items() if v is not None})
        return evidence

    @staticmethod
    def _drop_gradients(optimizer: Any) -> None:
        # Standard optimizers skip parameters whose .grad is None: no moment update, no weight decay.
        for group in getattr(optimizer, "param_groups", []) or []:
            for param in group.get("params", []):
                param.grad = None

    def _act(
        self,
        finding: NonFiniteFinding,
        args: Any,
        state: Any,
        control: Any,
        *,
        before_update: bool,
        optimizer: Any = None,
        drop_grads: bool = True,
        detected_at: int | None = None,
    ) -> None:
        first = self.tripped is None
        if first:
            self.tripped = finding
        if finding not in self.findings:
            self.findings.append(finding)
        # Every rank takes the same action; rank 0 and the rank that saw the value (which alone knows it) report.
        report = distributed.is_main_process() or finding.rank == self._ranks()[1]
        if self.action == "warn":
            if not self._warned_streak and report:
                self._warned_streak = True
                self.alert(
                    "error",
                    self._message(finding, args, detected_at, warn=True),
                    step=finding.step,
                    evidence=self._evidence(finding),
                )
            return
        control.should_save = False
        control.should_evaluate = False
        if self.action == "stop":
            control.should_training_stop = True
            if before_update and drop_grads:
                self._drop_gradients(optimizer)  # the in-memory model keeps the last finite weights
            if first and report:
                self.alert(
                    "error",
                    self._message(finding, args, detected_at),
                    step=finding.step,
                    evidence=self._evidence(
                        finding,
                        resume_from=self._resume_text(args, finding),
                        weights_in_memory=self._weights_in_memory(),
                    ),
                )
            return
        error = self._error(finding, args, detected_at)
        if report:
            self.alert("error", error.what, step=finding.step, evidence=error.evidence)
        raise error

    def _resume_text(self, args: Any, finding: NonFiniteFinding) -> str | None:
        checkpoint = newest_checkpoint_before(getattr(args, "output_dir", None), finding.step)
        return str(checkpoint) if checkpoint is not None else None

    def _message(self, finding: NonFiniteFinding, args: Any, detected_at: int | None, *, warn: bool = False) -> str:
        what = f"{self._headline(finding)}"
        if detected_at is not None and detected_at != finding.step:
            what += f" (read at step {detected_at}: the check is asynchronous)"
        if warn:
            return what + "; action='warn': training continues and checkpoints may hold non-finite weights"
        checkpoint = self._resume_text(args, finding)
        tail = "no checkpoint of this step was written"
        tail += f"; newest good checkpoint: {checkpoint}" if checkpoint else "; no earlier checkpoint exists"
        if self.action == "stop":
            return f"{what}; training stopped, {tail}"
        return f"{what}; {tail}"

    def _error(self, finding: NonFiniteFinding, args: Any, detected_at: int | None) -> NonFiniteError:
        checkpoint = self._resume_text(args, finding)
        where: dict[str, Any] = {"step": finding.step}
        if finding.rank is not None:
            where["rank"] = finding.rank
        where["field"] = finding.field
        next_step = (
            f"Resume from {checkpoint} (trainer.train(resume_from_checkpoint={checkpoint!r})) "
            if checkpoint
            else "Start again "
        )
        weights = self._weights_in_memory()
        next_step += (
            "with a lower learning rate, gradient clipping (max_grad_norm) or bf16 instead of fp16; inspect the "
            f"batch of step {finding.step}."
        )
        if weights == "non-finite":
            next_step += " The model in memory holds non-finite weights: do not save or push it."
        return NonFiniteError(
            self._message(finding, args, detected_at),
            where=where,
            next_step=next_step,
            evidence=self._evidence(
                finding, resume_from=checkpoint, detected_at_step=detected_at, weights_in_memory=weights
            ),
        )

    def _weights_in_memory(self) -> str | None:
        """``"finite"`` or ``"non-finite"`` for this rank's weights (one pass, on the failure path only)."""
        model = getattr(self.trainer, "model", None)
        if model is None:
            return None
        try:
            return "non-finite" if nonfinite_parameters(model.named_parameters(), limit=1) else "finite"
        except Exception:  # a sharded or offloaded parameter that cannot be read here: say nothing
            return None

    # ----------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._alerter is None or self.trainer is None:
            self._attach(args)  # added with trainer.add_callback(): on_init_end never reached this guard
        trainer = self.trainer or find_trainer()
        if trainer is not None:
            self._install(trainer)
            self._update_pending = not getattr(trainer, "is_deepspeed_enabled", False)
        elif distributed.is_main_process():
            self.alert(
                "warning",
                "could not reach the Trainer: falling back to the logged loss and grad_norm (checked only at "
                "logging steps, after the update)",
            )
        import torch

        self._device = getattr(args, "device", None) or torch.device("cpu")
        self._topology = None  # the process group exists by now (the Trainer's accelerator made it)
        device_type = getattr(self._device, "type", "cpu")
        self._sync_now = self.sync if self.sync is not None else (device_type == "cpu" or self.patience > 0)
        # A new train() (or auto_find_batch_size re-running the loop after an OOM) starts clean; findings stay.
        self.tripped = None
        self._patience.streak = 0
        self._scaler_streak.streak = 0
        self._warned_streak = False
        self._losses, self._loss_bad, self._empty, self._grad_norm, self._grad_bad = [], None, None, None, None
        self._pending = None
        return control

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if not self._hooked or not self._sync_now:
            return control
        if (
            self._loss_bad is False
            and (self._grad_bad is None or self._grad_bad is False)
            and self._empty is None
            and (self._topology or self._ranks())[2] is None
        ):
            # The common step on one process: every value seen on the host, all finite. Nothing to share or judge.
            self._patience.streak = self._scaler_streak.streak = 0
            self._warned_streak = False
            self._reset_step()
            return control
        flags = self._take_step_flags(state.global_step + 1)
        verdict = self._read(flags)
        # Under DeepSpeed the engine already stepped inside backward: nothing is left to skip or prevent.
        self._judge(
            verdict, args, state, control, before_update=self._update_pending, optimizer=kwargs.get("optimizer")
        )
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._hooked and not self._sync_now:
            previous, self._pending = self._pending, None
            if previous is not None:
                self._judge(
                    self._read(previous), args, state, control, before_update=False, detected_at=int(state.global_step)
                )
            current = self._take_step_flags(state.global_step)
            self._start_copy(current)
            if (
                control.should_save
                or control.should_evaluate
                or control.should_training_stop
                or (state.max_steps and state.global_step >= state.max_steps)
            ):
                # A save (or the end, where the user's script saves) is coming: it synchronises anyway.
                self._judge(self._read(current), args, state, control, before_update=False)
            else:
                self._pending = current
        if self.tripped is not None or control.should_save:
            self._guard_save(args, state, control, kwargs.get("model"))
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._pending is not None and (control.should_save or control.should_evaluate):
            previous, self._pending = self._pending, None
            self._judge(
                self._read(previous), args, state, control, before_update=False, detected_at=int(state.global_step)
            )
        self._guard_save(args, state, control, kwargs.get("model"))
        return control

    def _guard_save(self, args: Any, state: Any, control: Any, model: Any) -> None:
        if self.tripped is not None and self.action != "warn":
            # on_step_end / on_epoch_end of DefaultFlowCallback ran before us and may have scheduled a save.
            control.should_save = False
            control.should_evaluate = False
            control.should_training_stop = True
            return
        if not (self.check_params_on_save and control.should_save and model is not None):
            return
        names = nonfinite_parameters(model.named_parameters())
        bad = bool(names)
        if self._sharded():
            # Sharded weights differ per rank. should_save is rank-consistent (the sharded save itself is a
            # collective), so every rank reaches this collective at the same step.
            bad = distributed.any_rank(bad)
        if not bad:
            return
        finding = NonFiniteFinding(
            step=int(state.global_step),
            field="parameters",
            rank=distributed.rank() if names else None,
            detail=", ".join(names) if names else "on another rank's shard",
        )
        self._act(finding, args, state, control, before_update=False)

    def _sharded(self) -> bool:
        trainer = self.trainer
        return distributed.is_distributed() and bool(
            getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
        )

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        metrics = kwargs.get("metrics") or {}
        if not self.check_eval or not metrics:
            return control
        # Evaluation metrics are gathered over all ranks, so every rank sees the same values: no collective.
        bad = nonfinite_metrics(metrics)
        if not bad:
            return control
        name = next((key for key in bad if key.endswith("_loss")), next(iter(bad)))
        others = [key for key in bad if key != name]
        finding = NonFiniteFinding(
            step=int(state.global_step),
            field=name,
            value=bad[name],
            detail=("also " + ", ".join(others)) if others else "",
        )
        self.findings.append(finding)
        self._act(finding, args, state, control, before_update=False)
        return control

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        logs = kwargs.get("logs") or {}
        if "loss" not in logs:
            return control
        if not self._hooked and self.tripped is None:
            # Fallback without hooks: grad_norm is never filtered; a NaN loss may show as 0.0 with the filter on.
            for key in ("grad_norm", "loss"):
                value = logs.get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    finding = NonFiniteFinding(
                        step=int(state.global_step), field=key, value=float(value), detail="from the logged value"
                    )
                    self._act(finding, args, state, control, before_update=False)
                    return control
        loss = logs.get("loss")
        nonfinite, empty = self._nonfinite_since_log, self._empty_since_log
        self._nonfinite_since_log = self._empty_since_log = False
        if nonfinite:
            # The logged loss of a non-finite step is the filter's substitute (often 0.0): not a real loss.
            return control
        if empty and isinstance(loss, (int, float)) and not math.isfinite(loss):
            loss = 0.0  # steps without label tokens, logged as 0/0 because logging_nan_inf_filter is off
        if isinstance(loss, (int, float)):
            for event in self.loss_health.update(float(loss), step=int(state.global_step)):
                if distributed.is_main_process():
                    self.alert(
                        "warning", event.message, step=event.step, evidence={"kind": event.kind, **event.evidence}
                    )
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._pending is not None:
            # Training ended between two reads (another callback stopped it): read the last step now, so a
            # script that saves after train() does not save a poisoned model unwarned.
            previous, self._pending = self._pending, None
            try:
                self._judge(
                    self._read(previous), args, state, control, before_update=False, detected_at=int(state.global_step)
                )
            finally:
                super().on_train_end(args, state, control, **kwargs)
            return control
        return super().on_train_end(args, state, control, **kwargs)

    def on_train_error(self, trainer: Any, exc: BaseException) -> None:
        if isinstance(exc, NonFiniteError) and self._alerter is not None:
            self._alerter.close()
