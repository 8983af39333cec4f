"""Hashing split over ranks: each rank hashes its share of a checkpoint's files, one rank merges.

A checkpoint written by N ranks onto one filesystem is hashed by all of them, each a size-balanced share
(:func:`partition`), so commit and verification take about 1/N of the time where storage bandwidth allows.

- **At a save**: every rank hashes its share on a background thread (fsyncing, as the manifest requires) and leaves
  ``.trainguard-hashes-rank{r}.json`` in the folder (:func:`write_partial`); the writing rank merges them
  (:func:`collect_partials`) and writes the manifest, hashing itself whatever a share did not cover (a rank that
  died, a file that changed since): a missing share can only slow the commit, never make it vouch for less.
- **On resume**: every rank hashes its share of the checkpoint about to be verified and the digests are gathered on
  the main thread, before training; the verdict is then computed as before, reading nothing twice.

Digests are keyed by absolute path with each file's size and mtime, and are used only while both still match
(:func:`~trainguard.checks.checkpoint.manifest.known_digests`).

Example::

    shares = partition({"model.safetensors": 500, "optimizer.pt": 1000, "rng_state_0.pth": 10}, 2)
    shares   # [['optimizer.pt'], ['model.safetensors', 'rng_state_0.pth']]
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from ...atomic import atomic_write_json
from .manifest import PARTIAL_PREFIX, hash_many

__all__ = ["Digests", "collect_partials", "hash_share", "partial_path", "partition", "write_partial"]

#: ``{absolute path: (size, mtime_ns, sha256)}``
Digests = dict[str, tuple[int, int, str]]


def partition(sizes: Mapping[str, int], parts: int) -> list[list[str]]:
    """Split files into ``parts`` shares of about equal bytes (largest first, each to the lightest share); the same
    on every rank for the same listing."""
    shares: list[list[str]] = [[] for _ in range(max(1, parts))]
    loads = [0] * len(shares)
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        lightest = loads.index(min(loads))
        shares[lightest].append(name)
        loads[lightest] += sizes[name]
    return shares


def hash_share(folder: Path, names: Iterable[str], *, workers: int | None, fsync: bool) -> Digests:
    """sha256 of this rank's share, with the size and mtime each digest is valid for (files that vanished or could
    not be read are left out: whoever merges hashes them itself and reports the error)."""
    names = list(names)
    stats = {}
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(folder / name)
            stats[name] = (st.st_size, st.st_mtime_ns)
    digests = hash_many(folder, list(stats), {n: s[0] for n, s in stats.items()}, workers, fsync=fsync)
    return {
        os.path.abspath(folder / n): (stats[n][0], stats[n][1], d) for n, d in digests.items() if isinstance(d, str)
    }


def partial_path(folder: Path, rank: int) -> Path:
    return folder / f"{PARTIAL_PREFIX}{rank}.json"


def write_partial(folder: Path, rank: int, digests: Digests) -> None:
    """Leave this rank's share in the folder for the writing rank."""
    atomic_write_json(partial_path(folder, rank), {"rank": rank, "digests": digests}, indent=None)


def collect_partials(folder: Path, ranks: Iterable[int], *, timeout: float, poll: float = 0.05) -> Digests:
    """The shares of ``ranks``, waiting up to ``timeout`` seconds for them; each read is removed. What did not
    arrive in time is simply not in the result."""
    waiting = {rank: partial_path(folder, rank) for rank in ranks}
    merged: Digests = {}
    deadline = time.monotonic() + timeout
    while waiting:
        for rank, path in list(waiting.items()):
            if not path.is_file():
                continue
            with contextlib.suppress(OSError, ValueError, TypeError):
                data = json.loads(path.read_text(encoding="utf-8"))
                for key, value in (data.get("digests") or {}).items():
                    size, mtime, digest = value
                    merged[str(key)] = (int(size), int(mtime), str(digest))
            with contextlib.suppress(OSError):
                path.unlink()
            del waiting[rank]
        if waiting and time.monotonic() >= deadline:
            break
        if waiting:
            time.sleep(poll)
    return merged
