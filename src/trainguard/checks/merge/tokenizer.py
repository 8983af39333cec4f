"""The tokenizer a merged version will hold, against the one the adapter was trained with (:func:`safe_merge` step 1).

The reference is the tokenizer record DatasetGuard keeps in the checkpoint's ``trainer_state.json``, else the
checkpoint's own tokenizer files; another vocabulary, EOS or chat template is refused before anything is written.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ...alerts import get_logger
from ...errors import TrainGuardError
from ...safe_fs import load_json
from ..dataset.identity import stored_record
from ..tokenizer import check_tokenizer, tokenizer_fingerprint

__all__ = ["check_version_tokenizer"]


def _load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in ``folder`` (local files only), or None when it cannot be loaded."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # any loader failure: the comparison is skipped with a note, the merge goes on
        get_logger().warning("safe_merge: cannot load the tokenizer in %s to compare it (%s: %s)", folder,
                             type(exc).__name__, exc)  # fmt: skip
        return None


def check_version_tokenizer(adapter_dir: Path, tokenizer: Any, has_files: bool, mode: str) -> list[str]:
    """Refuse a merge whose version would hold another tokenizer than the one the adapter was trained with.

    The reference: the tokenizer record DatasetGuard stored in the checkpoint's ``trainer_state.json``, else the
    checkpoint's tokenizer files (when ``tokenizer`` is given). The candidate: ``tokenizer``, else the checkpoint's
    tokenizer files (the version's copy of them; compared only with a record). Returns notes (nothing to compare).
    """
    if mode == "off":
        return []
    reference: dict[str, Any] | None = None
    source = ""
    state_path = adapter_dir / "trainer_state.json"
    if state_path.is_file():
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, TrainGuardError):
            record = stored_record(load_json(state_path))
            if record is not None and isinstance(record.get("tokenizer"), dict):
                reference, source = record["tokenizer"], "the tokenizer recorded in trainer_state.json"
    if reference is None and tokenizer is not None and has_files:
        saved = _load_tokenizer(adapter_dir)
        if saved is not None:
            reference, source = tokenizer_fingerprint(saved), "the tokenizer files of the adapter checkpoint"
    if reference is None and tokenizer is None and has_files:
        return []  # the version gets the checkpoint's own tokenizer files, and there is no record to hold them to
    if reference is None:
        return [f"{adapter_dir.name} holds no tokenizer record or loadable tokenizer files: the tokenizer is not "
                "compared"]  # fmt: skip
    if tokenizer is not None:
        current, what = tokenizer_fingerprint(tokenizer), "the tokenizer passed as tokenizer="
    elif has_files:
        loaded = _load_tokenizer(adapter_dir)
        if loaded is None:
            return [f"the tokenizer files of {adapter_dir.name} cannot be loaded: the tokenizer is not compared"]
        current, what = tokenizer_fingerprint(loaded), f"the tokenizer files in {adapter_dir.name}"
    else:
        return [f"no tokenizer will be saved with this version (none in {adapter_dir.name}, none given): pair it "
                "with the tokenizer the adapter was trained with"]  # fmt: skip
    file = state_path if source.endswith("trainer_state.json") else adapter_dir
    return check_tokenizer(
        reference,
        current,
        where={"file": str(file)},
        subject=f"refusing to merge {adapter_dir.name}: {what} is not {source}",
        next_step=(
            f"Pass the tokenizer the adapter was trained with (AutoTokenizer.from_pretrained({str(adapter_dir)!r}) "
            "when the Trainer saved it there), or check_tokenizer='warn' to publish this one anyway. Nothing was "
            "written."
        ),
        mode=mode,
    )
