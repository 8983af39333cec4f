"""The do-no-harm contract: a configuration trained twice, plain and with ``all_guards()``, must give the same
outcome — weights, ``state.log_history``, the events a user callback receives, the files a ``push_to_hub`` sends
and the type of any exception raised.

A configuration is a function ``build(output_dir, callbacks) -> trainer`` plus how to run it (``train``); the
harness adds the user's callback, records Hub uploads instead of sending them, runs it once plain and once guarded,
and compares what a user can see. Differences trainguard makes on purpose (refusals) are listed in
docs/do-no-harm.md; none of them may show up on the healthy configurations run here.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import TrainerCallback

import trainguard

# Wall-clock figures: the only entries of log_history allowed to differ between two runs.
TIMING_KEYS = frozenset(
    f"{split}_{what}"
    for split in ("train", "eval", "test")
    for what in ("runtime", "samples_per_second", "steps_per_second")
)
EVENTS = tuple(name for name in vars(TrainerCallback) if name.startswith("on_"))
HUB = {"push_to_hub": True, "hub_model_id": "me/contract", "hub_token": "hf_fake", "hub_strategy": "checkpoint"}


class EventRecorder(TrainerCallback):
    """A user's callback: every event it receives, with the step, what ``on_log``/``on_evaluate`` carry and the
    control flags it sees (put last, so it sees what every callback before it did to ``control``)."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []


def _recorder_method(name: str) -> Callable[..., None]:
    def method(self: EventRecorder, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        carried = kwargs.get("logs") if name == "on_log" else kwargs.get("metrics")
        flags = tuple(k for k, v in sorted(vars(control).items()) if v is True)
        self.events.append((name, state.global_step, tuple(sorted(carried or ())), flags))

    return method


for _name in EVENTS:
    setattr(EventRecorder, _name, _recorder_method(_name))


def would_upload(folder: str, allow: Any, ignore: Any) -> list[str]:
    """The files ``upload_folder`` would send from ``folder``: its own listing and filter, default patterns too."""
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    root = Path(folder).resolve()
    names = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file())
    ignore = [ignore] if isinstance(ignore, str) else list(ignore or [])
    return list(filter_repo_objects(names, allow_patterns=allow, ignore_patterns=ignore + DEFAULT_IGNORE_PATTERNS))


def record_uploads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """Every Hub upload a Trainer makes from now on, as ``(path_in_repo, files)``, instead of sending it."""
    from huggingface_hub import HfApi

    made: list[tuple[str, list[str]]] = []

    def create_repo(self: Any, repo_id: str, **kwargs: Any) -> Any:
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self: Any, *, folder_path: str, run_as_future: bool = False, **kwargs: Any) -> Any:
        files = would_upload(folder_path, kwargs.get("allow_patterns"), kwargs.get("ignore_patterns"))
        made.append((kwargs.get("path_in_repo") or "", files))
        if not run_as_future:
            return None
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        done.set_result(None)
        return done

    import transformers.trainer as trainer_module

    if hasattr(trainer_module, "hf_api"):  # 5.x: hf_api().create_repo / .upload_folder, looked up on the class
        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    else:  # 4.x: huggingface_hub's module functions, imported by name into transformers.trainer
        monkeypatch.setattr(trainer_module, "create_repo", lambda repo_id, **kw: create_repo(None, repo_id, **kw))
        monkeypatch.setattr(trainer_module, "upload_folder", lambda **kw: upload_folder(None, **kw))
    return made


@dataclass
class Outcome:
    """What a user can see of one run."""

    weights: dict[str, Any] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    uploads: list[tuple[str, list[str]]] = field(default_factory=list)
    error: BaseException | None = None
    result: Any = None
    trainer: Any = None


def _train(trainer: Any) -> Any:
    return trainer.train()


def run_once(
    output_dir: Path,
    build: Callable[[Path, list[Any]], Any],
    guards: list[Any],
    uploads: list[tuple[str, list[str]]],
    train: Callable[[Any], Any] = _train,
) -> Outcome:
    """Build with ``guards`` plus a user's :class:`EventRecorder` (last), run ``train(trainer)``, record it all."""
    recorder = EventRecorder()
    outcome = Outcome()
    start = len(uploads)
    try:
        outcome.trainer = build(output_dir, [*guards, recorder])
        outcome.result = train(outcome.trainer)
    except Exception as err:  # the contract compares the type of what the user gets, whatever it is
        outcome.error = err
    outcome.events = recorder.events
    outcome.uploads = uploads[start:]
    trainer = outcome.trainer
    if trainer is not None:
        outcome.log_history = [
            {k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in trainer.state.log_history
        ]
        if trainer.model is not None:
            outcome.weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return outcome


def run_pair(
    tmp_path: Path,
    build: Callable[[Path, list[Any]], Any],
    monkeypatch: pytest.MonkeyPatch,
    *,
    train: Callable[[Any], Any] = _train,
    guards: Callable[[], list[Any]] = trainguard.all_guards,
) -> tuple[Outcome, Outcome]:
    """The configuration run plain, then with the guards, each in a folder of its own."""
    uploads = record_uploads(monkeypatch)
    plain = run_once(tmp_path / "plain", build, [], uploads, train)
    guarded = run_once(tmp_path / "guarded", build, guards(), uploads, train)
    return plain, guarded


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def assert_same_outcome(plain: Outcome, guarded: Outcome, *, uploads: bool = True, healthy: bool = True) -> None:
    """Everything a user sees is the plain run's: the contract. ``uploads=False`` where no Hub push is configured;
    ``healthy=False`` for a mistake, where the plain run raises too."""
    import torch

    assert (plain.error is None) == healthy, f"the plain run itself: {plain.error!r}"
    if plain.error is not None:
        # The same mistake raises what the plain Trainer raises (trainguard's error may be a subclass of it).
        assert isinstance(guarded.error, type(plain.error)), (type(plain.error), guarded.error)
    else:
        assert guarded.error is None, f"the guards raised on a healthy run: {guarded.error!r}"
    assert plain.weights.keys() == guarded.weights.keys()
    changed = [k for k in plain.weights if not torch.equal(plain.weights[k], guarded.weights[k])]
    assert changed == [], f"the guards changed the trained weights: {changed[:5]}"
    assert len(plain.log_history) == len(guarded.log_history), (plain.log_history, guarded.log_history)
    for p, g in zip(plain.log_history, guarded.log_history, strict=True):
        assert p.keys() == g.keys(), (p, g)
        assert all(_same_value(p[k], g[k]) for k in p), (p, g)
    assert guarded.events == plain.events, _first_difference(plain.events, guarded.events)
    if uploads:
        assert plain.uploads, "the configuration pushes to the Hub: the plain run uploaded something"
    assert guarded.uploads == plain.uploads


def _first_difference(plain: list[Any], guarded: list[Any]) -> str:
    for i, (p, g) in enumerate(zip(plain, guarded, strict=False)):
        if p != g:
            return f"event {i}: plain {p}, guarded {g}"
    return f"plain has {len(plain)} events, guarded {len(guarded)}"
