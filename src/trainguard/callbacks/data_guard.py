"""DataGuard: before the first step, refuse a tokenized train set with rows that teach nothing or that the model
cannot take."""

from __future__ import annotations

import logging
from typing import Any

from .. import distributed
from ..bounds import finite_number, whole_number
from ..checks.data import TokenizedCheck, check_tokenized_dataset
from ..checks.data.verdict import ACTIONS, judge_tokenized
from ..errors import DataValidationError
from ._base import GuardCallback

__all__ = ["DataGuard"]

_LOG = logging.getLogger("trainguard")
# Config attributes that hold a model's position limit, by family (Llama/Mistral/BERT, GPT-2, MPT/Falcon, ChatGLM).
_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "max_seq_len")


def position_limit(model: Any) -> int | None:
    """The longest sequence ``model`` has positions for, from its config; None when the config names none."""
    config = getattr(model, "config", None)
    for name in _POSITION_ATTRS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _collator_rebuilds_labels(collator: Any) -> bool:
    """transformers' ``DataCollatorForLanguageModeling`` (mlm=False) replaces any ``labels`` column by a copy of
    ``input_ids`` with padding masked, so the dataset's labels never reach the loss."""
    try:
        from transformers import DataCollatorForLanguageModeling
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return type(collator) is DataCollatorForLanguageModeling and not getattr(collator, "mlm", False)


class DataGuard(GuardCallback):
    """Checks the tokenized train set the Trainer will use, before the first step: rows whose labels are all
    ignored (-100), empty rows, and rows longer than the model's position limit.

    It acts in :meth:`before_train` (inside ``trainer.train()``, before a resumed checkpoint is loaded and before
    any step), on every rank, on ``trainer.train_dataset``; the decision is shared with
    :func:`trainguard.distributed.any_rank`, so every rank refuses together. A ``datasets.Dataset`` is scanned as
    Arrow batches with numpy (a few seconds for millions of rows); other map-style datasets row by row.

    What counts as supervised: the ``labels`` column (values other than ``ignore_index``); without one, TRL's
    ``completion_mask`` (when ``completion_only_loss``) or ``assistant_masks``; without any of those the collator
    trains on every token, so only empty rows can teach nothing. When the Trainer's collator is transformers'
    ``DataCollatorForLanguageModeling`` (which rebuilds labels from ``input_ids``), the labels column is not
    checked. Every label shape the Trainer trains is read: token lists, one class id per row (an int, a 0-d
    tensor, an Arrow int column; -100 means ignored), float targets (regression, multi-label; never "ignored"). A
    shape it does not read (strings, a struct, a 2-d tensor per row...) is named in one warning log line and the
    checks that need that column are skipped; it never stops a run for it.

    Args:
        action: ``"refuse"`` (default) raises :class:`~trainguard.DataValidationError` from ``train()`` when a
            threshold is crossed; ``"warn"`` only alerts.
        max_masked_fraction: Largest tolerated fraction of rows that teach nothing (all labels ignored, or empty).
            Default 0.0: any such row is refused, since a batch of them gives loss 0 or NaN and each is wasted
            compute; set e.g. 0.01 to accept a few (they are still reported as a warning).
        max_positions: The position limit rows are compared with. Default: the model config's
            ``max_position_embeddings`` (or ``n_positions``, ...). A longer row either crashes mid-run (learned
            positions) or silently runs past the positions the model was trained on (rotary); any is refused.
        ignore_index: The label value the loss ignores (default -100, as in transformers).
        alert_sinks: Replace the default alert sinks.
        webhook_url: Also POST alerts to this URL.

    Example::

        trainer = Trainer(..., callbacks=[trainguard.DataGuard()])
        trainer.train()   # raises DataValidationError before step 1 if every label of a row is -100
    """

    guard_name = "data_guard"

    def __init__(
        self,
        *,
        action: str = "refuse",
        max_masked_fraction: float = 0.0,
        max_positions: int | None = None,
        ignore_index: int = -100,
        alert_sinks: Any = None,
        webhook_url: str | None = None,
    ) -> None:
        super().__init__(alert_sinks=alert_sinks, webhook_url=webhook_url)
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
        owner = "DataGuard"
        self.action = action
        self.max_masked_fraction = finite_number("max_masked_fraction", max_masked_fraction, low=0, high=1, owner=owner)
        self.max_positions = whole_number("max_positions", max_positions, low=1, allow_none=True, owner=owner)
        # A label id: any int32 value (-100 by default); a float or a bool is never a label.
        self.ignore_index = whole_number("ignore_index", ignore_index, low=-(2**31), high=2**31 - 1, owner=owner)
        #: What the last check found (None before the first ``train()``).
        self.result: TokenizedCheck | None = None
        self._summary = "not run yet"

    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> Any:
        self.check(trainer)
        return resume_from_checkpoint

    def check(self, trainer: Any) -> TokenizedCheck:
        """Check ``trainer.train_dataset`` now; raise or alert per the options, and return what was found.

        Raises:
            DataValidationError: ``action="refuse"`` and a threshold is crossed (on every rank if on any).
        """
        args = trainer.args
        limit = self.max_positions if self.max_positions is not None else position_limit(trainer.model)
        completion_only = getattr(args, "completion_only_loss", None)
        result = check_tokenized_dataset(
            trainer.train_dataset,
            max_positions=limit,
            ignore_index=self.ignore_index,
            completion_only_loss=True if completion_only is None else bool(completion_only),
        )
        if result.supervision == "labels" and _collator_rebuilds_labels(getattr(trainer, "data_collator", None)):
            result.masked_rows, result.masked_examples = 0, []
            result.supervision = "input_ids (DataCollatorForLanguageModeling rebuilds labels)"
        self.result = result
        for column, shape in result.stepped_aside.items():
            # Say it once and step aside: a shape the check cannot read is no reason to stop a run the Trainer trains.
            _LOG.warning(
                "trainguard data_guard: column %r holds %s per row, a shape DataGuard does not read; the checks "
                "that need it were skipped",
                column,
                shape,
            )
        verdict = judge_tokenized(
            result, action=self.action, max_masked_fraction=self.max_masked_fraction, ignore_index=self.ignore_index
        )
        findings = verdict.findings
        refuse = distributed.any_rank(verdict.refuse)  # a collective: every rank reaches this line once per train()
        if result.skipped:
            self._summary = f"not checked: {result.skipped}"
            _LOG.info("trainguard data_guard: %s", self._summary)
        else:
            self._summary = (
                f"checked {result.rows} row(s): {result.masked_rows} with no supervised token, "
                f"{result.empty_rows} empty, "
                # T5 and other relative-position models declare no limit: say so rather than "0 over no positions".
                + (f"{result.over_limit_rows} over {limit} positions" if limit else "no position limit in the config")
            )
        if not findings and not refuse:
            return result
        evidence = {k: v for k, v in result.to_dict().items() if k != "skipped"}
        message = "; ".join(findings) if findings else "another rank found rows that teach nothing"
        if refuse:
            self.alert("error", f"refusing to train: {message}", step=0, evidence=evidence, raised=True)
            firsts = result.over_limit_examples or result.empty_examples or result.masked_examples
            first = firsts[0] if firsts else None
            raise DataValidationError(
                f"the train dataset has rows the run cannot learn from: {message}",
                where={
                    "row": first,
                    "field": "labels" if result.masked_rows else "input_ids",
                    "step": 0,
                    "rank": distributed.rank(),
                },
                next_step=(
                    "Drop those rows (dataset.filter), raise max_length if truncation cut the answers off, or "
                    "check the label masking; DataGuard(max_masked_fraction=...) or action='warn' accepts them."
                ),
                evidence=evidence,
            )
        self.alert("warning", message, step=0, evidence=evidence)
        return result

    def summary(self) -> str:
        return self._summary
