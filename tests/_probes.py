"""Test callbacks shared by tests and torchrun scripts: where training began, and JIT checkpoint requests.

Kept apart from ``_rig`` so that the rig itself imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

import pytest
import transformers
from transformers import TrainerCallback

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
#: For tests of JIT checkpoints (``TrainingArguments(enable_jit_checkpoint=True)``), which transformers 5.0 added.
requires_jit = pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="enable_jit_checkpoint is new in transformers 5.0")


class Probe(TrainerCallback):
    """Records the step training began at (0 fresh, N after loading checkpoint-N) and how many steps ran."""

    def __init__(self) -> None:
        self.began_at: int | None = None
        self.steps = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.began_at = state.global_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps += 1


class JitAt(TrainerCallback):
    """Asks the Trainer's JIT checkpointing for a save, as its SIGTERM timer does, after ``event`` (``"step_end"``
    or ``"save"``) of ``step``. Set ``trainer`` once the Trainer exists."""

    def __init__(self, step: int, event: str) -> None:
        self.step, self.event = step, event
        self.trainer: Any = None

    def _request(self, state: Any) -> None:
        if state.global_step == self.step:
            from transformers.trainer_jit_checkpoint import JITCheckpointCallback

            jit = next(c for c in self.trainer.callback_handler.callbacks if isinstance(c, JITCheckpointCallback))
            jit.jit_manager.is_checkpoint_requested = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.event == "step_end":
            self._request(state)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.event == "save":
            self._request(state)


class EventRecorder(TrainerCallback):
    """A user's callback that records every event it receives as ``(event, global_step)``, and each ``on_log``'s
    ``logs``: what a guarded run must show a user exactly as the plain run does."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.logs: list[dict[str, Any]] = []

    def _record(self, name: str, state: Any, logs: Any = None) -> None:
        self.events.append((name, int(state.global_step)))
        if name == "on_log":
            self.logs.append(dict(logs or {}))


def _recording(name: str) -> Any:
    def record(self: EventRecorder, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._record(name, state, kwargs.get("logs"))

    record.__name__ = name
    return record


# every event the installed transformers has (on_push_begin on newer releases, too)
for _name in (n for n in dir(TrainerCallback) if n.startswith("on_")):
    setattr(EventRecorder, _name, _recording(_name))
