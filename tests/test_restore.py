"""A set-aside checkpoint has a way back: ``trainguard restore PATH`` moves a checkpoint trainguard quarantined (or
archived) back into its output_dir. A checkpoint that verifies comes back at once; one missing only its RNG state
comes back with ``--accept-inexact`` (recorded, and the resume says "not bit-exact" once); real damage and changes
after the save are refused unless ``--force``, and the advice names ``trainguard manifest --force``. Every test runs
real Trainer runs: the quarantine happens on a real resume, and a resume after the restore succeeds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

import trainguard
from trainguard.alerts import Alert
from trainguard.checks._layout import ACCEPTED_INEXACT, METADATA_NAME, QUARANTINE_DIR
from trainguard.cli import main
from trainguard.errors import CheckpointIntegrityError

from _rig import holding_run_lock, make_tiny_llama, run_python, run_trainer


class StopAt(TrainerCallback):
    """Ends training after step ``n`` (the Trainer's own stop), so every run keeps the same max_steps."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step >= self.n:
            control.should_training_stop = True
        return control


class ListSink:
    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def send(self, alert: Alert) -> None:
        self.alerts.append(alert)


def _train(out: Path, stop: int, *, resume: Any = None, sink: ListSink | None = None) -> Any:
    # Dropout on, so a resume without the saved RNG state really draws differently (attestation can see it).
    verifier = trainguard.CheckpointVerifier(alert_sinks=[sink] if sink is not None else None)
    trainer, _ = run_trainer(
        out,
        model=make_tiny_llama(attention_dropout=0.1),
        callbacks=[verifier, StopAt(stop)],
        resume_from_checkpoint=resume,
        max_steps=8,
        save_strategy="steps",
        save_steps=2,
    )
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoint-2, -4, -6 of one run, which went on to step 7 (so the step after save 6 was recorded)."""
    out = tmp_path_factory.mktemp("restore") / "run"
    _train(out, 7)
    return out


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out, symlinks=True)
    return out


def _quarantine_on_resume(out: Path) -> Path:
    """A real resume that sets the newest checkpoint aside (and stops at step 5: no new checkpoint-6)."""
    _train(out, 5, resume=True)
    assert not (out / "checkpoint-6").exists()
    [moved] = [p for p in (out / QUARANTINE_DIR).iterdir() if p.is_dir()]
    return moved


def _restore(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["restore", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_checkpoint_missing_only_its_rng_state_comes_back_with_accept_inexact_and_the_resume_says_so_once(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / "checkpoint-6" / "rng_state.pth").unlink()
    moved = _quarantine_on_resume(run)
    code, _, err = _restore(capsys, str(moved))
    assert code == 1 and "not bit-exact" in err and "--accept-inexact" in err
    assert moved.is_dir() and not (run / "checkpoint-6").exists()  # refused: nothing moved

    code, out, _ = _restore(capsys, str(moved), "--accept-inexact")
    assert code == 0 and "restored, not bit-exact" in out and "next: " in out
    assert (run / "checkpoint-6" / "model.safetensors").is_file() and not moved.exists()
    meta = json.loads((run / "checkpoint-6" / METADATA_NAME).read_text())
    assert meta["lineage"][ACCEPTED_INEXACT]["missing"] == ["rng_state.pth"]
    assert trainguard.verify_checkpoint(run / "checkpoint-6").ok

    sink = ListSink()
    trainer = _train(run, 8, resume=True, sink=sink)
    assert trainer.state.global_step == 8 and (run / "checkpoint-8").is_dir()
    said = [a.message for a in sink.alerts if "not bit-exact" in a.message]
    assert len(said) == 1 and "resuming from checkpoint-6" in said[0], [a.message for a in sink.alerts]
    # The resume attestation would otherwise report the same thing again as a differing random state.
    assert not [a for a in sink.alerts if "random state" in a.message], [a.message for a in sink.alerts]


def test_a_truncated_checkpoint_is_refused_even_with_accept_inexact(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = run / "checkpoint-6" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    moved = _quarantine_on_resume(run)
    code, _, err = _restore(capsys, str(moved), "--accept-inexact")
    assert code == 1 and "truncated" in err and "backup" in err and "manifest" in err and "--force" in err
    assert moved.is_dir() and not (run / "checkpoint-6").exists()


def test_a_checkpoint_re_saved_on_purpose_comes_back_with_force_and_resumes_once_vouched_for(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file, save_file

    weights = run / "checkpoint-6" / "model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt", "converted": "by hand"})  # same tensors
    with pytest.raises(CheckpointIntegrityError) as refused:
        trainguard.verify_checkpoint(run / "checkpoint-6")
    assert "size changed" in refused.value.what
    assert f"trainguard manifest {run / 'checkpoint-6'} --force" in refused.value.next_step

    moved = _quarantine_on_resume(run)
    code, _, err = _restore(capsys, str(moved))
    assert code == 1 and "modified after its save" in err and "trainguard manifest" in err and "--force" in err
    code, out, _ = _restore(capsys, str(moved), "--force")
    assert code == 0 and "restored as is" in out and f"trainguard manifest {run / 'checkpoint-6'} --force" in out
    assert main(["manifest", str(run / "checkpoint-6"), "--force"]) == 0
    trainer = _train(run, 8, resume=True)
    assert trainer.state.global_step == 8 and not (run / QUARANTINE_DIR).exists()


def test_restore_never_replaces_a_checkpoint_saved_since_and_names_the_way_back_on_the_resume(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / "checkpoint-6" / "rng_state.pth").unlink()
    sink = ListSink()
    _train(run, 7, resume=True, sink=sink)  # sets checkpoint-6 aside, then saves a new checkpoint-6
    [moved] = [p for p in (run / QUARANTINE_DIR).iterdir() if p.is_dir()]
    assert any(f"trainguard restore {moved}" in a.message for a in sink.alerts), [a.message for a in sink.alerts]
    before = sorted(p.name for p in (run / "checkpoint-6").iterdir())
    code, _, err = _restore(capsys, str(moved), "--accept-inexact")
    assert code == 1 and "already there" in err and moved.is_dir()
    assert sorted(p.name for p in (run / "checkpoint-6").iterdir()) == before


def test_restore_waits_for_a_live_run_and_refuses_what_trainguard_did_not_set_aside(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / "checkpoint-6" / "rng_state.pth").unlink()
    moved = _quarantine_on_resume(run)
    with holding_run_lock(run):
        code, _, err = _restore(capsys, str(moved), "--accept-inexact")
    assert code == 1 and "holds the lock" in err and moved.is_dir()
    code, _, err = _restore(capsys, str(run / "checkpoint-4"))
    assert code == 2 and "not a checkpoint trainguard set aside" in err
    code, _, err = _restore(capsys, str(moved.parent / "checkpoint-9.20260101T000000Z"))
    assert code == 2 and "not a folder" in err
    code, out, _ = _restore(capsys, str(moved), "--accept-inexact", "--json")
    assert code == 0 and json.loads(out)["action"] == "restored, not bit-exact"


def test_a_note_added_to_a_checkpoint_is_a_warning_and_never_sets_it_aside(run: Path) -> None:
    (run / "checkpoint-6" / "notes.txt").write_text("lr looked high here\n")
    sink = ListSink()
    trainer = _train(run, 8, resume=True, sink=sink)
    assert trainer.state.global_step == 8 and not (run / QUARANTINE_DIR).exists()
    assert any("notes.txt" in a.message and a.level == "warning" for a in sink.alerts)


def test_restore_brings_back_a_checkpoint_that_verifies_without_importing_torch(run: Path) -> None:
    code = (
        "import sys\n"
        "from trainguard.checks.checkpoint import set_aside_checkpoint\n"
        "from trainguard.cli import main\n"
        f"moved = set_aside_checkpoint({str(run / 'checkpoint-6')!r}, 'archived by hand')\n"
        "code = main(['restore', str(moved)])\n"
        "print('RESULT', code, sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))\n"
    )
    result = run_python(code)
    assert "RESULT 0 []" in result.stdout, (result.stdout, result.stderr)
    assert "restored: " in result.stdout and "it was set aside because: archived by hand" in result.stdout
    assert trainguard.verify_checkpoint(run / "checkpoint-6").ok and not (run / QUARANTINE_DIR).exists()
