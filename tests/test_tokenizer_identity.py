"""Tokenizer identity: the tokenizer a checkpoint was trained with is recorded in its run identity, and a resume or a
safe_merge with another one (chat template, EOS, padding side, vocabulary, ...) is refused before anything loads,
naming the field that changed. Real Trainer, real PEFT, a real BPE tokenizer trained here; no downloads."""

from __future__ import annotations

import copy
import functools
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, Trainer, TrainerCallback

from trainguard import DatasetGuard, TokenizerMismatchError, safe_merge
from trainguard.checks.tokenizer import FIELDS, check_tokenizer, compare_tokenizers, tokenizer_fingerprint

from _rig import make_lm_dataset, make_tiny_llama, make_tokenizer, make_trainer, run_python

ROWS = 16  # batch 2: 8 optimizer steps per epoch, checkpoints at steps 4 and 8
TEMPLATE = (
    "{% for m in messages %}\n"
    "<|{{ m['role'] }}|>\n"
    "{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class StepCounter(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.steps += 1
        return control


def _tokenizer() -> Any:
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def _changed(tok: Any, **attributes: Any) -> Any:
    other = copy.deepcopy(tok)
    for name, value in attributes.items():
        setattr(other, name, value)
    return other


def _trainer(output_dir: Path, tok: Any, *, guard: Any = None, counter: Any = None, **args: Any) -> Any:
    kwargs: dict[str, Any] = {"max_steps": -1, "num_train_epochs": 1, "save_strategy": "no"}
    kwargs.update(args)
    callbacks = [guard if guard is not None else DatasetGuard()] + ([counter] if counter is not None else [])
    return make_trainer(
        output_dir,
        callbacks=callbacks,
        train_dataset=make_lm_dataset(ROWS),
        trainer_cls=functools.partial(Trainer, processing_class=tok),
        **kwargs,
    )


def _first_run(output_dir: Path, tok: Any) -> None:
    _trainer(output_dir, tok, save_strategy="steps", save_steps=4).train()
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]


def _snapshot(output_dir: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(output_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(output_dir.glob("checkpoint-*/**/*"))
        if p.is_file()
    }


def _events(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / "trainguard-events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _strip_tokenizer_records(output_dir: Path) -> None:
    """Make the checkpoints look like ones saved before tokenizer identity existed."""
    for state_path in output_dir.glob("checkpoint-*/trainer_state.json"):
        state = json.loads(state_path.read_text())
        state["stateful_callbacks"]["DatasetGuard"]["attributes"]["run_identity"].pop("tokenizer")
        state_path.write_text(json.dumps(state))


# ------------------------------------------------------------------------------------------- the fingerprint
def test_the_same_tokenizer_saved_reloaded_and_fingerprinted_in_another_process_fingerprints_the_same(tmp_path: Path):
    tok = _tokenizer()
    tok("warm the backend up", truncation=True, max_length=4, padding="max_length")  # per-call state: not counted
    fp = tokenizer_fingerprint(tok)
    tok.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert compare_tokenizers(fp, tokenizer_fingerprint(reloaded)) == []
    code = (
        "import json, sys; from transformers import AutoTokenizer; "
        "from trainguard.checks.tokenizer import tokenizer_fingerprint; "
        "print(json.dumps(tokenizer_fingerprint(AutoTokenizer.from_pretrained(sys.argv[1]))))"
    )
    child = run_python(code, str(tmp_path / "tok"), env={"PYTHONHASHSEED": "12345"})
    assert child.returncode == 0, child.stderr[-3000:]
    other = json.loads(child.stdout.strip().splitlines()[-1])
    assert {k: v["digest"] for k, v in other["fields"].items()} == {k: v["digest"] for k, v in fp["fields"].items()}
    assert fp["fields"]["eos_token"]["value"] == {"token": "</s>", "id": 3}
    assert fp["fields"]["chat_template"]["text"] == TEMPLATE
    assert list(fp["fields"]) == list(FIELDS)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"chat_template": TEMPLATE.replace("<|assistant|>", "<|bot|>")}, "chat_template"),
        ({"eos_token": "<s>"}, "eos_token"),
        ({"pad_token": "</s>"}, "pad_token"),
        ({"bos_token": "</s>"}, "bos_token"),
        ({"padding_side": "left"}, "padding_side"),
        ({"truncation_side": "left"}, "truncation_side"),
    ],
)
def test_each_changed_field_and_only_it_is_named(change: dict[str, Any], field: str):
    tok = _tokenizer()
    assert compare_tokenizers(tokenizer_fingerprint(tok), tokenizer_fingerprint(_changed(tok, **change))) == [field]


def test_added_tokens_special_tokens_and_another_vocabulary_are_named():
    tok = _tokenizer()
    fp = tokenizer_fingerprint(tok)
    added = copy.deepcopy(tok)
    added.add_tokens(["<tool>"])
    assert compare_tokenizers(fp, tokenizer_fingerprint(added)) == ["added_tokens"]
    special = copy.deepcopy(tok)
    special.add_special_tokens({"mask_token": "<mask>"})
    assert "special_tokens" in compare_tokenizers(fp, tokenizer_fingerprint(special))
    smaller = make_tokenizer(vocab_size=96)
    smaller.chat_template = TEMPLATE
    changed = compare_tokenizers(fp, tokenizer_fingerprint(smaller))
    assert changed[:2] == ["vocab", "merges/model"]
    with pytest.raises(TokenizerMismatchError, match=r"vocab: checkpoint sha256:\w+, this one sha256:\w+ \(\d+ vs"):
        check_tokenizer(fp, tokenizer_fingerprint(smaller), where={"file": "x"}, subject="refusing")


def test_a_processor_is_fingerprinted_through_its_tokenizer():
    tok = _tokenizer()

    class Processor:  # what a multimodal processor looks like to trainguard: a .tokenizer and a chat_template
        def __init__(self, tokenizer: Any, chat_template: str | None) -> None:
            self.tokenizer, self.chat_template = tokenizer, chat_template

    same = tokenizer_fingerprint(Processor(tok, None))
    assert compare_tokenizers(tokenizer_fingerprint(tok), same) == []
    own = tokenizer_fingerprint(Processor(tok, "{{ messages }}"))
    assert compare_tokenizers(same, own) == ["chat_template"]
    with pytest.raises(TypeError, match="needs a tokenizer"):
        tokenizer_fingerprint(object())


def test_a_32k_vocabulary_fingerprints_in_well_under_a_second():
    import time

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(32000)}
    merges = [(f"t{i}", f"t{i + 1}") for i in range(0, 20000, 2)]
    vocab.update({a + b: 32000 + n for n, (a, b) in enumerate(merges)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    big = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="t1")
    tokenizer_fingerprint(big)
    start = time.perf_counter()
    fp = tokenizer_fingerprint(big)
    assert time.perf_counter() - start < 1.0  # ~50 ms on the 2-core test machine; once per train()
    assert fp["fields"]["vocab"]["size"] == 42000


# ----------------------------------------------------------------------------------------------- the resume
def test_a_resume_with_the_tokenizer_reloaded_from_the_checkpoint_trains_on_without_a_note(output_dir: Path):
    _first_run(output_dir, _tokenizer())
    record = json.loads((output_dir / "checkpoint-8" / "trainer_state.json").read_text())
    stored = record["stateful_callbacks"]["DatasetGuard"]["attributes"]["run_identity"]["tokenizer"]
    assert stored["fields"]["chat_template"]["text"] == TEMPLATE
    reloaded = AutoTokenizer.from_pretrained(output_dir / "checkpoint-8")  # the Trainer saved it there
    counter = StepCounter()
    trainer = _trainer(output_dir, reloaded, counter=counter, num_train_epochs=2)
    assert trainer.train(resume_from_checkpoint=True).global_step == 16 and counter.steps == 8
    assert not [e for e in _events(output_dir) if "tokenizer" in e["message"]]  # zero false alarms


def test_a_resume_with_another_chat_template_is_refused_before_anything_loads(output_dir: Path):
    tok = _tokenizer()
    _first_run(output_dir, tok)
    before = _snapshot(output_dir)
    counter = StepCounter()
    changed = _changed(tok, chat_template=TEMPLATE.replace("{{ eos_token }}", ""))
    trainer = _trainer(output_dir, changed, counter=counter, num_train_epochs=2)
    with pytest.raises(TokenizerMismatchError) as info:
        trainer.train(resume_from_checkpoint=True)
    err = info.value
    assert err.where["field"] == "chat_template" and err.where["step"] == 8
    assert err.where["file"].endswith("checkpoint-8/trainer_state.json")
    assert "refusing to resume from checkpoint-8" in err.what
    assert "first difference at line 3: checkpoint \"{{ m['content'] }}{{ eos_token }}\"" in err.what
    assert "this one \"{{ m['content'] }}\"" in err.what
    assert "AutoTokenizer.from_pretrained" in err.next_step and "check_tokenizer='warn'" in err.next_step
    assert err.evidence["changed"] == ["chat_template"]
    assert counter.steps == 0 and trainer.state.global_step == 0  # refused before the checkpoint loaded
    assert _snapshot(output_dir) == before
    assert any(e["level"] == "error" and "chat_template" in e["message"] for e in _events(output_dir))


def test_a_resume_with_another_eos_is_refused_naming_both_values(output_dir: Path):
    tok = _tokenizer()
    _first_run(output_dir, tok)
    trainer = _trainer(output_dir, _changed(tok, eos_token="<s>"), num_train_epochs=2)
    with pytest.raises(TokenizerMismatchError) as info:
        trainer.train(resume_from_checkpoint=True)
    assert info.value.where["field"] == "eos_token"
    assert 'eos_token: checkpoint "</s>" (id 3), this one "<s>" (id 2)' in info.value.what


def test_a_changed_padding_side_is_refused_by_default_and_resumes_with_check_tokenizer_warn(output_dir: Path):
    tok = _tokenizer()
    _first_run(output_dir, tok)
    left = _changed(tok, padding_side="left")
    with pytest.raises(TokenizerMismatchError, match='padding_side: checkpoint "right", this one "left"'):
        _trainer(output_dir, left, num_train_epochs=2).train(resume_from_checkpoint=True)
    trainer = _trainer(output_dir, left, guard=DatasetGuard(check_tokenizer="warn"), num_train_epochs=2)
    assert trainer.train(resume_from_checkpoint=True).global_step == 16
    assert any(e["level"] == "warning" and "padding_side" in e["message"] for e in _events(output_dir))


def test_a_resume_on_other_data_is_refused_as_such_even_when_the_tokenizer_changed_too(output_dir: Path):
    from trainguard import DatasetMismatchError

    tok = _tokenizer()
    _first_run(output_dir, tok)
    trainer = _trainer(output_dir, _changed(tok, eos_token="<s>"), num_train_epochs=2)
    trainer.train_dataset = make_lm_dataset(ROWS, seed=5)
    with pytest.raises(DatasetMismatchError, match="training data differs"):
        trainer.train(resume_from_checkpoint=True)


def test_on_train_begin_refuses_a_changed_tokenizer_even_when_train_was_not_wrapped(output_dir: Path):
    tok = _tokenizer()
    _first_run(output_dir, tok)
    counter = StepCounter()
    trainer = _trainer(output_dir, _changed(tok, eos_token="<s>"), counter=counter, num_train_epochs=2)
    with pytest.raises(TokenizerMismatchError, match="eos_token"):
        Trainer.train(trainer, resume_from_checkpoint=True)  # the class method: before_train never runs
    assert counter.steps == 0


def test_a_checkpoint_from_before_tokenizer_identity_resumes_with_a_note_and_records_it_from_then_on(
    output_dir: Path,
):
    tok = _tokenizer()
    _first_run(output_dir, tok)
    _strip_tokenizer_records(output_dir)
    trainer = _trainer(
        output_dir, _changed(tok, eos_token="<s>"), num_train_epochs=2, save_strategy="steps", save_steps=4
    )
    assert trainer.train(resume_from_checkpoint=True).global_step == 16
    assert any("no tokenizer was recorded with the checkpoint" in e["message"] for e in _events(output_dir))
    state = json.loads((output_dir / "checkpoint-16" / "trainer_state.json").read_text())
    record = state["stateful_callbacks"]["DatasetGuard"]["attributes"]["run_identity"]
    assert record["tokenizer"]["fields"]["eos_token"]["value"]["token"] == "<s>"


def test_check_tokenizer_off_neither_records_nor_compares(output_dir: Path):
    tok = _tokenizer()
    _trainer(output_dir, tok, guard=DatasetGuard(check_tokenizer="off"), save_strategy="steps", save_steps=4).train()
    state = json.loads((output_dir / "checkpoint-8" / "trainer_state.json").read_text())
    assert "tokenizer" not in state["stateful_callbacks"]["DatasetGuard"]["attributes"]["run_identity"]
    with pytest.raises(ValueError, match="check_tokenizer must be one of"):
        DatasetGuard(check_tokenizer="maybe")


def test_a_tokenizer_that_cannot_be_fingerprinted_is_not_recorded_and_never_blocks_training(
    caplog: pytest.LogCaptureFixture,
):
    from types import SimpleNamespace

    from trainguard.callbacks.dataset_guard import _tokenizer_record

    class Odd:  # a third-party tokenizer whose EOS lookup raises
        padding_side = "right"

        def get_vocab(self) -> dict[str, int]:
            return {"a": 0}

        @property
        def eos_token(self) -> str:
            raise RuntimeError("no eos here")

    assert _tokenizer_record(SimpleNamespace(processing_class=Odd())) is None
    assert "cannot fingerprint the tokenizer (RuntimeError: no eos here)" in caplog.text
    assert _tokenizer_record(SimpleNamespace(processing_class=None)) is None
    assert _tokenizer_record(SimpleNamespace(processing_class=_tokenizer())) is not None


# ------------------------------------------------------------------------------------------------ the merge
peft = pytest.importorskip("peft")
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved base, and a PEFT checkpoint trained 3 steps with the tokenizer as processing_class under DatasetGuard
    (so it holds the tokenizer's files and its record)."""
    root = tmp_path_factory.mktemp("tok-merge")
    make_tiny_llama(seed=0).save_pretrained(root / "base")
    model = peft.get_peft_model(make_tiny_llama(seed=0), peft.LoraConfig(**LORA))
    make_trainer(
        root / "run",
        model=model,
        callbacks=[DatasetGuard()],
        trainer_cls=functools.partial(Trainer, processing_class=_tokenizer()),
        max_steps=3,
        save_strategy="steps",
        save_steps=3,
        learning_rate=1e-2,
    ).train()
    return {"base": root / "base", "checkpoint": root / "run" / "checkpoint-3"}


@pytest.mark.parametrize(
    ("change", "field", "text"),
    [
        ({"chat_template": TEMPLATE.replace("<|assistant|>", "")}, "chat_template", "first difference at line 5"),
        ({"eos_token": "<s>"}, "eos_token", 'checkpoint "</s>" (id 3), this one "<s>" (id 2)'),
    ],
)
def test_safe_merge_with_another_tokenizer_is_refused_before_writing_anything(
    adapter: dict[str, Path], tmp_path: Path, change: dict[str, Any], field: str, text: str
):
    versions = tmp_path / "versions"
    with pytest.raises(TokenizerMismatchError) as info:
        safe_merge(adapter["checkpoint"], adapter["base"], versions, tokenizer=_changed(_tokenizer(), **change))
    err = info.value
    assert err.where["field"] == field and text in err.what
    assert "refusing to merge checkpoint-3: the tokenizer passed as tokenizer=" in err.what
    assert err.where["file"].endswith("checkpoint-3/trainer_state.json") and "Nothing was written" in err.next_step
    assert not versions.exists()


def test_safe_merge_with_the_training_tokenizer_or_the_checkpoints_files_merges(
    adapter: dict[str, Path], tmp_path: Path
):
    reloaded = AutoTokenizer.from_pretrained(adapter["checkpoint"])
    given = safe_merge(adapter["checkpoint"], adapter["base"], tmp_path / "v", tokenizer=reloaded)
    copied = safe_merge(adapter["checkpoint"], adapter["base"], tmp_path / "v")  # the checkpoint's files, checked
    assert (given.name, copied.name) == ("v001", "v002")
    for version in (given, copied):
        assert AutoTokenizer.from_pretrained(version).chat_template == TEMPLATE


def test_safe_merge_compares_with_the_checkpoints_tokenizer_files_when_there_is_no_record(
    adapter: dict[str, Path], tmp_path: Path
):
    import shutil

    old = tmp_path / "checkpoint-3"
    shutil.copytree(adapter["checkpoint"], old)
    state = json.loads((old / "trainer_state.json").read_text())
    del state["stateful_callbacks"]["DatasetGuard"]  # trained without DatasetGuard: only the tokenizer files
    (old / "trainer_state.json").write_text(json.dumps(state))
    versions = tmp_path / "versions"
    with pytest.raises(TokenizerMismatchError, match="is not the tokenizer files of the adapter checkpoint") as info:
        safe_merge(old, adapter["base"], versions, tokenizer=_changed(_tokenizer(), eos_token="<s>"))
    assert info.value.where["field"] == "eos_token" and not versions.exists()
    # the opt-out publishes it, with a warning
    assert safe_merge(old, adapter["base"], versions, tokenizer=_changed(_tokenizer(), eos_token="<s>"),
                      check_tokenizer="warn").name == "v001"  # fmt: skip


# ------------------------------------------------------------------------------------------------ two ranks
_RANKS_SCRIPT = textwrap.dedent(
    """
    import copy, functools, json, sys
    from pathlib import Path
    from transformers import Trainer
    from trainguard import DatasetGuard, TokenizerMismatchError
    from _rig import exit_worker, make_lm_dataset, make_tokenizer, make_trainer

    out = Path(sys.argv[1])
    tok = make_tokenizer()
    common = {"max_steps": -1, "num_train_epochs": 1, "ddp_backend": "gloo", "train_dataset": make_lm_dataset(16)}
    make_trainer(out / "run", callbacks=[DatasetGuard()], save_strategy="steps", save_steps=2,
                 trainer_cls=functools.partial(Trainer, processing_class=tok), **common).train()
    changed = copy.deepcopy(tok)
    changed.eos_token = "<s>"
    common["num_train_epochs"] = 2
    trainer = make_trainer(out / "run", callbacks=[DatasetGuard()],
                           trainer_cls=functools.partial(Trainer, processing_class=changed), **common)
    doc = {"refused": False}
    try:
        trainer.train(resume_from_checkpoint=True)
    except TokenizerMismatchError as err:
        doc.update(refused=True, what=err.what, field=err.where.get("field"), step=trainer.state.global_step)
    (out / f"rank{trainer.args.process_index}.json").write_text(json.dumps(doc))
    exit_worker()
    """
)


@pytest.mark.distributed
def test_every_rank_refuses_a_changed_tokenizer_together_in_a_two_rank_run(tmp_path: Path):
    from _rig import run_torchrun

    script = tmp_path / "tokenizer_ranks.py"
    script.write_text(_RANKS_SCRIPT)
    result = run_torchrun(script, str(tmp_path), nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    docs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for doc in docs:  # both refused with the same error (none left waiting in a collective), before any step
        assert doc["refused"] and doc["field"] == "eos_token" and doc["step"] == 0
    assert docs[0]["what"] == docs[1]["what"]
