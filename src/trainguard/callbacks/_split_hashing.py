"""Hashing split over the ranks that share a folder (:mod:`trainguard.checks.checkpoint.split`), for
CheckpointVerifier: at a save, every rank hashes its share off the training thread and the writing rank merges; on
resume, every rank hashes its share of the checkpoint about to be verified, gathered before anything loads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import distributed
from ..alerts import get_logger
from ..checks._layout import JIT_SENTINEL, MANIFEST_NAME, METADATA_NAME
from ..checks._resume import resolve_resume_checkpoint
from ..checks.checkpoint import split
from ..checks.checkpoint.manifest import has_manifest, list_files, parse_sha256_file

__all__ = ["SplitHasher"]


class SplitHasher:
    """One per CheckpointVerifier; inactive in a single process and across node-local folders."""

    def __init__(self, *, workers: int | None, timeout: float = 600.0) -> None:
        self.workers = workers
        self.timeout = timeout
        #: files this rank hashed for split manifests and split verification
        self.hashed_files = 0
        self._threads: list[threading.Thread] = []

    def share_save(self, folder: Path, *, writer: bool) -> Callable[[], split.Digests] | None:
        """Every rank, after the barrier at ``on_save``. Another rank starts hashing its share in the background
        and returns None; the writer gets what its committer calls on the hashing thread: its own share, then the
        others' (waited for)."""
        files = list_files(folder)
        files.pop(METADATA_NAME, None)
        files.pop(JIT_SENTINEL, None)
        rank, world = distributed.rank(), distributed.world_size()
        mine = split.partition(files, world)[rank]
        if writer:

            def known() -> split.Digests:
                own = split.hash_share(folder, mine, workers=self.workers, fsync=True)
                self.hashed_files += len(own)
                others = [r for r in range(world) if r != rank]
                return {**own, **split.collect_partials(folder, others, timeout=self.timeout)}

            return known
        thread = threading.Thread(
            target=self._hash_and_leave, args=(folder, rank, mine), name="trainguard-split-hash", daemon=True
        )
        thread.start()
        self._threads.append(thread)
        return None

    def _hash_and_leave(self, folder: Path, rank: int, names: list[str]) -> None:
        try:
            digests = split.hash_share(folder, names, workers=self.workers, fsync=True)
            split.write_partial(folder, rank, digests)
            self.hashed_files += len(digests)
        except Exception as exc:  # the writer hashes what is missing itself: slower, never less
            get_logger().warning("[checkpoint_verifier] rank %d could not hash its share of %s: %s", rank, folder, exc)

    def wait(self) -> None:
        """Until this rank's shares are on disk (the writer is waiting for them)."""
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.join()

    def share_verify(self, output_dir: Any, resume: Any) -> split.Digests | None:
        """Collective, before the resume decision: every rank hashes its share of the checkpoint the Trainer would
        load; the main process gets every digest (None elsewhere, or when there is nothing to share)."""
        plan: tuple[str, dict[str, int]] | None = None
        if distributed.is_main_process():
            plan = _verify_plan(output_dir, resume)
        plan = distributed.broadcast_object(plan)
        if plan is None:
            return None
        folder, sizes = Path(plan[0]), plan[1]
        mine = split.partition(sizes, distributed.world_size())[distributed.rank()]
        own = split.hash_share(folder, mine, workers=self.workers, fsync=False)
        self.hashed_files += len(own)
        shares = distributed.gather_object(own)
        if not distributed.is_main_process():
            return None
        merged: split.Digests = {}
        for share in shares:
            merged.update(share or {})
        return merged


def _verify_plan(output_dir: Any, resume: Any) -> tuple[str, dict[str, int]] | None:
    """The checkpoint a resume would verify first and its listed files with their sizes on disk."""
    try:
        folder = resolve_resume_checkpoint(output_dir, resume)
        if folder is None or not has_manifest(folder):
            return None
        listed = parse_sha256_file(folder / MANIFEST_NAME)
        on_disk = list_files(folder)
    except (OSError, ValueError):
        return None
    return str(folder), {n: on_disk[n] for n in listed if n in on_disk and n != METADATA_NAME}
