"""What plain ``Trainer`` does when it resumes at a step with a new run's numbers: :func:`plan_resume`.

The arithmetic of ``Trainer.set_initial_training_values`` and ``_init_training_state``: which epoch it starts in, how
many batches of the new data it skips, and how many steps it still trains (none, for a checkpoint past the new
``max_steps``: plain Trainer then reports success having trained nothing).

Example::

    plan_resume(50, 25, max_steps=-1, num_train_epochs=1).describe()
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ResumePlan", "plan_resume"]


@dataclass(frozen=True)
class ResumePlan:
    """What plain ``Trainer`` does when it resumes at ``global_step`` with the new run's numbers (the arithmetic of
    ``Trainer.set_initial_training_values`` and ``_init_training_state``).

    ``steps_per_epoch`` is None for data with no length (then ``max_steps`` alone bounds the run).
    """

    global_step: int
    steps_per_epoch: int | None
    max_steps: int
    num_train_epochs: int | None
    epochs_trained: int | None
    steps_skipped: int
    steps_to_train: int

    def describe(self, *, data_changed: bool = True) -> str:
        """What plain Trainer would do, in one sentence (``data_changed``: the resume's data is not the
        checkpoint's, so it is "the new data"; else "this run's data")."""
        data = "the new data" if data_changed else "this run's data"
        head = f"checkpoint at step {self.global_step}"
        if self.steps_per_epoch is not None:
            head += f", {data} gives {self.steps_per_epoch} steps per epoch"
        if self.steps_to_train <= 0:
            return (
                f"{head} and max_steps is {self.max_steps}: it would stop at once, training nothing, and report success"
            )
        if self.steps_per_epoch is None or self.epochs_trained is None:
            return f"{head}: it would train {self.steps_to_train} more steps"
        return (
            f"{head}: it would start in epoch {self.epochs_trained + 1} of {self.num_train_epochs}, skip "
            f"the first {self.steps_skipped} steps' batches of {data}, and train {self.steps_to_train} more steps"
        )


def plan_resume(
    global_step: int,
    steps_per_epoch: int | None,
    *,
    max_steps: int,
    num_train_epochs: float,
) -> ResumePlan:
    """The :class:`ResumePlan` for a resume at ``global_step``.

    Args:
        global_step: The checkpoint's ``global_step``.
        steps_per_epoch: Optimizer steps per epoch of the new run (None when the data has no length).
        max_steps: ``TrainingArguments.max_steps`` of the new run (``<= 0``: not set).
        num_train_epochs: ``TrainingArguments.num_train_epochs`` of the new run.

    Example::

        plan_resume(50, 25, max_steps=-1, num_train_epochs=1).steps_to_train   # 0: nothing would run
    """
    if steps_per_epoch is None:
        total = max(int(max_steps), 0)
        return ResumePlan(global_step, None, total, None, None, 0, max(total - global_step, 0))
    spe = max(int(steps_per_epoch), 1)
    if max_steps > 0:
        total = int(max_steps)
        epochs = math.ceil(total / spe)
    else:
        total = math.ceil(num_train_epochs * spe)
        epochs = math.ceil(num_train_epochs)
    epochs_trained = global_step // spe
    skipped = global_step % spe
    return ResumePlan(global_step, spe, total, epochs, epochs_trained, skipped, max(total - global_step, 0))
