"""A FIFO or a link planted under each name trainguard uses in an output_dir, with the real Trainer and every guard:
the run and the commands never block, never write through the link, and never raise anything but a
TrainGuardError."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

import trainguard
from trainguard import TrainGuardError, cli

from _rig import make_trainer

pytestmark = pytest.mark.timeout(180)  # a run that blocks on a FIFO fails here instead of hanging CI

NAMES = [
    ".trainguard.lock",
    ".trainguard.lock.json",
    "trainguard-events.jsonl",
    "trainguard-crashes.jsonl",
    "trainguard-checkpoints.json",
]


@pytest.mark.parametrize("kind", ["fifo", "link"])
@pytest.mark.parametrize("name", NAMES)
def test_a_planted_fifo_or_link_never_blocks_the_run_or_is_written_through(tmp_path: Path, name: str, kind: str):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "someone-else.txt"
    victim.write_text("keep me\n")
    planted = out / name
    if kind == "fifo":
        os.mkfifo(planted)
    else:
        planted.symlink_to(victim)

    trainer, refused = None, None
    try:
        trainer = make_trainer(out, callbacks=trainguard.all_guards(), max_steps=2, save_steps=1)
        trainer.train()
    except TrainGuardError as err:
        refused = err
    finally:
        if trainer is not None:
            for callback in trainer.callback_handler.callbacks:
                with contextlib.suppress(Exception):
                    getattr(callback, "release", lambda: None)()
    # The run goes on without the events log (the sink warns and stops); the lineage registry, rewritten whole, is
    # replaced by an atomic rename (the link itself, never its target); anything else is refused, naming the path.
    if refused is not None:
        assert isinstance(refused, trainguard.UnsafeFileError), refused
        assert refused.where["file"].endswith(name)
    elif name == "trainguard-checkpoints.json":
        assert planted.is_file() and not planted.is_symlink()
        assert json.loads(planted.read_text())["current"]
    else:
        assert name == "trainguard-events.jsonl", f"{name} ({kind}) was used as if it were trainguard's"
        assert os.path.lexists(planted), "the planted file is not trainguard's to remove"
    assert victim.read_text() == "keep me\n", f"{name} ({kind}): written through"

    for argv in (["inspect", str(out), "--json"], ["verify", str(out), "--json"]):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
            code = cli.main(argv)
        assert code in (0, 1, 2)
        json.loads(stdout.getvalue())
    assert victim.read_text() == "keep me\n"
