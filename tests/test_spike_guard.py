"""SpikeGuard with the real Trainer on the tiny Llama: a poisoned batch (a row of random high tokens among rows of a
pattern the model learns fast) spikes the loss and the gradient norm at a known step. Each policy is shown on one
rank and on two (torchrun, gloo): ``alert`` tells and changes nothing, ``skip`` withholds that step's update on
every rank, ``rollback`` goes back to the newest verified checkpoint before the spike, skips the batch on the replay,
records it, and ends with finite weights. A healthy run is untouched; the detector's rules are unit-tested.

The windows are shortened (16 steps, warmup 8) so a run of 34 steps can show a spike after warmup; the defaults
(128/6/64) are the published ones and are checked as such.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

import trainguard
from trainguard.callbacks.spike_guard import SPIKES_FILE, SpikeGuard
from trainguard.checks.lineage import checkpoint_origin
from trainguard.checks.spike import (
    SpikeDetector,
    dataset_indices,
    rollback_target,
    row_digest,
    rows_of,
    spike_message,
)
from trainguard.errors import LossSpikeError

from _rig import TESTS_DIR, make_spike_dataset, make_trainer, run_torchrun

POISON = 60  # with 2 rows a step in order, rows 60 and 61 are step 31's batch
SPIKE_STEP = 31


class Weights(TrainerCallback):
    """A copy of the weights at the end of every step (after the update), by step."""

    def __init__(self) -> None:
        self.at: dict[int, list[torch.Tensor]] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        self.at[int(state.global_step)] = [p.detach().clone() for p in model.parameters()]
        return control


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def spike_trainer(output_dir: Path, *callbacks: Any, poison: tuple[int, ...] = (POISON,), **args: Any) -> Any:
    """A Trainer on the spike data (34 steps of 2 rows in order, a checkpoint every 10) with ``callbacks``, in order."""
    kwargs: dict[str, Any] = {
        "max_steps": 34,
        "learning_rate": 3e-3,
        "train_sampling_strategy": "sequential",
        "save_strategy": "steps",
        "save_steps": 10,
    }
    kwargs.update(args)
    return make_trainer(
        output_dir, callbacks=list(callbacks), train_dataset=make_spike_dataset(80, poison=poison), **kwargs
    )


def records(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / SPIKES_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def guard(policy: str, **kwargs: Any) -> SpikeGuard:
    return SpikeGuard(policy=policy, window=16, warmup=8, **kwargs)


# ---------------------------------------------------------------------------------------------------- one rank
def test_plain_trainer_applies_the_poisoned_batch_without_a_word(tmp_path: Path) -> None:
    weights = Weights()
    trainer = spike_trainer(tmp_path, guard("alert"), weights)
    trainer.train()
    grad_norms = {h["step"]: h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h}
    # The spike is real: the poisoned step's gradient norm is several times its neighbours'.
    assert grad_norms[SPIKE_STEP] > 3 * grad_norms[SPIKE_STEP - 1]
    assert not same(weights.at[SPIKE_STEP - 1], weights.at[SPIKE_STEP])


def test_alert_policy_names_the_step_z_score_and_the_poisoned_sample_and_changes_nothing(tmp_path: Path) -> None:
    weights = Weights()
    spike = guard("alert")
    trainer = spike_trainer(tmp_path, spike, weights)
    trainer.train()
    assert [f.step for f in spike.findings] == [SPIKE_STEP]
    assert spike.skipped_steps == [] and spike.rollbacks == []
    assert not same(weights.at[SPIKE_STEP - 1], weights.at[SPIKE_STEP])  # the update was applied
    alerts = [a for a in spike.alerter.history if a.guard == "spike_guard"]
    assert len(alerts) == 1 and alerts[0].step == SPIKE_STEP and alerts[0].level == "warning"
    assert alerts[0].evidence["z"] > 6
    assert POISON in alerts[0].evidence["dataset_indices"]
    assert "standard deviations" in alerts[0].message and str(POISON) in alerts[0].message
    (record,) = records(tmp_path)
    assert record["event"] == "alert" and record["step"] == SPIKE_STEP and POISON in record["dataset_indices"]
    assert len(record["sample_ids"]) == 2  # the two rows of the step's batch
    assert trainer.state.global_step == 34


def test_skip_policy_withholds_the_spike_steps_update_only(tmp_path: Path) -> None:
    weights = Weights()
    spike = guard("skip")
    trainer = spike_trainer(tmp_path, spike, weights)
    trainer.train()
    assert spike.skipped_steps == [SPIKE_STEP]
    assert same(weights.at[SPIKE_STEP - 1], weights.at[SPIKE_STEP])  # the poisoned batch taught nothing
    assert not same(weights.at[SPIKE_STEP], weights.at[SPIKE_STEP + 1])  # and training went on
    alert = next(a for a in spike.alerter.history if a.guard == "spike_guard")
    assert "update skipped" in alert.message and alert.evidence["z"] > 6
    assert POISON in alert.evidence["dataset_indices"]
    assert records(tmp_path)[0]["event"] == "skip"
    assert trainer.state.global_step == 34


def test_rollback_resumes_before_the_spike_skips_its_batch_records_it_and_ends_finite(tmp_path: Path) -> None:
    spike = guard("rollback")
    trainer = spike_trainer(tmp_path, spike, save_steps=10)
    trainer.train()
    assert [(s, Path(c).name) for s, c in spike.rollbacks] == [(SPIKE_STEP, "checkpoint-30")]
    assert spike.skipped_steps == [SPIKE_STEP]  # on the replay
    assert trainer.state.global_step == 34
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    events = records(tmp_path)
    rollback = next(r for r in events if r["event"] == "rollback")
    assert rollback["skip_steps"] == [SPIKE_STEP] and Path(rollback["checkpoint"]).name == "checkpoint-30"
    assert POISON in rollback["dataset_indices"] and rollback["z"] > 6
    assert [r["step"] for r in events if r["event"] == "skipped_batch"] == [SPIKE_STEP]
    # Nothing of the spiked step was saved; the final checkpoint is the replay's, and it verifies.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [f"checkpoint-{n}" for n in (10, 20, 30, 34)]
    assert trainguard.verify_checkpoint(tmp_path / "checkpoint-34").ok


def test_rollback_replay_equals_training_without_the_poisoned_batch(tmp_path: Path) -> None:
    spike = guard("rollback")
    rolled = spike_trainer(tmp_path / "rolled", spike)
    rolled.train()
    skipped = guard("skip")
    direct = spike_trainer(tmp_path / "skipped", skipped)
    direct.train()
    # Same data order, same schedule, the poisoned update withheld: the same weights to the last bit on CPU.
    assert same(list(rolled.model.parameters()), list(direct.model.parameters()))


def committed_spike_record(checkpoint: Path) -> dict[str, Any]:
    """What SpikeGuard committed in ``checkpoint``'s manifest (lineage record, ``guards`` -> ``spike_guard``)."""
    meta = json.loads((checkpoint / "trainguard-manifest.json").read_text())
    return dict(meta["lineage"].get("guards", {}).get("spike_guard", {}))


def forge_manifest(checkpoint: Path, rollbacks: list[dict[str, Any]]) -> None:
    """Someone who can write the folder puts ``rollbacks`` into a committed manifest and re-hashes its commit marker
    (the strongest planted record: the marker vouches for it again)."""
    from trainguard.checks.checkpoint.manifest import format_sha256_lines, parse_sha256_file, sha256_file

    meta_path = checkpoint / "trainguard-manifest.json"
    meta = json.loads(meta_path.read_text())
    meta["lineage"]["guards"] = {"spike_guard": {"rollbacks": rollbacks}}
    meta_path.write_text(json.dumps(meta))
    marker = checkpoint / "trainguard-manifest.sha256"
    digests = parse_sha256_file(marker)
    digests["trainguard-manifest.json"] = sha256_file(meta_path)
    marker.write_text(format_sha256_lines(digests))


def history_warnings(spike: SpikeGuard) -> list[Any]:
    return [a for a in spike.alerter.history if a.guard == "spike_guard" and "nothing committed confirms" in a.message]


def test_a_rollback_commits_its_skips_in_the_manifest_of_every_later_checkpoint(tmp_path: Path) -> None:
    spike = guard("rollback")
    spike_trainer(tmp_path, trainguard.CheckpointVerifier(), spike).train()
    lineage = checkpoint_origin(tmp_path / "checkpoint-34").lineage
    assert committed_spike_record(tmp_path / "checkpoint-34") == {
        "rollbacks": [
            {
                "lineage": lineage,
                "spike_step": SPIKE_STEP,
                "checkpoint": "checkpoint-30",
                "checkpoint_step": 30,
                "skip_steps": [SPIKE_STEP],
            }
        ]
    }
    assert committed_spike_record(tmp_path / "checkpoint-30") == {}  # saved before the spike: nothing to carry
    assert trainguard.verify_checkpoint(tmp_path / "checkpoint-34").ok  # the record is inside what the marker hashes


def test_a_genuine_rollback_is_skipped_again_by_a_resume_in_a_new_process_with_an_alert_naming_the_steps(
    tmp_path: Path,
) -> None:
    spike_trainer(tmp_path, trainguard.CheckpointVerifier(), guard("rollback")).train()
    again = guard("rollback")  # a new process resuming from before the spike
    weights = Weights()
    trainer = spike_trainer(tmp_path, trainguard.CheckpointVerifier(), again, weights)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-20"))
    assert again.skipped_steps == [SPIKE_STEP]
    assert again.findings == []  # the poisoned batch never reached the optimizer, nor the window
    assert same(weights.at[SPIKE_STEP - 1], weights.at[SPIKE_STEP])
    (announced,) = [a for a in again.alerter.history if a.guard == "spike_guard" and "resuming from" in a.message]
    assert f"step(s) {SPIKE_STEP} will be withheld again" in announced.message
    assert "checkpoint-34" in announced.message and announced.evidence["skip_steps"] == [SPIKE_STEP]
    assert history_warnings(again) == []  # the jsonl's rollback line is the committed one
    # The replay's checkpoints carry the rollback on, so a resume from them or before them still knows it.
    assert committed_spike_record(tmp_path / "checkpoint-34")["rollbacks"][0]["skip_steps"] == [SPIKE_STEP]


def test_a_committed_rollback_is_announced_but_not_applied_under_policy_alert(tmp_path: Path) -> None:
    spike_trainer(tmp_path, trainguard.CheckpointVerifier(), guard("rollback")).train()
    again = guard("alert")  # alert cannot have written a rollback: it re-applies none
    weights = Weights()
    trainer = spike_trainer(tmp_path, trainguard.CheckpointVerifier(), again, weights)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-20"))
    assert again.skipped_steps == []
    assert not same(weights.at[SPIKE_STEP - 1], weights.at[SPIKE_STEP])
    (announced,) = [a for a in again.alerter.history if a.guard == "spike_guard" and "resuming from" in a.message]
    assert f"step(s) {SPIKE_STEP} are NOT skipped: policy 'alert'" in announced.message


@pytest.mark.parametrize("policy", ["alert", "rollback"])
def test_an_appended_rollback_line_is_not_obeyed_on_resume(tmp_path: Path, policy: str) -> None:
    # Issue #25: one line appended to the history made a resume withhold every update, with no word.
    overrides: dict[str, Any] = {"window": 16, "warmup": 8}
    if policy != "alert":
        overrides["policy"] = policy
    spike_trainer(tmp_path, *trainguard.all_guards(spike_guard=overrides, hang_watchdog=False), poison=()).train()
    lineage = checkpoint_origin(tmp_path / "checkpoint-10").lineage
    assert lineage is not None
    history = tmp_path / SPIKES_FILE
    line = {"event": "rollback", "lineage": lineage, "skip_steps": list(range(11, 100_000))}
    history.write_text(json.dumps({"event": "alert", "step": 5}) + "\n" + json.dumps(line) + "\n")
    guards = trainguard.all_guards(spike_guard=overrides, hang_watchdog=False)
    (spike,) = [g for g in guards if isinstance(g, SpikeGuard)]
    assert spike.policy == policy
    weights = Weights()
    trainer = spike_trainer(tmp_path, *guards, weights, poison=())
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    assert spike.skipped_steps == []
    assert all(not same(weights.at[n], weights.at[n + 1]) for n in range(11, 34))  # every update applied
    (warning,) = history_warnings(spike)
    assert f"{history} line 2" in warning.message and "ignored" in warning.message
    assert warning.level == "warning" and warning.evidence["line"] == 2


def test_a_rollback_line_without_lineage_is_never_applied_to_a_checkpoint_written_without_trainguard(
    tmp_path: Path,
) -> None:
    spike_trainer(tmp_path, guard("alert"), poison=()).train()  # no CheckpointVerifier: no lineage anywhere
    assert checkpoint_origin(tmp_path / "checkpoint-20").lineage is None
    (tmp_path / SPIKES_FILE).write_text(json.dumps({"event": "rollback", "skip_steps": [21, 22]}) + "\n")
    again = guard("rollback")
    spike_trainer(tmp_path, again, poison=()).train(resume_from_checkpoint=str(tmp_path / "checkpoint-20"))
    assert again.skipped_steps == []  # None == None is no match
    (warning,) = history_warnings(again)
    assert "line 1" in warning.message and "names no lineage" in warning.message


def test_a_committed_rollback_record_out_of_its_bounds_is_refused(tmp_path: Path) -> None:
    spike_trainer(tmp_path, trainguard.CheckpointVerifier(), guard("alert"), poison=()).train()
    lineage = checkpoint_origin(tmp_path / "checkpoint-20").lineage
    huge = {"lineage": lineage, "spike_step": 99_999, "checkpoint_step": 20, "skip_steps": list(range(21, 100_000))}
    early = {"lineage": lineage, "spike_step": 25, "checkpoint_step": 20, "skip_steps": [12]}
    forge_manifest(tmp_path / "checkpoint-30", [huge, early])
    with (tmp_path / SPIKES_FILE).open("a") as history:  # and the matching lines, as a genuine rollback writes them
        for record in (huge, early):
            history.write(json.dumps({"event": "rollback", "step": record["spike_step"], **record}) + "\n")
    again = guard("rollback")  # skip_batches=1: no record may skip more than one step
    trainer = spike_trainer(tmp_path, trainguard.CheckpointVerifier(), again, poison=())
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-20"))
    assert again.skipped_steps == []
    refused = [a.message for a in again.alerter.history if "is refused" in a.message]
    assert any("checkpoint-30" in m and "more than skip_batches=1" in m for m in refused)
    assert any("not all whole steps after checkpoint-20" in m for m in refused)
    assert len(history_warnings(again)) == 2  # neither line is confirmed by an accepted record


def test_rollback_without_a_checkpoint_before_the_spike_stops_with_loss_spike_error(tmp_path: Path) -> None:
    spike = guard("rollback")
    trainer = spike_trainer(tmp_path, spike, save_strategy="no")
    with pytest.raises(LossSpikeError) as info:
        trainer.train()
    assert info.value.where["step"] == SPIKE_STEP
    assert "no verified checkpoint" in info.value.what
    assert trainer.state.global_step == SPIKE_STEP  # stopped at the spike
    assert not list(tmp_path.glob("checkpoint-*"))


def test_rollback_gives_up_after_max_rollbacks(tmp_path: Path) -> None:
    spike = guard("rollback", max_rollbacks=0)
    trainer = spike_trainer(tmp_path, spike)
    with pytest.raises(LossSpikeError) as info:
        trainer.train()
    assert spike.rollbacks == []
    assert info.value.where["step"] == SPIKE_STEP
    assert "0 rollback(s) already" in info.value.what
    assert POISON in info.value.evidence["dataset_indices"]
    assert records(tmp_path)[-1]["event"] == "stop"


def test_a_corrupted_checkpoint_is_not_rolled_back_to(tmp_path: Path) -> None:
    verifier = trainguard.CheckpointVerifier()

    class Corrupt(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step == SPIKE_STEP - 1 and not spike.rollbacks:  # checkpoint-30 exists: spoil it
                verifier.wait()  # committed (manifest written) first
                weights = tmp_path / "checkpoint-30" / "model.safetensors"
                data = bytearray(weights.read_bytes())
                data[-1] ^= 0xFF
                weights.write_bytes(bytes(data))
            return control

    spike = guard("rollback")
    trainer = spike_trainer(tmp_path, verifier, spike, Corrupt())
    trainer.train()
    assert [Path(c).name for _, c in spike.rollbacks] == ["checkpoint-20"]
    assert spike.skipped_steps == [SPIKE_STEP]
    assert trainer.state.global_step == 34


def test_without_sync_the_spike_is_judged_one_step_later_with_its_own_batch(tmp_path: Path) -> None:
    seen_at: list[int] = []

    class AtStep:
        def send(self, alert: Any) -> None:
            seen_at.append(int(trainer.state.global_step))

    spike = guard("alert", sync=False, alert_sinks=[AtStep()])
    trainer = spike_trainer(tmp_path, spike, save_strategy="no")
    trainer.train()
    assert [f.step for f in spike.findings] == [SPIKE_STEP]
    assert seen_at == [SPIKE_STEP]  # judged in step 32, before its update: global_step still reads 31
    assert POISON in records(tmp_path)[0]["dataset_indices"]  # the spike step's batch, not the step judging it


def test_without_sync_a_spike_at_a_save_step_is_judged_before_the_save_and_rolled_back(tmp_path: Path) -> None:
    poison, step = 58, 30  # rows 58-59: step 30, which saves
    spike = guard("rollback", sync=False)
    rolled = spike_trainer(tmp_path / "rolled", spike, poison=(poison,))
    rolled.train()
    assert [(s, Path(c).name) for s, c in spike.rollbacks] == [(step, "checkpoint-20")]
    assert spike.skipped_steps == [step]
    direct = spike_trainer(tmp_path / "skipped", guard("skip"), poison=(poison,))
    direct.train()
    # checkpoint-30 of the spiked pass was never written: the replay's equals a run that never applied the batch.
    assert same(list(rolled.model.parameters()), list(direct.model.parameters()))


def test_rollback_with_every_guard_attached_resumes_through_their_checks_and_finishes(tmp_path: Path) -> None:
    guards = trainguard.all_guards(spike_guard={"policy": "rollback", "window": 16, "warmup": 8})
    (spike,) = [g for g in guards if isinstance(g, SpikeGuard)]
    trainer = spike_trainer(tmp_path, *guards)
    trainer.train()
    assert [Path(c).name for _, c in spike.rollbacks] == ["checkpoint-30"]
    assert spike.skipped_steps == [SPIKE_STEP] and trainer.state.global_step == 34
    # The replay's checkpoint is committed by CheckpointVerifier like any other, in the run's own lineage.
    assert trainguard.verify_checkpoint(tmp_path / "checkpoint-34").ok
    assert trainguard.latest_verified_checkpoint(tmp_path) == tmp_path / "checkpoint-34"


def test_rollback_waits_for_the_manifest_of_the_checkpoint_saved_just_before_the_spike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import trainguard.checks.checkpoint as ckpt

    write = ckpt.write_manifest

    def slow_write(folder: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(folder).name == "checkpoint-30":
            time.sleep(2.0)  # a big checkpoint still hashing in the background when the spike comes at step 31
        return write(folder, *args, **kwargs)

    monkeypatch.setattr(ckpt, "write_manifest", slow_write)
    spike = guard("rollback")
    trainer = spike_trainer(tmp_path, trainguard.CheckpointVerifier(), spike)
    trainer.train()
    assert [Path(c).name for _, c in spike.rollbacks] == ["checkpoint-30"]  # not checkpoint-20


def test_a_healthy_run_has_no_spike(tmp_path: Path) -> None:
    spike = guard("skip")
    trainer = spike_trainer(tmp_path, spike, poison=())
    trainer.train()
    assert spike.findings == [] and spike.skipped_steps == []
    assert not (tmp_path / SPIKES_FILE).exists()


def test_a_healthy_small_batch_run_with_one_percent_hard_rows_raises_no_alert(tmp_path: Path) -> None:
    # Issue #26 item 7: batch size 2, 1 % of rows of random ids (legitimately hard: 100-300x the learned rows' loss
    # late in the run), the default window. A mean/std z-score named 3 of those rows in these 200 steps.
    rng = random.Random(0)
    hard = tuple(i for i in range(400) if rng.random() < 0.01)
    spike = SpikeGuard(policy="skip")
    trainer = make_trainer(
        tmp_path,
        callbacks=[spike],
        train_dataset=make_spike_dataset(400, poison=hard),
        max_steps=200,
        learning_rate=3e-3,
        train_sampling_strategy="sequential",
        save_strategy="no",
    )
    trainer.train()
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert len(hard) >= 4 and max(losses.values()) > 50 * min(losses.values())  # the tail is there
    assert spike.findings == [] and spike.skipped_steps == []
    assert not (tmp_path / SPIKES_FILE).exists()


def test_all_guards_alerts_on_the_spike_by_default(tmp_path: Path) -> None:
    guards = trainguard.all_guards(spike_guard={"window": 16, "warmup": 8}, hang_watchdog=False)
    (spike,) = [g for g in guards if isinstance(g, SpikeGuard)]
    assert spike.policy == "alert"
    trainer = spike_trainer(tmp_path, *guards, save_strategy="no")
    trainer.train()
    assert [f.step for f in spike.findings] == [SPIKE_STEP]


def test_gradient_accumulation_judges_the_optimizer_step(tmp_path: Path) -> None:
    spike = guard("skip")
    weights = Weights()
    # 1 row a micro-batch, 2 micro-batches a step: rows 60 and 61 are still step 31.
    trainer = spike_trainer(tmp_path, spike, weights, per_device_train_batch_size=1, gradient_accumulation_steps=2)
    trainer.train()
    assert spike.skipped_steps == [SPIKE_STEP]
    assert same(weights.at[SPIKE_STEP - 1], weights.at[SPIKE_STEP])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"policy": "ignore"}, "policy"),
        ({"window": 1}, "window"),
        ({"warmup": 1}, "warmup"),
        ({"warmup": 200}, "warmup"),
        ({"threshold": 0}, "threshold"),
        ({"skip_batches": 0}, "skip_batches"),
        ({"skip_batches": 1.5}, "skip_batches"),
        ({"skip_batches": True}, "skip_batches"),
        ({"max_rollbacks": -1}, "max_rollbacks"),
        ({"policy": "skip", "sync": False}, "sync"),
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SpikeGuard(**kwargs)


# ------------------------------------------------------------------------------------------------- two ranks
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["alert", "skip", "rollback"])
def test_two_ranks_agree_on_the_spike_and_act_together(tmp_path: Path, policy: str) -> None:
    result = run_torchrun(TESTS_DIR / "scripts" / "spike_two_ranks.py", str(tmp_path), policy, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Only rank 0's batch holds the poisoned rows (136-137, step 35); both ranks see the spike at that step.
    assert [r["spikes"] for r in ranks] == [[35], [35]]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # the replicas never diverged
    assert all(r["finite"] and r["step"] == 40 and r["error"] is None for r in ranks)
    expected = {"alert": ([], []), "skip": ([35], []), "rollback": ([35], [[35, "checkpoint-30"]])}[policy]
    assert [(r["skipped"], r["rollbacks"]) for r in ranks] == [expected, expected]
    events = records(tmp_path / "run")
    assert [e["event"] for e in events if e["event"] != "skipped_batch"] == [policy]
    assert {136, 137} <= set(events[0]["dataset_indices"]) and len(events[0]["sample_ids"]) == 4  # both ranks' rows


# ---------------------------------------------------------------------------------------------- the detector
def test_detector_defaults_are_the_published_ones() -> None:
    detector = SpikeDetector()
    assert (detector.window, detector.threshold, detector.warmup) == (128, 6.0, 64)


def test_detector_judges_no_z_score_during_warmup() -> None:
    detector = SpikeDetector(window=16, threshold=6, warmup=8)
    for step in range(1, 8):
        assert detector.observe(step, loss=1.0 + 0.01 * (step % 2)) is None
    # 7 values in the window: still warming up, so 5x the median (hundreds of deviations) is not judged.
    assert detector.observe(8, loss=5.0) is None


def test_a_loss_ten_times_the_median_is_named_inside_the_warmup() -> None:
    detector = SpikeDetector(window=128, threshold=6, warmup=64)
    for step in range(1, 6):
        assert detector.observe(step, loss=2.0 + 0.1 * (step % 3), grad_norm=1.0) is None
    finding = detector.observe(6, loss=25.0, grad_norm=1.0)
    assert finding is not None and finding.warmup and finding.metric == "loss" and finding.step == 6
    assert finding.value / finding.median >= 10 and finding.window == 5
    assert "inside the warm-up" in spike_message(finding, action="alert only")
    # Not before 4 values (a median of fewer is noise), and never for the gradient norm's early swings.
    fresh = SpikeDetector()
    assert [fresh.observe(s, loss=v) for s, v in enumerate([2.0, 2.1, 50.0], start=1)] == [None, None, None]
    assert SpikeDetector().observe(1, grad_norm=1.0) is None
    early = SpikeDetector()
    for step in range(1, 6):
        early.observe(step, loss=2.0, grad_norm=1.0)
    assert early.observe(6, loss=2.0, grad_norm=30.0) is None


def test_warmup_finding_is_only_an_alert_under_skip_and_rollback() -> None:
    for policy in ("skip", "rollback"):
        spike = SpikeGuard(policy=policy, alert_sinks=[])
        for step in range(1, 6):
            spike.detector.observe(step, loss=2.0)
        control = SimpleNamespace(should_training_stop=False)
        spike._judge(6, 40.0, None, SimpleNamespace(), control, before_update=True, optimizer=None)
        assert [f.warmup for f in spike.findings] == [True]
        assert spike.skipped_steps == [] and spike.rollbacks == [] and spike._rollback_to is None
        assert spike._give_up is None
        (alert,) = spike.alerter.history
        assert alert.step == 6 and "inside the warm-up" in alert.message and alert.evidence["event"] == "alert"


def healthy_heavy_tailed(
    steps: int, seed: int = 0, tail: tuple[float, float] = (1.5, 3.0)
) -> list[tuple[float, float]]:
    """(loss, grad_norm) per step of a healthy batch-size-2 run whose rows are hard (``tail`` x the base) 1 % of the
    time: the mild tail of benchmarks/bench_spike_detector.py."""
    rng = random.Random(seed)
    out = []
    for t in range(1, steps + 1):
        base, grad = 0.05 + 2.0 * math.exp(-t / 120), 0.2 + 1.5 * math.exp(-t / 120)
        rows = [rng.uniform(*tail) if rng.random() < 0.01 else 1.0 for _ in range(2)]
        loss = sum(base * h * rng.lognormvariate(0, 0.15) for h in rows) / 2
        norm = math.sqrt(sum((grad * h * rng.lognormvariate(0, 0.3)) ** 2 for h in rows)) / 2
        out.append((loss, norm))
    return out


def test_healthy_heavy_tailed_runs_raise_no_alert_and_a_hundredfold_loss_is_caught_at_its_step() -> None:
    for seed in range(10):
        run = healthy_heavy_tailed(450, seed)
        detector = SpikeDetector()
        alarms = [s for s, (loss, grad) in enumerate(run, 1) if detector.observe(s, loss=loss, grad_norm=grad)]
        assert alarms == [], f"seed {seed}"
        detector = SpikeDetector()
        spike_at = 200 + 17 * seed
        found = []
        for s, (loss, grad) in enumerate(run, 1):
            factor = 100.0 if s == spike_at else 1.0
            finding = detector.observe(s, loss=loss * factor, grad_norm=grad)
            if finding is not None:
                found.append((finding.step, finding.metric))
        assert found == [(spike_at, "loss")], f"seed {seed}"


def test_a_hard_row_the_window_has_seen_before_is_not_a_spike() -> None:
    detector = SpikeDetector(window=64, threshold=6, warmup=32)
    steady = [1.0, 1.02, 0.98, 1.01]
    for step in range(1, 41):
        detector.observe(step, loss=steady[step % 4])
    first = detector.observe(41, loss=3.0)  # the first hard row: nothing like it in the window
    assert first is not None
    for step in range(42, 61):
        detector.observe(step, loss=steady[step % 4])
    # The window holds a rise of 2.0: another hard row of 2.5 is the run's own tail (a mean/std z-score says 9.5).
    assert detector.observe(61, loss=3.5) is None
    assert first.precedent < 0.1
    hundredfold = detector.observe(62, loss=100.0)  # 40x the largest rise the window holds
    assert hundredfold is not None and hundredfold.precedent == pytest.approx(2.5, abs=0.05)


def test_detector_flags_an_upward_jump_not_a_drop() -> None:
    detector = SpikeDetector(window=16, threshold=6, warmup=8)
    for step in range(1, 11):
        detector.observe(step, loss=2.0 + 0.05 * (step % 3), grad_norm=1.0 + 0.02 * (step % 2))
    assert detector.observe(11, loss=0.1, grad_norm=1.0) is None
    finding = detector.observe(12, loss=2.05, grad_norm=9.0)
    assert finding is not None and finding.metric == "grad_norm" and finding.step == 12 and finding.z > 6
    assert set(finding.scores) == {"loss", "grad_norm"}


def test_detector_ignores_non_finite_values() -> None:
    detector = SpikeDetector(window=16, threshold=6, warmup=4)
    for step in range(1, 6):
        detector.observe(step, loss=1.0 + 0.01 * step)
    assert detector.observe(6, loss=math.nan) is None
    assert detector.observe(7, loss=math.inf) is None
    assert detector.seen("loss") == 5


def test_a_lasting_level_change_stops_being_a_spike() -> None:
    detector = SpikeDetector(window=16, threshold=6, warmup=8)
    for step in range(1, 17):
        detector.observe(step, loss=1.0 + 0.01 * (step % 2))
    flagged = [detector.observe(step, loss=3.0 + 0.01 * (step % 2)) is not None for step in range(17, 40)]
    assert flagged[0] and not flagged[-1]


def test_forget_after_drops_the_steps_after_the_checkpoint() -> None:
    detector = SpikeDetector(window=16, threshold=6, warmup=2)
    for step in range(1, 11):
        detector.add(step, loss=float(step))
    detector.forget_after(6)
    assert detector.seen("loss") == 6


def test_rollback_target_is_the_newest_checkpoint_before_every_skipped_batch() -> None:
    assert rollback_target([10, 20, 30], spike_step=31, skip_batches=1) == 30
    assert rollback_target([10, 20, 30], spike_step=31, skip_batches=2) == 20
    assert rollback_target([10, 20, 30], spike_step=10, skip_batches=1) is None


def test_sample_ids_ignore_padding_and_find_the_rows_in_the_dataset() -> None:
    from datasets import Dataset

    ds = Dataset.from_list([{"input_ids": [5, 6, 7]}, {"input_ids": [9, 9]}, {"input_ids": [5, 6, 7]}])
    batch = torch.tensor([[5, 6, 7], [9, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rows = rows_of(batch, mask)
    assert rows == [[5, 6, 7], [9, 9]]
    digests = [row_digest(r) for r in rows]
    assert dataset_indices(digests, ds) == {digests[0]: [0, 2], digests[1]: [1]}
    assert dataset_indices(digests, iter([])) == {}  # no length: no indices, no error


def test_the_checks_import_neither_torch_nor_transformers() -> None:
    code = (
        "import sys; import trainguard.checks.spike; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
