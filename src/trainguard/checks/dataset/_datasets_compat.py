"""The seam with ``datasets`` internals: the only module that reads a private name of a ``datasets`` object.

``datasets`` publishes neither the row selection of a ``Dataset`` built by ``select``/``shuffle``/``filter`` (the
indices mapping over its Arrow table) nor the pipeline of a streaming ``IterableDataset``; a content fingerprint
needs both. Each reader here turns a missing private name into "not known" after one log line naming it
(:func:`trainguard._util.private_missing`), so a ``datasets`` release that renames it switches the feature off
instead of crashing.

Example::

    from trainguard.checks.dataset._datasets_compat import indices_table
    indices_table(ds)          # the indices mapping's Arrow table, or None when rows are in table order
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..._util import private_missing

__all__ = ["StreamingPipeline", "indices_table", "streaming_pipeline"]


def indices_table(ds: Any) -> Any | None:
    """The Arrow table of ``ds``'s indices mapping (``Dataset._indices``), or None when its rows are the table's in
    order, or when this ``datasets`` has no such attribute (then said once in the log)."""
    if not hasattr(ds, "_indices"):
        private_missing("datasets.Dataset._indices", "fingerprinting a selected or shuffled Dataset by its rows")
        return None
    indices = ds._indices
    return None if indices is None else getattr(indices, "table", indices)


@dataclass(frozen=True)
class StreamingPipeline:
    """What a streaming ``IterableDataset`` reads and does: its source iterable and whether steps (formatting,
    shuffling) sit on top of it."""

    source: Any
    extra_steps: bool


def streaming_pipeline(ds: Any) -> StreamingPipeline | None:
    """The pipeline of a streaming ``IterableDataset`` (``_ex_iterable``, ``_formatting``, ``_shuffling``), or None
    when this ``datasets`` has no ``_ex_iterable`` (said once in the log: fingerprinting it by its files is off)."""
    if not hasattr(ds, "_ex_iterable"):
        private_missing("datasets.IterableDataset._ex_iterable", "fingerprinting a streaming dataset by its files")
        return None
    extra_steps = getattr(ds, "_formatting", None) is not None or bool(getattr(ds, "_shuffling", None))
    return StreamingPipeline(ds._ex_iterable, extra_steps)
