"""Content fingerprints of training data: :func:`dataset_fingerprint` and :func:`describe_dataset`.

A fingerprint answers one question: "is this the data the checkpoint was trained on, in the same order?". So it
is computed from the content only, never from paths, cache files or modification times, and it is equal in every
process and on every machine for equal content.

How each input is read (every byte stream goes through xxh3-128, which runs at tens of GB/s):

- ``datasets.Dataset`` and ``pyarrow.Table``: the Arrow buffers of each column, read in place (no Python rows).
  The byte stream is canonical: slice offsets, chunk boundaries and the padding of Arrow buffers do not change it,
  so equal rows in equal order give the same fingerprint however the table was built. A shuffled or selected
  ``Dataset`` (one with an indices mapping) is read through its mapping in bounded batches (``Table.take``), so
  it fingerprints exactly like ``flatten_indices()`` of it would, without writing anything. Column names, Arrow
  types and the row count are part of the fingerprint.
- A file, a folder or a glob of JSON/JSONL/CSV/Parquet/Arrow/text files: the bytes of each file, in sorted
  relative-path order. A folder's hidden files and ``datasets``' own ``state.json``/``dataset_info.json`` are
  skipped (they change when nothing in the data did).
- A list (or any map-style dataset with ``__len__``/``__getitem__``) of rows: canonical JSON of each row (sorted
  keys; tensors and numpy arrays by dtype, shape and values).
- A streaming ``datasets.IterableDataset`` read straight from files: those files. One with transforms (``map``,
  ``shuffle``, ...) or from a generator cannot be fingerprinted by content: a ``ValueError`` says so and what to
  pass instead.

Example::

    from trainguard import dataset_fingerprint
    assert dataset_fingerprint("data/train.jsonl") == dataset_fingerprint(Path("data/train.jsonl").resolve())
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...errors import DataValidationError
from ...safe_fs import iter_files
from ._datasets_compat import indices_table, streaming_pipeline

__all__ = [
    "RECORD_SCHEME",
    "DatasetIdentity",
    "dataset_fingerprint",
    "describe_dataset",
]

#: Version of the canonical byte streams. Fingerprints made under another scheme are not compared.
RECORD_SCHEME = 1

DATA_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".txt", ".parquet", ".arrow", ".feather")
COMPRESSED_SUFFIXES = ("", ".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4")
# datasets' save_to_disk metadata: rewritten with new fingerprints/paths when the data is the same.
SKIPPED_NAMES = frozenset({"state.json", "dataset_info.json"})
_READ_BLOCK = 8 * 1024 * 1024
_TAKE_BATCH_BYTES = 64 * 1024 * 1024


def _new_hasher() -> Any:
    import xxhash

    return xxhash.xxh3_128()


@dataclass(frozen=True)
class DatasetIdentity:
    """What the fingerprint of one dataset says: the fingerprint, the row count (None where it is not cheap to know)
    and the kind of input it was read as (``arrow``, ``files``, ``rows``)."""

    fingerprint: str
    num_rows: int | None
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dataset_fingerprint(data: Any) -> str:
    """A content fingerprint of ``data`` (32 hex digits): equal for equal content in equal order, anywhere.

    Args:
        data: A ``datasets.Dataset``, a ``pyarrow.Table``, a path (file, folder or glob) to JSON/JSONL/CSV/Parquet/
            Arrow files, a list of paths, a list of row dicts (or any map-style dataset), or a streaming
            ``IterableDataset`` read straight from files.

    Raises:
        ValueError: ``data`` cannot be fingerprinted by content (a ``DatasetDict``, an ``IterableDataset`` with
            transforms or from a generator, a row holding an object with no canonical form); the message names the
            type and what to pass instead.
        DataValidationError: A path names no readable data file.

    Example::

        fp = trainguard.dataset_fingerprint(train_ds)
        same = fp == trainguard.dataset_fingerprint(Dataset.from_list(rows))
    """
    return describe_dataset(data).fingerprint


def describe_dataset(data: Any) -> DatasetIdentity:
    """The :class:`DatasetIdentity` of ``data``: fingerprint, row count and kind. Same inputs and errors as
    :func:`dataset_fingerprint`.

    Example::

        ident = describe_dataset(train_ds)   # DatasetIdentity(fingerprint='9f..', num_rows=32, kind='arrow')
    """
    if isinstance(data, (str, os.PathLike)):
        return _describe_files(_expand_paths([data]))
    if "pyarrow" in sys.modules:
        import pyarrow as pa

        if isinstance(data, pa.Table):
            return _describe_arrow(data, None)
    if "datasets" in sys.modules:
        import datasets

        if isinstance(data, datasets.Dataset):
            return _describe_arrow(data.data.table, indices_table(data))
        if isinstance(data, datasets.IterableDataset):
            return _describe_iterable(data)
        if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            raise ValueError(
                f"cannot fingerprint a {type(data).__name__} as one dataset: pass one split, e.g. data['train']"
            )
    if isinstance(data, (list, tuple)) and data and all(isinstance(x, (str, os.PathLike)) for x in data):
        return _describe_files(_expand_paths(data))
    if isinstance(data, Mapping):
        raise ValueError(
            f"cannot fingerprint a {type(data).__name__}: pass a Dataset, a list of rows or a path to the data files"
        )
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return _describe_rows(data)
    raise ValueError(
        f"cannot fingerprint a {type(data).__module__}.{type(data).__name__} by content (it has no length or cannot "
        "be indexed): pass the files it reads (a path or glob), a datasets.Dataset or a list of rows instead"
    )


# ------------------------------------------------------------------------------------------------------- arrow
class _Streams:
    """One xxh3 stream per (column path, role), combined in path order at the end.

    Keeping each role (lengths, bytes, null positions, ...) in its own stream is what makes the result independent
    of how a column is cut into chunks: chunk after chunk, each stream receives the same bytes in the same order.
    """

    def __init__(self) -> None:
        self.streams: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def feed(self, key: str, data: Any) -> None:
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = _new_hasher()
        stream.update(data)

    def advance(self, path: str, n: int) -> int:
        start = self.counts.get(path, 0)
        self.counts[path] = start + n
        return start

    def digest_into(self, hasher: Any) -> None:
        for key in sorted(self.streams):
            hasher.update(key.encode() + b"\0")
            hasher.update(self.streams[key].digest())


def _le(array: Any, dtype: str) -> Any:
    import numpy as np

    return np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))


def _feed_array(streams: _Streams, path: str, arr: Any) -> None:
    """Feed one Arrow array (a chunk) into ``streams`` canonically; recursive for nested types."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    t = arr.type
    if isinstance(t, pa.ExtensionType):
        arr, t = arr.storage, arr.storage.type
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    n = len(arr)
    start = streams.advance(path, n)
    valid = None
    if arr.null_count:
        valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        streams.feed(path + "#null", _le(np.flatnonzero(~valid) + start, "i8"))
    if n == 0 or pa.types.is_null(t):
        return
    if pa.types.is_boolean(t):
        values = pc.fill_null(arr, False) if valid is not None else arr
        streams.feed(path, np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.uint8))
    elif _is_fixed_width(t):
        width = t.bit_width // 8
        raw = np.frombuffer(arr.buffers()[1], dtype=np.uint8)[arr.offset * width : (arr.offset + n) * width]
        if valid is not None:  # bytes under a null slot are undefined: zero them
            raw = raw.reshape(n, width).copy()
            raw[~valid] = 0
        streams.feed(path, raw)
    elif pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        if valid is not None:
            arr = pc.fill_null(arr, pa.scalar("" if pa.types.is_string(t) or pa.types.is_large_string(t) else b"", t))
        large = pa.types.is_large_string(t) or pa.types.is_large_binary(t)
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64 if large else np.int32)[
            arr.offset : arr.offset + n + 1
        ]
        streams.feed(path + "#len", _le(np.diff(offsets), "i8"))
        data = arr.buffers()[2]
        if data is not None and offsets[-1] > offsets[0]:
            streams.feed(path, memoryview(data)[int(offsets[0]) : int(offsets[-1])])
    elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_map(t):
        lengths = pc.list_value_length(arr)
        if valid is not None:
            lengths = pc.fill_null(lengths, 0)
        streams.feed(path + "#len", _le(lengths.to_numpy(zero_copy_only=False), "i8"))
        # flatten() honours the slice offset and drops the segments behind null slots
        _feed_array(streams, path + "[]", arr.flatten())
    elif pa.types.is_fixed_size_list(t):
        _feed_array(streams, path + "[]", arr.flatten())
    elif pa.types.is_struct(t):
        for i, child in enumerate(arr.flatten()):
            _feed_array(streams, f"{path}.{i}:{t.field(i).name}", child)
    else:
        # Rare types (unions, list views, ...): canonical JSON per element, still chunk-independent.
        for value in arr.to_pylist():
            streams.feed(path + "#json", _canonical_json(value, where=path).encode() + b"\n")


def _is_fixed_width(t: Any) -> bool:
    import pyarrow as pa

    if not (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_temporal(t)
        or pa.types.is_decimal(t)
        or pa.types.is_fixed_size_binary(t)
    ):
        return False
    try:
        return int(t.bit_width) % 8 == 0
    except ValueError:
        return False


def _describe_arrow(table: Any, indices: Any) -> DatasetIdentity:
    streams = _Streams()
    names = table.column_names
    if indices is None:
        num_rows = table.num_rows
        for i, name in enumerate(names):
            for chunk in table.column(i).chunks:
                _feed_array(streams, f"{i}:{name}", chunk)
    else:
        index_column = indices.column(0)
        num_rows = len(index_column)
        row_bytes = table.nbytes / max(table.num_rows, 1)
        batch = max(1024, int(_TAKE_BATCH_BYTES / max(row_bytes, 1.0)))
        for begin in range(0, num_rows, batch):
            part = table.take(index_column.slice(begin, batch))
            for i, name in enumerate(names):
                for chunk in part.column(i).chunks:
                    _feed_array(streams, f"{i}:{name}", chunk)
    final = _new_hasher()
    schema = [[name, str(table.schema.field(i).type)] for i, name in enumerate(names)]
    final.update(json.dumps({"scheme": RECORD_SCHEME, "kind": "arrow", "rows": num_rows, "schema": schema}).encode())
    streams.digest_into(final)
    return DatasetIdentity(final.hexdigest(), int(num_rows), "arrow")


# ------------------------------------------------------------------------------------------------------- files
def _is_data_file(path: Path) -> bool:
    name = path.name.lower()
    if name.startswith(".") or name in SKIPPED_NAMES or name.startswith("cache-"):
        return False
    return any(name.endswith(s + c) for s in DATA_SUFFIXES for c in COMPRESSED_SUFFIXES)


def _expand_paths(items: Iterable[str | os.PathLike[str]]) -> list[Path]:
    files: list[Path] = []
    for item in items:
        text = os.fspath(item)
        path = Path(text)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = [
                p
                for p in iter_files(path)
                if p.is_file()
                and _is_data_file(p)
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ]
            if not found:
                raise DataValidationError(
                    f"folder holds no data files ({', '.join(DATA_SUFFIXES)})", where={"file": text}
                )
            files.extend(sorted(found, key=lambda p: p.relative_to(path).as_posix()))
        elif glob.has_magic(text):
            try:
                matched = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            except RecursionError:  # glob recurses once a folder level: a tree nested deeper than the limit
                raise DataValidationError(
                    "the pattern reaches folders nested deeper than trainguard can search; name the files or a "
                    "shallower folder",
                    where={"file": text},
                ) from None
            if not matched:
                raise DataValidationError("the pattern matches no file", where={"file": text})
            files.extend(matched)
        else:
            raise DataValidationError("no such data file or folder", where={"file": text})
    return files


def _count_rows(path: Path, newlines: int, last_byte: bytes) -> int | None:
    name = path.name.lower()
    if name.endswith((".jsonl", ".ndjson")):
        return newlines + (1 if last_byte not in (b"", b"\n") else 0)
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(path).metadata.num_rows)
        except Exception:
            return None
    return None


def _describe_files(files: Sequence[Path]) -> DatasetIdentity:
    final = _new_hasher()
    final.update(json.dumps({"scheme": RECORD_SCHEME, "kind": "files", "count": len(files)}).encode())
    total: int | None = 0
    block = bytearray(_READ_BLOCK)
    view = memoryview(block)
    for path in files:
        stream = _new_hasher()
        newlines = 0
        last = b""
        try:
            size = path.stat().st_size
            with open(path, "rb", buffering=0) as fh:
                while True:
                    got = fh.readinto(block)
                    if not got:
                        break
                    stream.update(view[:got])
                    newlines += block.count(b"\n", 0, got)
                    last = bytes(view[got - 1 : got])
        except OSError as err:
            raise DataValidationError(f"cannot read data file: {err}", where={"file": str(path)}) from err
        final.update(size.to_bytes(8, "little"))
        final.update(stream.digest())
        rows = _count_rows(path, newlines, last)
        total = None if total is None or rows is None else total + rows
    return DatasetIdentity(final.hexdigest(), total, "files")


# -------------------------------------------------------------------------------------------------------- rows
def _plain(value: Any, where: str) -> Any:
    """A JSON-able canonical form of one value; tensors and arrays keep their dtype and shape."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": bytes(value).hex()}
    module = type(value).__module__
    if module.startswith("torch") and hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
        module = "numpy"
    if module.startswith("numpy"):
        import numpy as np

        if isinstance(value, np.ndarray):
            return {"$array": str(value.dtype), "shape": list(value.shape), "data": _plain(value.tolist(), where)}
        if isinstance(value, np.generic):
            return _plain(value.item(), where)
    raise ValueError(
        f"cannot fingerprint a {module}.{type(value).__name__} in {where}: it has no canonical form; convert the rows "
        "to plain Python values, tensors or numpy arrays, or fingerprint the source files instead"
    )


def _canonical_json(value: Any, where: str) -> str:
    return json.dumps(_plain(value, where), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _describe_rows(rows: Any) -> DatasetIdentity:
    n = len(rows)
    final = _new_hasher()
    final.update(json.dumps({"scheme": RECORD_SCHEME, "kind": "rows", "rows": n}).encode())
    for i in range(n):
        final.update(_canonical_json(rows[i], where=f"row {i}").encode())
        final.update(b"\n")
    return DatasetIdentity(final.hexdigest(), n, "rows")


# ---------------------------------------------------------------------------------------------------- streaming
def _describe_iterable(ds: Any) -> DatasetIdentity:
    pipeline = streaming_pipeline(ds)
    ex = pipeline.source if pipeline is not None else None
    kwargs = getattr(ex, "kwargs", None)
    files = kwargs.get("original_files") or kwargs.get("base_files") if isinstance(kwargs, Mapping) else None
    plain_source = type(ex).__name__ in ("ArrowExamplesIterable", "ExamplesIterable")
    extra_steps = pipeline is None or pipeline.extra_steps
    if plain_source and not extra_steps and files and all(isinstance(f, str) and Path(f).is_file() for f in files):
        return _describe_files([Path(f) for f in files])
    raise ValueError(
        f"cannot fingerprint this streaming IterableDataset by content (its pipeline is {type(ex).__name__}"
        f"{'' if files else ', with no local source files'}): pass the files it streams from "
        "(dataset_fingerprint('data/*.jsonl'), or DatasetGuard(train_source='data/*.jsonl'))"
    )
