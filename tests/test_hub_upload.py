"""What ``push_to_hub=True`` uploads: with the guards attached, exactly what the plain Trainer uploads of the user's
files, and none of trainguard's records (lock record, lineage registry, crash log, events, spikes, hang dumps,
set-aside checkpoints, manifests).

No network: ``HfApi.create_repo`` and ``HfApi.upload_folder`` are replaced by recorders that list the files the real
``upload_folder`` would send, filtered with the ``ignore_patterns`` it was given the way huggingface_hub filters them.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import pytest

import trainguard
from _contract import record_uploads
from trainguard.alerts import EVENTS_FILE
from trainguard.atomic import TEMP_MARKER
from trainguard.callbacks import GuardCallback
from trainguard.callbacks.spike_guard import SPIKES_FILE
from trainguard.checks import _layout
from trainguard.checks import crash_loop as cl
from trainguard.checks import run_lock as rl
from trainguard.checks.checkpoint.manifest import PARTIAL_PREFIX
from trainguard.checks.checkpoint.nodes import PROBE_PREFIX
from trainguard.checks.watchdog.pending import LIVE_SUFFIX
from trainguard.checks.watchdog.report import dump_file_name

from _rig import make_trainer

pytestmark = pytest.mark.compat  # routes the Trainer's upload (callbacks/_trainer_compat.py), also on 4.x

HUB = {"push_to_hub": True, "hub_model_id": "me/x", "hub_token": "hf_fake", "hub_strategy": "checkpoint"}
SAVES = {"save_strategy": "steps", "save_steps": 2, "max_steps": 4}


@pytest.fixture
def uploads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """Every Hub upload a Trainer makes in the test, as (path_in_repo, files), instead of sending it."""
    return record_uploads(monkeypatch)


class _Alerting(GuardCallback):
    """A guard that raises one warning, so the run writes a real ``trainguard-events.jsonl``."""

    guard_name = "alerting"

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == 1:
            self.alert("warning", "odd at step 1", step=1)
        return control


def _train_and_push(output_dir: Path, callbacks: list[Any]) -> None:
    trainer = make_trainer(output_dir, callbacks=callbacks, **HUB, **SAVES)
    trainer.train()
    trainer.push_to_hub()


def test_push_to_hub_with_guards_uploads_what_the_plain_trainer_uploads_and_no_trainguard_record(
    tmp_path: Path, uploads: list[tuple[str, list[str]]]
) -> None:
    _train_and_push(tmp_path / "plain", [])
    plain = list(uploads)
    uploads.clear()

    guarded_dir = tmp_path / "guarded"
    # What an earlier guarded run left: a set-aside checkpoint (trainguard never deletes one).
    archived = guarded_dir / _layout.ARCHIVE_DIR / "20260101T000000Z-start-fresh" / "checkpoint-2"
    archived.mkdir(parents=True)
    (archived / "model.safetensors").write_bytes(b"\0" * 64)
    _train_and_push(guarded_dir, [*trainguard.all_guards(), _Alerting()])
    guarded = list(uploads)

    on_disk = {p.name for p in guarded_dir.iterdir()} | {p.name for p in (guarded_dir / "checkpoint-4").iterdir()}
    for record in (rl.INFO_NAME, _layout.RUN_MARKER, EVENTS_FILE, _layout.METADATA_NAME, _layout.MANIFEST_NAME):
        assert record in on_disk  # the guards did write them: the test below has something to keep off the Hub
    # Two saves (output_dir + last-checkpoint each), then the end-of-training push: the same calls, the same files.
    assert [where for where, _ in guarded] == ["", "last-checkpoint", "", "last-checkpoint", ""]
    assert guarded == plain
    sent = [name for _, files in guarded for name in files]
    assert not [name for name in sent if "trainguard" in name]


def test_every_name_trainguard_writes_is_kept_off_the_hub_and_the_users_files_are_not() -> None:
    from huggingface_hub.utils import filter_repo_objects

    ours = [
        rl.LOCK_NAME,
        rl.INFO_NAME,
        cl.CRASH_LOG,
        EVENTS_FILE,
        SPIKES_FILE,
        _layout.RUN_MARKER,
        dump_file_name(0),
        f"trainguard-hang-rank3-pid4242{LIVE_SUFFIX}",
        f"{_layout.ARCHIVE_DIR}/20260101T000000Z-x/checkpoint-2/model.safetensors",
        f"{_layout.QUARANTINE_DIR}/checkpoint-6/optimizer.pt",
        _layout.METADATA_NAME,
        _layout.MANIFEST_NAME,
        _layout.SAVING_MARKER,
        f"{PARTIAL_PREFIX}0.json",
        f"{PROBE_PREFIX}1234",
        f".{_layout.RUN_MARKER}{TEMP_MARKER}0a1b2c3d",
        f"sub/.model.safetensors{TEMP_MARKER}0a1b2c3d",
    ]
    users = ["README.md", "config.json", "model.safetensors", "notes/trainguard-events.jsonl", "trainguard.toml"]
    kept = list(filter_repo_objects(ours + users, ignore_patterns=list(_layout.RECORD_PATTERNS)))
    assert kept == users
    for name in ours:  # and through the same matching huggingface_hub uses
        assert any(fnmatch.fnmatch(name, pattern) for pattern in _layout.RECORD_PATTERNS), name
