"""One layout object names the Trainer's ``checkpoint-N`` folders (``checks/_layout.py``'s ``CheckpointLayout``):
no other module builds or parses that name by hand, and every guard finds a hyper-parameter search trial's
checkpoints in the trial's own run folder."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from transformers import Trainer, TrainerCallback

import trainguard
from trainguard.callbacks import _trainer_compat
from trainguard.checks._layout import MANIFEST_NAME, CheckpointLayout

from _rig import make_lm_dataset, make_tiny_llama, training_args

SRC = Path(trainguard.__file__).resolve().parent
TEMPLATE = "checkpoint-{}"


def _by_hand(tree: ast.AST) -> list[tuple[int, str]]:
    """Strings that make or match a ``checkpoint-N`` name: an f-string that is the name or ends a path with it
    (``f"checkpoint-{step}"``, ``f"{out}/checkpoint-{step}"``), the bare prefix, or a pattern on it. A sentence
    that mentions a checkpoint (``f"checkpoint-{step} was not written: ..."``) is a message, not a path."""
    found: list[tuple[int, str]] = []
    parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            if text == TEMPLATE or text.endswith("/" + TEMPLATE) or text.endswith("{}" + TEMPLATE):
                found.append((node.lineno, text))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts:
            value = node.value
            if value in ("checkpoint-", "/checkpoint-") or "checkpoint-(" in value:
                found.append((node.lineno, value))
    return found


def test_the_rule_finds_a_planted_path_built_by_hand():
    planted = (
        'import os\nx = os.path.join(out, f"checkpoint-{step}")\ny = f"{out}/checkpoint-{step}"\nz = "checkpoint-"\n'
    )
    assert sorted(line for line, _ in _by_hand(ast.parse(planted))) == [2, 3, 4]
    message = 'msg = f"checkpoint-{step} was not written: no space"\n'
    assert _by_hand(ast.parse(message)) == []


def test_no_module_outside_the_layout_builds_or_parses_checkpoint_folder_names_by_hand():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).as_posix() == "checks/_layout.py":
            continue
        for line, text in _by_hand(ast.parse(path.read_text(encoding="utf-8"))):
            offenders.append(f"{path.relative_to(SRC)}:{line}: {text!r}")
    assert offenders == [], "use trainguard.checks._layout.CheckpointLayout:\n" + "\n".join(offenders)


def test_the_layout_names_lists_and_reads_checkpoint_folders(tmp_path: Path):
    layout = CheckpointLayout(tmp_path)
    for step in (10, 2):
        layout.folder_for(step).mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-3").write_text("a file, not a folder")
    assert layout.folder_for(2) == tmp_path / "checkpoint-2"
    assert layout.list() == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-10"]  # by step, not by name
    assert [layout.step_of(p) for p in ("out/checkpoint-7", "out/checkpoint-7/", "out/checkpoint-x")] == [7, 7, None]
    assert CheckpointLayout(tmp_path / "missing").list() == []


class _SeesSaves(TrainerCallback):
    """Where the trainer's layout says each save went, and whether it is there."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.saves: list[tuple[Path, bool]] = []

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        folder = Path(_trainer_compat.output_dir_for(self.trainer)) / f"checkpoint-{state.global_step}"
        self.saves.append((folder, folder.is_dir()))
        return control


def test_a_search_trials_checkpoints_are_found_in_the_trials_own_run_folder(tmp_path: Path):
    pytest.importorskip("optuna")
    out = tmp_path / "out"
    probe, verifier = _SeesSaves(), trainguard.CheckpointVerifier()
    trainer = Trainer(
        model_init=lambda trial=None: make_tiny_llama(),
        args=training_args(out, max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="no"),
        train_dataset=make_lm_dataset(n_rows=16),
        eval_dataset=make_lm_dataset(n_rows=4),
        callbacks=[verifier, probe],
    )
    probe.trainer = trainer
    trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-3)},
        backend="optuna",
        n_trials=1,
        direction="minimize",
    )
    run = out / "run-0"
    assert [p.name for p in CheckpointLayout(run).list()] == ["checkpoint-2", "checkpoint-4"]
    assert CheckpointLayout(out).list() == []  # nothing at the top level
    assert probe.saves == [(run / "checkpoint-2", True), (run / "checkpoint-4", True)]
    assert all((p / MANIFEST_NAME).is_file() for p in CheckpointLayout(run).list())
