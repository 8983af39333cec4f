"""Run lineage in a reused output_dir: real Trainer runs, real files, one process.

Each test is one way a real folder breaks the "one run, one truth" promise on plain transformers (and on trainguard
before lineages): a fresh run into another run's checkpoints, rotation deleting them, a save into a stale folder,
saves that bypass ``on_save`` (JIT checkpoints), checkpoints written before trainguard was attached, harmless files
dropped into a checkpoint, and ``trainguard verify`` on the folder above the output_dirs. In every one, nothing the
user had is deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

import trainguard
from trainguard.checks import checkpoint as ckpt
from trainguard.checks import lineage
from trainguard.cli import main
from trainguard.commands.inspect import inspect_output_dir

from _probes import JitAt, Probe, requires_jit
from _rig import make_trainer, run_trainer

# Touches Trainer internals: save hooks, rotation routing, end-of-training cleanup.
# Also run on the oldest supported releases (.ci/run).
pytestmark = pytest.mark.compat

SAVE = {"save_strategy": "steps", "save_steps": 2}
OWN_FILES = {ckpt.MANIFEST_NAME, ckpt.METADATA_NAME, ckpt.SAVING_MARKER}


def _user_files(output_dir: Path) -> dict[str, str]:
    """sha256 -> a path, for every file the Trainer wrote under ``output_dir`` (trainguard's own files aside)."""
    found: dict[str, str] = {}
    for path in sorted(output_dir.rglob("*")):
        if path.is_file() and path.name not in OWN_FILES and "checkpoint-" in str(path.relative_to(output_dir)):
            found.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), str(path))
    return found


def _assert_nothing_deleted(before: dict[str, str], output_dir: Path) -> None:
    after = _user_files(output_dir)
    lost = {digest: path for digest, path in before.items() if digest not in after}
    assert not lost, f"files of the earlier run are gone: {sorted(lost.values())}"


def _names(output_dir: Path) -> list[str]:
    return sorted((p.name for p in output_dir.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


def _lineage_of(folder: Path) -> str | None:
    return lineage.checkpoint_origin(folder).lineage


def _flip(path: Path, seed: int) -> None:
    data = bytearray(path.read_bytes())
    data[random.Random(seed).randrange(len(data))] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------- 1. fresh start, reused dir
def test_a_fresh_start_into_an_output_dir_with_another_runs_checkpoints_is_refused_before_the_first_step(
    output_dir: Path,
):
    run_trainer(output_dir, callbacks=trainguard.all_guards(), max_steps=6, **SAVE)  # run A: 2, 4, 6
    before = _user_files(output_dir)
    probe = Probe()
    with pytest.raises(trainguard.LineageError) as info:
        run_trainer(output_dir, callbacks=[*trainguard.all_guards(), probe], max_steps=4, **SAVE)  # run B, fresh
    assert probe.began_at is None  # plain Trainer: trains, saves over checkpoint-2 and -4, no word
    err = info.value
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):
        assert name in err.what
    for way in ("resume_from_checkpoint=True", "start_fresh", "another output_dir", "existing_checkpoints='keep'"):
        assert way in err.next_step
    assert [c["name"] for c in err.evidence["checkpoints"]] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert _user_files(output_dir) == before  # not a byte changed
    assert _names(output_dir) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_checkpoints_a_plain_trainer_wrote_also_refuse_a_fresh_start(output_dir: Path):
    run_trainer(output_dir, max_steps=2, **SAVE)  # no trainguard at all
    with pytest.raises(trainguard.LineageError) as info:
        run_trainer(output_dir, callbacks=[trainguard.CheckpointVerifier()], max_steps=2, **SAVE)
    assert "checkpoint-2 (written without trainguard)" in info.value.what


def test_archive_moves_the_old_checkpoints_away_and_starts_a_new_lineage(output_dir: Path):
    run_trainer(output_dir, callbacks=[trainguard.CheckpointVerifier()], max_steps=4, **SAVE)
    before = _user_files(output_dir)
    old = _lineage_of(output_dir / "checkpoint-4")
    run_trainer(
        output_dir, callbacks=[trainguard.CheckpointVerifier(existing_checkpoints="archive")], max_steps=2, **SAVE
    )
    assert _names(output_dir) == ["checkpoint-2"]
    assert _lineage_of(output_dir / "checkpoint-2") not in (None, old)
    archived = list((output_dir / ckpt.ARCHIVE_DIR).glob("*/checkpoint-4"))
    assert len(archived) == 1 and trainguard.verify_checkpoint(archived[0]).ok
    _assert_nothing_deleted(before, output_dir)


def test_a_new_lineage_kept_beside_the_old_one_resumes_only_its_own_checkpoints(output_dir: Path):
    run_trainer(output_dir, callbacks=[trainguard.CheckpointVerifier()], max_steps=6, **SAVE)  # A: 2, 4, 6
    a_lineage = _lineage_of(output_dir / "checkpoint-6")
    before = _user_files(output_dir)
    # B: a sweep on the same data, started deliberately beside A's checkpoints
    run_trainer(output_dir, callbacks=[trainguard.CheckpointVerifier(existing_checkpoints="keep")], max_steps=4, **SAVE)
    b_lineage = _lineage_of(output_dir / "checkpoint-4")
    assert b_lineage not in (None, a_lineage)
    assert _lineage_of(output_dir / "checkpoint-6") == a_lineage  # A's newest stays where it was
    assert get_last_checkpoint(str(output_dir)).endswith("checkpoint-6")  # what a plain resume would load

    probe, verifier = Probe(), trainguard.CheckpointVerifier()
    run_trainer(output_dir, callbacks=[verifier, probe], max_steps=6, resume_from_checkpoint=True, **SAVE)
    assert probe.began_at == 4  # B's newest, not A's checkpoint-6 (A's finished schedule)
    assert verifier.lineage == b_lineage  # the resume continues B's lineage
    assert _lineage_of(output_dir / "checkpoint-6") == b_lineage  # B's save moved A's checkpoint-6 aside first
    _assert_nothing_deleted(before, output_dir)
    archived = sorted(p.name.split(".")[0] for p in (output_dir / ckpt.ARCHIVE_DIR).glob("checkpoint-*Z"))
    assert archived == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]  # A's three, each moved when B saved there
    for folder in (output_dir / ckpt.ARCHIVE_DIR).glob("checkpoint-*Z"):
        assert _lineage_of(folder) == a_lineage and trainguard.verify_checkpoint(folder).ok
        reason = json.loads((folder.parent / f"{folder.name}.reason.json").read_text())
        assert a_lineage in reason["reason"]


def test_resume_true_where_only_another_lineages_checkpoints_exist_is_refused_by_name(output_dir: Path):
    run_trainer(output_dir, callbacks=[trainguard.CheckpointVerifier()], max_steps=2, **SAVE)
    registry = json.loads((output_dir / ckpt.RUN_MARKER).read_text())
    registry["current"] = {"lineage": "20260101T000000Z-000000", "adopts_unrecorded": False}  # a run that never saved
    (output_dir / ckpt.RUN_MARKER).write_text(json.dumps(registry))
    with pytest.raises(trainguard.LineageError) as info:
        trainguard.resolve_verified_resume(output_dir, True)
    assert "checkpoint-2" in info.value.what and "20260101T000000Z-000000" in info.value.what
    assert (output_dir / "checkpoint-2").is_dir()  # another lineage's checkpoint is never set aside


# ------------------------------------------------------------------------- 1b. train() again on the same Trainer
TIMINGS = {"train_runtime", "train_samples_per_second", "train_steps_per_second"}


def _history(trainer: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in entry.items() if k not in TIMINGS} for entry in trainer.state.log_history]


def _assert_same_weights(one: Any, other: Any) -> None:
    import torch

    mine, theirs = one.model.state_dict(), other.model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[name], theirs[name]) for name in mine), "the weights differ from the plain Trainer's"


def _model_init_trainer(output_dir: Path, callbacks: list[Any]) -> Any:
    from transformers import Trainer

    from _rig import make_lm_dataset, make_tiny_llama, training_args

    args = training_args(output_dir, max_steps=4, **SAVE)
    return Trainer(
        model_init=lambda: make_tiny_llama(), args=args, train_dataset=make_lm_dataset(), callbacks=callbacks
    )


def test_train_called_again_on_the_same_trainer_trains_as_the_plain_trainer_does_and_deletes_nothing(tmp_path: Path):
    plain = make_trainer(tmp_path / "plain", max_steps=4, **SAVE)
    plain.train()
    plain.train()  # a notebook cell run again: from step 0, on the weights the first call left
    output_dir = tmp_path / "guarded"
    trainer = make_trainer(output_dir, callbacks=trainguard.all_guards(), max_steps=4, **SAVE)
    trainer.train()
    first = _lineage_of(output_dir / "checkpoint-4")
    before = _user_files(output_dir)
    trainer.train()  # not "checkpoint(s) of another run": they are this Trainer's own
    _assert_same_weights(trainer, plain)
    assert _history(trainer) == _history(plain)
    second = _lineage_of(output_dir / "checkpoint-4")
    assert second not in (None, first) and lineage.current_scope(output_dir).lineage == second
    assert _names(output_dir) == ["checkpoint-2", "checkpoint-4"]
    _assert_nothing_deleted(before, output_dir)  # the first call's checkpoints, moved aside when saved over
    archived = sorted(p.name.split(".")[0] for p in (output_dir / ckpt.ARCHIVE_DIR).glob("checkpoint-*Z"))
    assert archived == ["checkpoint-2", "checkpoint-4"]
    assert all(_lineage_of(f) == first for f in (output_dir / ckpt.ARCHIVE_DIR).glob("checkpoint-*Z"))


def test_a_model_init_trainer_trains_twice_while_another_trainer_is_still_refused(tmp_path: Path):
    plain = _model_init_trainer(tmp_path / "plain", [])
    plain.train()
    plain.train()
    output_dir = tmp_path / "guarded"
    trainer = _model_init_trainer(output_dir, trainguard.all_guards())
    trainer.train()
    before = _user_files(output_dir)
    trainer.train()  # model_init builds a fresh model: a new run from step 0 (what hyperparameter search does)
    _assert_same_weights(trainer, plain)
    assert _history(trainer) == _history(plain)
    _assert_nothing_deleted(before, output_dir)
    # another Trainer object is another run: its fresh start is still refused, naming the checkpoints
    with pytest.raises(trainguard.LineageError, match="checkpoint-2, checkpoint-4"):
        _model_init_trainer(output_dir, trainguard.all_guards()).train()


# ------------------------------------------------------------------------------------------------- 2. rotation
def test_rotation_deletes_only_this_lineages_checkpoints(output_dir: Path, caplog: pytest.LogCaptureFixture):
    run_trainer(output_dir, callbacks=[trainguard.CheckpointVerifier()], max_steps=10, **SAVE)  # A: 2 ... 10
    a_lineage = _lineage_of(output_dir / "checkpoint-10")
    before = _user_files(output_dir)
    verifier = trainguard.CheckpointVerifier(existing_checkpoints="keep")
    run_trainer(output_dir, callbacks=[verifier], max_steps=8, save_total_limit=2, **SAVE)  # B: 2 ... 8, keep 2
    # Plain rotation (and trainguard before lineages) deleted A's checkpoints here. B's 2 and 4 are rotated away;
    # A's 10 is untouched, and A's 2 ... 8 were moved aside when B saved at those steps.
    assert _names(output_dir) == ["checkpoint-6", "checkpoint-8", "checkpoint-10"]
    assert _lineage_of(output_dir / "checkpoint-10") == a_lineage
    assert {_lineage_of(output_dir / f"checkpoint-{s}") for s in (6, 8)} == {verifier.lineage}
    _assert_nothing_deleted(before, output_dir)


def test_the_end_of_training_cleanup_for_the_best_checkpoint_keeps_other_lineages(output_dir: Path):
    run_trainer(output_dir, callbacks=[trainguard.CheckpointVerifier()], max_steps=8, **SAVE)  # A: 2 ... 8
    before = _user_files(output_dir)
    from _rig import make_lm_dataset

    run_trainer(
        output_dir,
        callbacks=[trainguard.CheckpointVerifier(existing_checkpoints="keep")],
        max_steps=4,
        save_total_limit=1,
        eval_strategy="steps",
        eval_steps=2,
        eval_dataset=make_lm_dataset(8, seed=3),
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        **SAVE,
    )
    # _finalize_training deletes every checkpoint but the best when save_total_limit == 1: only B's are listed to it
    assert {"checkpoint-6", "checkpoint-8"} <= set(_names(output_dir))
    _assert_nothing_deleted(before, output_dir)


# --------------------------------------------------------------------------------------------- 3. stale folders
def test_a_save_into_a_stale_folder_moves_it_aside_so_the_manifest_lists_only_what_the_save_wrote(output_dir: Path):
    run_trainer(output_dir, callbacks=[trainguard.CheckpointVerifier()], max_steps=2, **SAVE)  # A: full checkpoint-2
    before = _user_files(output_dir)
    run_trainer(
        output_dir,
        callbacks=[trainguard.CheckpointVerifier(existing_checkpoints="keep")],
        max_steps=2,
        save_only_model=True,
        **SAVE,
    )  # B: model only, into the same checkpoint-2
    folder = output_dir / "checkpoint-2"
    listed = set(ckpt.parse_sha256_file(folder / ckpt.MANIFEST_NAME))
    for stale in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert stale not in listed  # plain Trainer leaves A's files there and a resume loads A's optimizer
        assert not (folder / stale).exists()
    meta = json.loads((folder / ckpt.METADATA_NAME).read_text())
    assert meta["lineage"]["save_only_model"] is True
    assert meta["lineage"]["world_size"] == 1
    assert meta["lineage"]["saved_by"] == "on_save"
    moved = next((output_dir / ckpt.ARCHIVE_DIR).glob("checkpoint-2.*Z"))
    assert (moved / "optimizer.pt").is_file() and trainguard.verify_checkpoint(moved).ok
    _assert_nothing_deleted(before, output_dir)


# ------------------------------------------------------------------------------------- 4. saves without on_save
def _jit_run(output_dir: Path, request: JitAt, **kwargs: Any) -> trainguard.CheckpointVerifier:
    verifier = trainguard.CheckpointVerifier()
    trainer = make_trainer(output_dir, callbacks=[verifier, request], enable_jit_checkpoint=True, **kwargs)
    request.trainer = trainer
    trainer.train()
    return verifier


@requires_jit
def test_a_jit_save_right_after_a_regular_save_of_the_same_step_never_rewrites_the_committed_checkpoint(
    output_dir: Path,
):
    verifier = _jit_run(output_dir, JitAt(8, "save"), max_steps=12, save_strategy="steps", save_steps=4)
    # plain 5.24: the JIT save rewrites checkpoint-8 in place, its trainer_state.json no longer matches the manifest
    report = trainguard.verify_checkpoint(output_dir / "checkpoint-8")
    assert report.ok and not report.warnings
    assert lineage.checkpoint_origin(output_dir / "checkpoint-8").saved_by == "on_save"
    assert "1 repeated save(s) skipped" in verifier.summary()
    probe = Probe()
    run_trainer(
        output_dir,
        callbacks=[trainguard.CheckpointVerifier(), probe],
        max_steps=10,
        resume_from_checkpoint=True,
        save_strategy="steps",
        save_steps=4,
    )
    assert probe.began_at == 8


@requires_jit
def test_a_jit_checkpoint_gets_a_commit_marker_and_is_resumed_from(output_dir: Path):
    _jit_run(output_dir, JitAt(6, "step_end"), max_steps=12, save_strategy="steps", save_steps=4)
    folder = output_dir / "checkpoint-6"
    assert not (folder / ckpt.JIT_SENTINEL).exists()
    report = trainguard.verify_checkpoint(folder)  # before: no manifest, set aside as "interrupted" on resume
    assert report.mode == "manifest"
    assert lineage.checkpoint_origin(folder).saved_by == "jit"
    assert ckpt.JIT_SENTINEL not in ckpt.parse_sha256_file(folder / ckpt.MANIFEST_NAME)
    probe = Probe()
    run_trainer(
        output_dir,
        callbacks=[trainguard.CheckpointVerifier(), probe],
        max_steps=8,
        resume_from_checkpoint=True,
        save_strategy="steps",
        save_steps=4,
    )
    assert probe.began_at == 6
    assert not (output_dir / ckpt.QUARANTINE_DIR).exists()


class SignalSelf(TrainerCallback):
    """Sends a real SIGTERM to this process at ``step``, then slows every step so the JIT timer (3 s) fires."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.sent = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        if self.sent:
            time.sleep(0.25)


@requires_jit
@pytest.mark.slow
def test_a_real_sigterm_jit_checkpoint_is_committed(output_dir: Path):
    verifier = trainguard.CheckpointVerifier()
    trainer = make_trainer(
        output_dir, callbacks=[verifier, SignalSelf(2)], enable_jit_checkpoint=True, max_steps=200, save_strategy="no"
    )
    output = trainer.train()
    assert output.global_step < 200  # the JIT save stopped the run
    saved = list(output_dir.glob("checkpoint-*"))
    assert len(saved) == 1
    assert trainguard.verify_checkpoint(saved[0]).mode == "manifest"
    assert lineage.checkpoint_origin(saved[0]).saved_by == "jit"


# -------------------------------------------------------------------------------------- 5. legacy checkpoints
def test_checkpoints_from_before_trainguard_are_legacy_never_interrupted_and_never_set_aside_as_a_group(
    output_dir: Path, capsys: pytest.CaptureFixture
):
    run_trainer(output_dir, max_steps=4, **SAVE)  # a plain Trainer: checkpoint-2, -4
    probe = Probe()
    run_trainer(
        output_dir, callbacks=[*trainguard.all_guards(), probe], max_steps=6, resume_from_checkpoint=True, **SAVE
    )
    assert probe.began_at == 4
    capsys.readouterr()  # the Trainer's own log lines
    assert main(["verify", str(output_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    status = {c["name"]: c["status"] for c in doc["checkpoints"]}
    assert status == {
        "checkpoint-2": "unverified (legacy)",
        "checkpoint-4": "unverified (legacy)",
        "checkpoint-6": "verified",
    }
    assert "interrupted" not in json.dumps(doc)

    _flip(output_dir / "checkpoint-6" / "model.safetensors", 3)
    probe = Probe()
    run_trainer(
        output_dir, callbacks=[trainguard.CheckpointVerifier(), probe], max_steps=8, resume_from_checkpoint=True, **SAVE
    )
    assert probe.began_at == 4  # before: all three set aside, nothing left to resume from
    moved = sorted(p.name.split(".")[0] for p in (output_dir / ckpt.QUARANTINE_DIR).glob("checkpoint-*Z"))
    assert moved == ["checkpoint-6"]
    assert (output_dir / "checkpoint-2").is_dir()

    capsys.readouterr()
    assert main(["manifest", str(output_dir)]) == 0  # adopt them deliberately
    capsys.readouterr()
    assert main(["verify", str(output_dir), "--json"]) == 0
    statuses = {c["name"]: c["status"] for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert statuses["checkpoint-2"] == "verified"
    assert lineage.checkpoint_origin(output_dir / "checkpoint-2").saved_by == "adopted (trainguard manifest)"


def test_a_complete_checkpoint_without_a_manifest_is_legacy_but_one_trainguard_began_is_interrupted(output_dir: Path):
    run_trainer(output_dir, callbacks=[trainguard.CheckpointVerifier()], max_steps=4, **SAVE)
    folder = output_dir / "checkpoint-4"
    (folder / ckpt.MANIFEST_NAME).unlink()
    (folder / ckpt.METADATA_NAME).unlink()
    report = ckpt.check_checkpoint(folder)
    assert report.ok and report.status == "unverified (legacy)"  # before: "no commit marker ... interrupted"
    (folder / ckpt.SAVING_MARKER).write_text(json.dumps({"lineage": "x", "run": "y", "step": 4}))
    report = ckpt.check_checkpoint(folder)
    assert [(p.file, p.kind) for p in report.problems] == [(ckpt.SAVING_MARKER, "interrupted")]


# -------------------------------------------------------------------------------------------- 6. extra files
def test_files_a_resume_never_loads_are_warnings_and_the_checkpoint_is_still_resumed(
    output_dir: Path, caplog: pytest.LogCaptureFixture
):
    run_trainer(output_dir, callbacks=[trainguard.CheckpointVerifier()], max_steps=4, **SAVE)
    folder = output_dir / "checkpoint-4"
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "trainer_state-checkpoint.json").write_text("{}")
    (folder / "README.md").write_text("# notes on this checkpoint\n")
    report = trainguard.verify_checkpoint(folder)
    assert sorted(w.file for w in report.warnings) == [
        ".DS_Store",
        ".ipynb_checkpoints/trainer_state-checkpoint.json",
        "README.md",
    ]
    probe = Probe()
    with caplog.at_level("WARNING", logger="trainguard"):
        run_trainer(
            output_dir,
            callbacks=[trainguard.CheckpointVerifier(), probe],
            max_steps=6,
            resume_from_checkpoint=True,
            **SAVE,
        )
    assert probe.began_at == 4  # before: set aside, steps 3 and 4 redone
    assert ".DS_Store" in caplog.text
    # A file a resume would load is still a failure
    shutil.copy(output_dir / "checkpoint-6" / "model.safetensors", output_dir / "checkpoint-6" / "model-2.safetensors")
    with pytest.raises(trainguard.CheckpointIntegrityError) as info:
        trainguard.verify_checkpoint(output_dir / "checkpoint-6")
    assert info.value.evidence["problems"][0]["file"] == "model-2.safetensors"


# ----------------------------------------------------------------------------------- 7. verify above output_dirs
def test_verify_on_a_folder_of_output_dirs_checks_every_checkpoint_and_fails_if_any_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    exps = tmp_path / "exps"
    run_trainer(exps / "lr-1e-3", callbacks=[trainguard.CheckpointVerifier()], max_steps=4, **SAVE)
    shutil.copytree(exps / "lr-1e-3", exps / "sweep" / "lr-3e-4")
    (exps / "sweep" / "lr-3e-4" / "checkpoint-2" / "scheduler.pt").unlink()
    assert main(["verify", str(exps)]) == 1  # before: "ok (structural only)", exit 0
    out = capsys.readouterr().out
    assert "FAILED" in out and "scheduler.pt" in out
    assert main(["verify", str(exps), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "tree"
    entries = {(Path(c["output_dir"]).name, c["name"]): c["ok"] for c in doc["checkpoints"]}
    assert entries == {
        ("lr-1e-3", "checkpoint-2"): True,
        ("lr-1e-3", "checkpoint-4"): True,
        ("lr-3e-4", "checkpoint-2"): False,
        ("lr-3e-4", "checkpoint-4"): True,
    }
    assert {Path(d["path"]).name: d["resume_from"] is not None for d in doc["output_dirs"]} == {
        "lr-1e-3": True,
        "lr-3e-4": True,
    }


def test_usage_errors_print_json_when_json_is_asked_for(tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as info:
        main(["verify", "--json"])
    assert info.value.code == 2
    assert json.loads(capsys.readouterr().out)["error"] == "UsageError"
    tmp_path.joinpath("x").mkdir()
    assert main(["verify", str(tmp_path / "x"), "--workers", "-1", "--json"]) == 2
    assert "--workers" in json.loads(capsys.readouterr().out)["what"]


# ------------------------------------------------------------------------------------------------- inspect
def test_inspect_says_which_run_wrote_which_checkpoint(output_dir: Path):
    run_trainer(output_dir, max_steps=2, **SAVE)  # legacy checkpoint-2
    run_trainer(
        output_dir, callbacks=[trainguard.CheckpointVerifier()], max_steps=4, resume_from_checkpoint=True, **SAVE
    )
    report = inspect_output_dir(output_dir)
    by_name = {c["name"]: c for c in report["checkpoints"]}
    assert by_name["checkpoint-2"]["written_by"] == "checkpoint-2 (written without trainguard)"
    current = report["lineage"]["current"]
    assert by_name["checkpoint-4"]["origin"]["lineage"] == current
    assert report["lineage"]["adopts_unrecorded"] is True  # it grew out of the legacy checkpoint-2
    assert report["lineage"]["runs"][-1]["resumed_from"] == "checkpoint-2"
    assert report["lineage"]["lineages"][current]["from"]["state"] == "legacy"
