"""Checks on an already tokenized training set: rows that teach nothing, empty rows, rows too long for the model.

:func:`check_tokenized_dataset` reads ``input_ids`` and the supervision (``labels``, TRL's ``completion_mask`` or
``assistant_masks``) of every row: a ``datasets.Dataset`` as Arrow batches checked with numpy (seconds for millions
of rows), any other map-style dataset row by row. It returns a :class:`TokenizedCheck` with counts and the first
row indices of each finding; :class:`~trainguard.callbacks.data_guard.DataGuard` runs it before the first training
step and :func:`~trainguard.checks.data.verdict.judge_tokenized` decides what to do about it.

Every label shape the Trainer trains is read: a list per row (causal LM, token classification with -100, seq2seq),
one class id or one float per row (sequence classification, regression: a Python number, a 0-d tensor, an Arrow int
or float column), a float vector per row (multi-label targets). A shape the check does not understand is named once
in :attr:`TokenizedCheck.stepped_aside` and the checks that need that column are not run; it never raises on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

__all__ = ["IGNORE_INDEX", "TokenizedCheck", "check_tokenized_dataset"]

#: The label value the loss ignores (transformers' ``-100``).
IGNORE_INDEX = -100


@dataclass
class TokenizedCheck:
    """What :func:`check_tokenized_dataset` found in a tokenized dataset.

    Attributes:
        rows: Rows checked.
        empty_rows / masked_rows / over_limit_rows: Counts: no ``input_ids``; no supervised token (every label
            ignored, or the mask column all zero); longer than ``max_positions``.
        empty_examples / masked_examples / over_limit_examples: The first few row indices of each.
        supervision: Where supervision was read: ``"labels"``, ``"completion_mask"``, ``"assistant_masks"``, or
            ``None`` when the collator will make labels from ``input_ids`` (every token supervised).
        max_len: The longest row, in tokens.
        max_positions: The limit rows were compared with (None: not checked).
        skipped: Why nothing was checked, when nothing was (no ``input_ids`` column, a streaming dataset...).
        stepped_aside: Column name -> the shape met there that the check does not read (a struct, strings, nested
            lists...): the checks that need that column were not run. Recorded once per column, however many rows.
    """

    rows: int = 0
    empty_rows: int = 0
    masked_rows: int = 0
    over_limit_rows: int = 0
    empty_examples: list[int] = dc_field(default_factory=list)
    masked_examples: list[int] = dc_field(default_factory=list)
    over_limit_examples: list[int] = dc_field(default_factory=list)
    supervision: str | None = None
    max_len: int = 0
    max_positions: int | None = None
    skipped: str | None = None
    stepped_aside: dict[str, str] = dc_field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def check_tokenized_dataset(
    dataset: Any,
    *,
    max_positions: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    completion_only_loss: bool = True,
    batch_size: int = 50_000,
    max_examples: int = 5,
) -> TokenizedCheck:
    """Find the rows of a tokenized dataset that teach nothing or that the model cannot take.

    A ``datasets.Dataset`` is read as Arrow batches and checked with numpy (seconds for millions of rows); any
    other map-style dataset (a list of dicts, a torch ``Dataset`` of dicts) is read row by row.

    Args:
        dataset: Rows with ``input_ids`` and optionally ``labels``, ``completion_mask`` or ``assistant_masks``.
        max_positions: Rows longer than this are counted (the model's position limit). None: not checked.
        ignore_index: The label value the loss ignores (-100 in transformers).
        completion_only_loss: Whether a ``completion_mask`` column decides the supervised tokens (TRL's default).
        batch_size: Rows per Arrow batch.
        max_examples: Row indices kept per finding.

    Example::

        found = check_tokenized_dataset(trainer.train_dataset, max_positions=model.config.max_position_embeddings)
        print(found.masked_rows)
    """
    result = TokenizedCheck(max_positions=max_positions)
    columns = _column_names(dataset)
    if columns is None:
        result.skipped = f"cannot list the columns of a {type(dataset).__name__}"
        return result
    if "input_ids" not in columns:
        result.skipped = "the dataset has no input_ids column (it is tokenized later, by the collator)"
        return result
    if "labels" in columns:
        result.supervision = "labels"
    elif completion_only_loss and "completion_mask" in columns:
        result.supervision = "completion_mask"
    elif "assistant_masks" in columns:
        result.supervision = "assistant_masks"
    if hasattr(dataset, "with_format") and hasattr(dataset, "iter") and hasattr(dataset, "__len__"):
        _check_arrow(dataset, result, ignore_index, batch_size, max_examples)
    elif hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        _check_rows(dataset, result, ignore_index, max_examples)
    else:
        result.skipped = "a streaming dataset cannot be scanned before training without consuming it"
    return result


def _column_names(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list):
        return names
    if isinstance(dataset, Sequence) and len(dataset) and isinstance(dataset[0], dict):
        return list(dataset[0])
    try:
        first = dataset[0]
    except Exception:
        return None
    return list(first) if isinstance(first, dict) else None


def _arrow_kind(dtype: Any) -> str | None:
    """``"list"`` (a flat list of numbers per row), ``"scalar"`` (one number per row) or None (a shape not read)."""
    import pyarrow as pa

    def numeric(t: Any) -> bool:
        return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t))

    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
        return "list" if numeric(dtype.value_type) else None
    return "scalar" if numeric(dtype) else None


def _integral(dtype: Any) -> bool:
    """Whether an Arrow column (or its list values) holds integers: only then is ``ignore_index`` a masked label.

    Float labels are regression or multi-label targets; their losses (MSE, BCE) ignore no value.
    """
    import pyarrow as pa

    inner = dtype.value_type if hasattr(dtype, "value_type") else dtype
    return bool(pa.types.is_integer(inner))


def _list_stats(column: Any, ignore_index: int | None) -> tuple[Any, Any]:
    """Per row of an Arrow list column: its length, and how many values are supervised.

    Supervised means ``!= ignore_index`` (labels) or non-zero (a 0/1 mask, when ``ignore_index`` is None).
    """
    import numpy as np
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    lengths, supervised = [], []
    for chunk in chunks:
        if pa.types.is_fixed_size_list(chunk.type):  # a padded dataset
            width = chunk.type.list_size
            offsets = np.arange(len(chunk) + 1, dtype=np.int64) * width + chunk.offset * width
        else:
            offsets = chunk.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        values = chunk.values.to_numpy(zero_copy_only=False)  # offsets index into the unsliced values
        good = (values != ignore_index) if ignore_index is not None else (values != 0)
        cum = np.concatenate([[0], np.cumsum(good, dtype=np.int64)])
        lengths.append(offsets[1:] - offsets[:-1])
        supervised.append(cum[offsets[1:]] - cum[offsets[:-1]])
    if not lengths:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(lengths), np.concatenate(supervised)


def _scalar_supervised(column: Any, ignore_index: int | None) -> Any:
    """Per row of an Arrow column holding one label per row: 1 when it is supervised, 0 when the loss ignores it."""
    import numpy as np

    values = column.to_numpy(zero_copy_only=False)
    if ignore_index is None:
        return (values != 0).astype(np.int64)
    return (values != ignore_index).astype(np.int64)


def _check_arrow(dataset: Any, result: TokenizedCheck, ignore_index: int, batch_size: int, max_examples: int) -> None:
    import numpy as np

    # The Arrow schema says each column's shape once, for every row; an indices mapping does not change it.
    table = getattr(dataset, "data", None)
    schema = getattr(table, "schema", None)
    if schema is not None and _arrow_kind(schema.field("input_ids").type) != "list":
        result.stepped_aside["input_ids"] = str(schema.field("input_ids").type)
        result.skipped = f"input_ids is a {schema.field('input_ids').type} column, not a list of token ids per row"
        return
    sup_kind, sup_ignore = None, None
    if result.supervision and schema is not None:
        dtype = schema.field(result.supervision).type
        sup_kind = _arrow_kind(dtype)
        if sup_kind is None:
            result.stepped_aside[result.supervision] = str(dtype)
        elif result.supervision == "labels":
            sup_ignore = ignore_index if _integral(dtype) else None
    wanted = ["input_ids"] + ([result.supervision] if sup_kind else [])
    # The arrow format honours an indices mapping (after select/shuffle/filter); the raw table would not.
    view = dataset.with_format("arrow", columns=wanted)
    offset = 0
    for table in view.iter(batch_size=batch_size):
        lengths, _ = _list_stats(table.column("input_ids"), None)
        n = len(lengths)
        masked = np.zeros(n, dtype=bool)
        if sup_kind and (sup_ignore is not None or result.supervision != "labels"):
            column = table.column(result.supervision)
            keep = sup_ignore if result.supervision == "labels" else None
            if sup_kind == "list":
                _, supervised = _list_stats(column, keep)
            else:
                supervised = _scalar_supervised(column, keep)
            masked = (supervised == 0) & (lengths > 0)
        empty = lengths == 0
        _tally(result, "empty", empty, offset, max_examples)
        _tally(result, "masked", masked, offset, max_examples)
        if result.max_positions is not None:
            _tally(result, "over_limit", lengths > result.max_positions, offset, max_examples)
        if n:
            result.max_len = max(result.max_len, int(lengths.max()))
        offset += n
    result.rows = offset


def _tally(result: TokenizedCheck, name: str, mask: Any, offset: int, max_examples: int) -> None:
    import numpy as np

    hits = np.nonzero(mask)[0]
    if not len(hits):
        return
    setattr(result, f"{name}_rows", getattr(result, f"{name}_rows") + len(hits))
    examples: list[int] = getattr(result, f"{name}_examples")
    room = max_examples - len(examples)
    if room > 0:
        examples.extend(int(i) + offset for i in hits[:room])


def _row_value(value: Any) -> tuple[str | None, Any]:
    """One row's field as ``("list", [numbers])``, ``("scalar", number)`` or ``(None, a description of its shape)``.

    Tensors and numpy arrays are read through ``tolist()``: a 0-d tensor is one number, a 1-d one a list.
    """
    plain = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(plain, (int, float)):  # bool is an int
        return "scalar", plain
    if isinstance(plain, (list, tuple)) and all(isinstance(v, (int, float)) for v in plain):
        return "list", list(plain)
    shape = getattr(value, "shape", None)
    if shape is not None:
        return None, f"a {type(value).__name__} of shape {tuple(shape)}"
    if isinstance(plain, (list, tuple)):
        inner = next((v for v in plain if not isinstance(v, (int, float))), None)
        return None, f"a {type(value).__name__} of {type(inner).__name__}"
    return None, f"a {type(value).__name__}"


def _check_rows(dataset: Any, result: TokenizedCheck, ignore_index: int, max_examples: int) -> None:
    def note(name: str, i: int) -> None:
        setattr(result, f"{name}_rows", getattr(result, f"{name}_rows") + 1)
        examples: list[int] = getattr(result, f"{name}_examples")
        if len(examples) < max_examples:
            examples.append(i)

    def step_aside(column: str, shape: str) -> None:
        result.stepped_aside.setdefault(column, shape)  # once per column, not once per row

    n = len(dataset)
    for i in range(n):
        row = dataset[i]
        ids = row.get("input_ids") if isinstance(row, dict) else None
        if ids is None:
            length = 0
        else:
            kind, ids_values = _row_value(ids)
            if kind != "list":
                step_aside("input_ids", ids_values if kind is None else "a number")
                continue
            length = len(ids_values)
        result.max_len = max(result.max_len, length)
        if length == 0:
            note("empty", i)
            continue
        if result.supervision and result.supervision not in result.stepped_aside:
            sup = row.get(result.supervision)
            kind, values = _row_value(sup) if sup is not None else ("list", [])
            if kind is None:
                step_aside(result.supervision, str(values))
            elif result.supervision == "labels":
                items = values if kind == "list" else [values]
                # Only integer labels can be ignored; float targets (regression, multi-label) always count.
                if all(type(v) is int for v in items) and all(v == ignore_index for v in items):
                    note("masked", i)
            elif not any(values if kind == "list" else [values]):
                note("masked", i)
        if result.max_positions is not None and length > result.max_positions:
            note("over_limit", i)
    result.rows = n
