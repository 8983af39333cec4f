"""Tokenizer identity: a fingerprint of what a tokenizer does, field by field, and the comparison that refuses a resume
or a merge with another one.

A model learns the ids its tokenizer produced, where its EOS is, and the chat template that framed every example.
Resuming (or merging an adapter) with another tokenizer trains (or serves) a model on ids and frames it never saw:
LlamaFactory #5476 (training rewrote ``chat_template``), #7454 (the EOS left wrong: the model never stops), unsloth
#880, trl #6105. :func:`tokenizer_fingerprint` records, per field, a sha256 digest (and the value itself where it is
small); :func:`compare_tokenizers` names the fields that differ; :func:`check_tokenizer` raises
:class:`~trainguard.TokenizerMismatchError` naming each with both values (or both digests, and the first differing
line of a chat template).

The fields: ``vocab`` (token → id), ``merges/model`` (the model's merges and settings, the normalizer and
pre-tokenizer: how text becomes tokens), ``added_tokens``, ``special_tokens`` (unk/sep/cls/mask and the additional
ones), ``eos_token``, ``pad_token``, ``bos_token`` (each token and its id), ``chat_template``, ``padding_side`` and
``truncation_side``. Per-call state (the backend's truncation and padding settings) and the post-processor and decoder
(rewritten by transformers from the special tokens, which are compared themselves) are left out, so the same
tokenizer saved and reloaded fingerprints the same.

Importing this module imports neither torch nor transformers: the tokenizer is read through its public attributes.

Example::

    from trainguard.checks.tokenizer import compare_tokenizers, tokenizer_fingerprint
    saved = tokenizer_fingerprint(tok)
    assert compare_tokenizers(saved, tokenizer_fingerprint(tok)) == []
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from ..errors import TokenizerMismatchError

__all__ = [
    "CHECK_TOKENIZER",
    "FIELDS",
    "TOKENIZER_SCHEME",
    "check_tokenizer",
    "compare_tokenizers",
    "describe_changes",
    "resolve_tokenizer",
    "tokenizer_fingerprint",
]

#: The version of the fingerprint's layout; records of another scheme are not compared (a note says so).
TOKENIZER_SCHEME = "trainguard-tokenizer/1"

#: The fields, in the order messages name them.
FIELDS = (
    "vocab",
    "merges/model",
    "added_tokens",
    "special_tokens",
    "eos_token",
    "pad_token",
    "bos_token",
    "chat_template",
    "padding_side",
    "truncation_side",
)

#: The choices for a changed tokenizer: refuse, warn, or do not compare.
CHECK_TOKENIZER = ("raise", "warn", "off")

# Values up to this many characters of canonical JSON are kept readable in the record; a chat template up to
# _TEMPLATE_CHARS is kept whole so that a refusal can show its first differing line.
_VALUE_CHARS = 400
_TEMPLATE_CHARS = 64 * 1024
_NAMED_SPECIAL = ("unk_token", "sep_token", "cls_token", "mask_token")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def _digest(value: Any) -> str:
    return "sha256:" + hashlib.sha256(_canonical(value).encode("utf-8")).hexdigest()


def _entry(value: Any, *, readable: bool = True) -> dict[str, Any]:
    entry: dict[str, Any] = {"digest": _digest(value)}
    if readable and len(_canonical(value)) <= _VALUE_CHARS:
        entry["value"] = value
    return entry


def resolve_tokenizer(processing_class: Any) -> Any:
    """The tokenizer inside ``processing_class``: itself when it is a tokenizer, its ``.tokenizer`` for a processor,
    None for anything else (an image processor, a feature extractor, None).

    Example::

        assert resolve_tokenizer(tok) is tok and resolve_tokenizer(None) is None
    """
    if processing_class is None:
        return None
    if hasattr(processing_class, "get_vocab") and hasattr(processing_class, "padding_side"):
        return processing_class
    inner = getattr(processing_class, "tokenizer", None)
    if inner is not None and hasattr(inner, "get_vocab") and hasattr(inner, "padding_side"):
        return inner
    return None


def _backend_json(tokenizer: Any) -> dict[str, Any] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    to_str = getattr(backend, "to_str", None)
    if to_str is None:
        return None
    try:
        parsed = json.loads(to_str())
    except Exception:  # tokenizers raises plain Exception subclasses from Rust
        return None
    return parsed if isinstance(parsed, dict) else None


def _by_id(item: tuple[Any, Any]) -> tuple[Any, str]:
    return (item[1], str(item[0]))


def _vocab_and_model(tokenizer: Any, backend: dict[str, Any] | None) -> tuple[Any, Any]:
    model_part: Any = None
    if backend is not None and isinstance(backend.get("model"), dict):
        model = dict(backend["model"])
        vocab = model.pop("vocab", None)
        if isinstance(vocab, dict):  # token -> id (BPE, WordPiece, WordLevel); a Unigram's is an ordered list
            vocab = sorted(vocab.items(), key=_by_id)
        model_part = {
            "model": model,
            "normalizer": backend.get("normalizer"),
            "pre_tokenizer": backend.get("pre_tokenizer"),
        }
        return vocab, model_part
    # A slow (Python) tokenizer: its vocabulary, and what defines its model where it has one.
    try:
        vocab = sorted(((str(k), int(v)) for k, v in tokenizer.get_vocab().items()), key=_by_id)
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        vocab = None
    sp_model = getattr(tokenizer, "sp_model", None)
    if sp_model is not None and hasattr(sp_model, "serialized_model_proto"):
        model_part = {"sentencepiece": hashlib.sha256(sp_model.serialized_model_proto()).hexdigest()}
    elif isinstance(getattr(tokenizer, "bpe_ranks", None), dict):
        ranks = tokenizer.bpe_ranks
        model_part = {"bpe_ranks": sorted((" ".join(map(str, pair)), int(rank)) for pair, rank in ranks.items())}
    return vocab, model_part


def _token(tokenizer: Any, name: str) -> dict[str, Any]:
    token = getattr(tokenizer, name, None)
    token_id = getattr(tokenizer, f"{name}_id", None)
    return {"token": None if token is None else str(token), "id": None if token_id is None else int(token_id)}


def _chat_template(tokenizer: Any, processing_class: Any) -> Any:
    template = getattr(processing_class, "chat_template", None) if processing_class is not tokenizer else None
    if template is None:
        template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        return {str(k): str(v) for k, v in template.items()}
    return None if template is None else str(template)


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """The fingerprint of a tokenizer (or of the tokenizer inside a processor): per field, a sha256 ``digest`` of its
    canonical JSON, and the ``value`` itself where it is small (the EOS/PAD/BOS tokens and ids, the sides, the
    special tokens); a chat template up to 64 KiB is kept as ``text`` so a refusal can quote its first differing line.

    Deterministic across processes and machines (sorted vocabulary, sha256; never Python's ``hash``), and blind to
    per-call state (the backend's truncation and padding settings). A few milliseconds on a 32k vocabulary.

    Args:
        tokenizer: A ``PreTrainedTokenizerFast``/``PreTrainedTokenizer`` or a processor with ``.tokenizer``.

    Returns:
        ``{"scheme": TOKENIZER_SCHEME, "class": ..., "fields": {field: {"digest": ..., ["value"/"text": ...]}}}``.

    Raises:
        TypeError: ``tokenizer`` is neither a tokenizer nor a processor holding one.

    Example::

        fp = tokenizer_fingerprint(tok)
        assert fp["fields"]["eos_token"]["value"] == {"token": "</s>", "id": 3}
    """
    inner = resolve_tokenizer(tokenizer)
    if inner is None:
        raise TypeError(
            f"tokenizer_fingerprint needs a tokenizer or a processor with .tokenizer, not {type(tokenizer).__name__}"
        )
    backend = _backend_json(inner)
    vocab, model_part = _vocab_and_model(inner, backend)
    fields: dict[str, dict[str, Any]] = {}
    fields["vocab"] = {"digest": _digest(vocab), "size": len(vocab)} if vocab is not None else {"digest": None}
    fields["merges/model"] = _entry(model_part, readable=False) if model_part is not None else {"digest": None}
    decoder = getattr(inner, "added_tokens_decoder", None) or {}
    added = sorted(
        (int(idx), str(getattr(tok, "content", tok)), bool(getattr(tok, "special", False)))
        for idx, tok in dict(decoder).items()
    )
    fields["added_tokens"] = _entry(added)
    special: dict[str, Any] = {}
    for name in _NAMED_SPECIAL:
        value = getattr(inner, name, None)
        special[name] = None if value is None else str(value)
    extra = getattr(inner, "extra_special_tokens", None)
    if not extra:
        extra = getattr(inner, "additional_special_tokens", None)
    if isinstance(extra, Mapping):
        special["additional"] = {str(k): str(v) for k, v in extra.items()}
    else:
        special["additional"] = [str(t) for t in (extra or [])]
    fields["special_tokens"] = _entry(special)
    for name in ("eos_token", "pad_token", "bos_token"):
        fields[name] = _entry(_token(inner, name))
    template = _chat_template(inner, tokenizer)
    fields["chat_template"] = {"digest": _digest(template)}
    if template is None or len(_canonical(template)) <= _TEMPLATE_CHARS:
        fields["chat_template"]["text"] = template
    for name in ("padding_side", "truncation_side"):
        side = getattr(inner, name, None)
        fields[name] = _entry(None if side is None else str(side))
    return {"scheme": TOKENIZER_SCHEME, "class": type(inner).__name__, "fields": fields}


def compare_tokenizers(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The fields whose digests differ between two :func:`tokenizer_fingerprint` results, in :data:`FIELDS` order.

    A field either side could not fingerprint (digest None) is not compared; records of another scheme compare as
    equal (nothing can be said; :func:`check_tokenizer` notes it).

    Example::

        import copy
        other = copy.deepcopy(tok)
        other.eos_token = "<s>"
        assert compare_tokenizers(tokenizer_fingerprint(tok), tokenizer_fingerprint(other)) == ["eos_token"]
    """
    if saved.get("scheme") != current.get("scheme"):
        return []
    old, new = saved.get("fields") or {}, current.get("fields") or {}
    changed = []
    for name in FIELDS:
        a, b = (old.get(name) or {}).get("digest"), (new.get(name) or {}).get("digest")
        if a is not None and b is not None and a != b:
            changed.append(name)
    return changed


def _short(value: Any) -> str:
    if isinstance(value, Mapping) and set(value) == {"token", "id"}:  # an EOS/PAD/BOS: "</s>" (id 3)
        return f"{json.dumps(value['token'], ensure_ascii=False)} (id {value['id']})"
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


def _template_lines(template: Any) -> list[str]:
    if template is None:
        return []
    if isinstance(template, Mapping):
        return [f"[{name}] {line}" for name in sorted(template) for line in str(template[name]).splitlines()]
    return str(template).splitlines()


def _first_template_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    if "text" not in old or "text" not in new:
        return ""
    a, b = old["text"], new["text"]
    if a is None or b is None:
        return " (checkpoint: no chat template)" if a is None else " (this one: no chat template)"
    old_lines, new_lines = _template_lines(a), _template_lines(b)
    for number, (x, y) in enumerate(zip(old_lines, new_lines, strict=False), start=1):
        if x != y:
            return f"; first difference at line {number}: checkpoint {_short(x)}, this one {_short(y)}"
    number = min(len(old_lines), len(new_lines)) + 1
    if len(old_lines) != len(new_lines):
        extra = old_lines[number - 1] if len(old_lines) > len(new_lines) else new_lines[number - 1]
        side = "the checkpoint's" if len(old_lines) > len(new_lines) else "this one"
        return f"; first difference at line {number}: only {side} has {_short(extra)}"
    matcher = difflib.SequenceMatcher(a=str(a), b=str(b), autojunk=False)
    first = next((op for op in matcher.get_opcodes() if op[0] != "equal"), None)
    return f" (differs at character {first[1]})" if first else ""


def describe_changes(saved: Mapping[str, Any], current: Mapping[str, Any], changed: list[str]) -> list[str]:
    """One phrase per changed field: both values where they are small, else both digests (the vocabulary also with
    both sizes; the chat template also with its first differing line)."""
    old, new = saved.get("fields") or {}, current.get("fields") or {}
    phrases = []
    for name in changed:
        a, b = old.get(name) or {}, new.get(name) or {}
        if name == "chat_template":
            phrase = f"chat_template: checkpoint {str(a.get('digest'))[:19]}, this one {str(b.get('digest'))[:19]}"
            phrase += _first_template_difference(a, b)
        elif "value" in a and "value" in b:
            phrase = f"{name}: checkpoint {_short(a['value'])}, this one {_short(b['value'])}"
        else:
            phrase = f"{name}: checkpoint {str(a.get('digest'))[:19]}, this one {str(b.get('digest'))[:19]}"
            if name == "vocab" and a.get("size") is not None and b.get("size") is not None:
                phrase += f" ({a['size']} vs {b['size']} tokens)"
        phrases.append(phrase)
    return phrases


def check_tokenizer(
    saved: Mapping[str, Any] | None,
    current: Mapping[str, Any] | None,
    *,
    where: Mapping[str, Any],
    subject: str,
    next_step: str | None = None,
    mode: str = "raise",
) -> list[str]:
    """Compare the tokenizer a checkpoint was trained with (``saved``) with the one in use now (``current``).

    Args:
        saved: The checkpoint's :func:`tokenizer_fingerprint` (None: not recorded).
        current: This run's (None: this run has no tokenizer).
        where: The error's location (``file``, ``step``, ...); ``field`` is filled in with the changed fields.
        subject: What is refused, as the message starts: ``"refusing to resume from checkpoint-8"``.
        next_step: The error's next step (default: the error class's).
        mode: ``"raise"``, ``"warn"`` (the message is returned as a warning) or ``"off"``.

    Returns:
        Notes and warnings (nothing recorded to compare, another scheme, the mismatch under ``mode="warn"``).

    Raises:
        TokenizerMismatchError: A field differs (``mode="raise"``), naming every changed field with both values or
            digests; ``evidence["changed"]`` lists the fields, ``evidence["checkpoint"]``/``["current"]`` their
            records.

    Example::

        fp = tokenizer_fingerprint(tok)
        assert check_tokenizer(fp, fp, where={"file": "out/checkpoint-8"}, subject="refusing to resume") == []
    """
    if mode not in CHECK_TOKENIZER:
        raise ValueError(f"check_tokenizer must be one of {CHECK_TOKENIZER}, not {mode!r}")
    if mode == "off":
        return []
    if saved is None:
        return ["no tokenizer was recorded with the checkpoint (saved before tokenizer identity, or without one): "
                "the tokenizer is not compared"]  # fmt: skip
    if current is None:
        return ["the checkpoint recorded a tokenizer but this run has none (no processing_class): not compared"]
    if saved.get("scheme") != current.get("scheme"):
        return [f"the checkpoint's tokenizer record is of scheme {saved.get('scheme')}, this trainguard makes "
                f"{current.get('scheme')}: the tokenizer is not compared"]  # fmt: skip
    changed = compare_tokenizers(saved, current)
    if not changed:
        return []
    phrases = describe_changes(saved, current, changed)
    what = f"{subject}: the tokenizer differs from the one the checkpoint was trained with: " + "; ".join(phrases)
    if mode == "warn":
        return [what]
    evidence = {
        "changed": changed,
        "checkpoint": {name: (saved.get("fields") or {}).get(name) for name in changed},
        "current": {name: (current.get("fields") or {}).get(name) for name in changed},
    }
    raise TokenizerMismatchError(
        what, where={**dict(where), "field": ", ".join(changed)}, next_step=next_step, evidence=evidence
    )
