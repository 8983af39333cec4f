"""The documentation's code, collected and run: every ```python block of README.md and docs/*.md, and every
``Example::`` section of a docstring under src/trainguard.

The setup every snippet may lean on lives here, once: a workspace (a LoRA run in ``out/`` with checkpoints 10 to 60
written with all guards, its base model in ``models/``, JSONL data files) copied fresh for each snippet, and the
names snippets use without defining them (``trainer``, ``model``, ``args``, ``ds``, ``tok``, ...), built only when a
snippet reads them. ``Trainer(...)`` is the real Trainer with the workspace's model, arguments and data filled in
where a snippet leaves them out (``...``).

A snippet says what it needs in a comment of its own:

- ``# not run here: <reason>`` (e.g. needs a GPU, a hub download, a second process): only compiled;
- ``# raises: <ErrorName>``: it must raise that trainguard error (it shows the error on purpose).

Markdown blocks can carry the same marks in an HTML comment on the line before the fence
(``<!-- not run here: ... -->``). A block whose first line runs the ``trainguard`` command is shell, not Python.
"""

from __future__ import annotations

import ast
import importlib
import re
import shutil
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _rig import REPO_ROOT, make_lm_dataset, make_tiny_llama, make_tokenizer, training_args

NOT_RUN = re.compile(r"#\s*not run here:\s*(.+)|<!--\s*not run here:\s*(.+?)\s*-->")
RAISES = re.compile(r"#\s*raises:\s*(\w+)|<!--\s*raises:\s*(\w+)\s*-->")
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}


@dataclass(frozen=True)
class Snippet:
    """One code block: where it is (``file`` relative to the repository, and a name), its code and its marks."""

    file: str
    name: str
    code: str
    module: str | None = None  # the module whose docstring holds it (its globals are in scope, as in doctest)
    mark: str = ""

    @property
    def id(self) -> str:
        return f"{self.file}:{self.name}"

    @property
    def not_run(self) -> str | None:
        match = NOT_RUN.search(self.mark + "\n" + self.code)
        if match:
            return match.group(1) or match.group(2)
        if self.code.lstrip().startswith("trainguard "):
            return "shell (the trainguard command), not Python"
        return None

    @property
    def raises(self) -> str | None:
        match = RAISES.search(self.mark + "\n" + self.code)
        return (match.group(1) or match.group(2)) if match else None


def markdown_snippets() -> list[Snippet]:
    found = []
    for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        lines = path.read_text(encoding="utf-8").splitlines()
        count, i = 0, 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                start = i + 1
                end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
                count += 1
                mark = lines[i - 1] if i and lines[i - 1].lstrip().startswith("<!--") else ""
                rel = path.relative_to(REPO_ROOT).as_posix()
                found.append(Snippet(rel, f"block {count} (line {i + 1})", "\n".join(lines[start:end]), mark=mark))
                i = end
            i += 1
    return found


def _example(doc: str) -> str | None:
    if "Example::" not in doc:
        return None
    block = []
    for line in doc.split("Example::", 1)[1].split("\n")[1:]:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip() or None


def docstring_snippets() -> list[Snippet]:
    found = []
    src = REPO_ROOT / "src"
    for path in sorted((src / "trainguard").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = ".".join(path.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        nodes: list[Any] = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            code = _example(doc) if doc else None
            if code:
                name = getattr(node, "name", "module docstring")
                found.append(Snippet(path.relative_to(REPO_ROOT).as_posix(), name, code, module=module))
    return found


# ------------------------------------------------------------------------------------------------ workspace
def build_workspace(root: Path) -> Path:
    """The folder every snippet starts from (copied for each): built once per test session."""
    from peft import LoraConfig, get_peft_model

    import trainguard

    root.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    for name in ("models/base", "models/llama-base"):
        base = make_tiny_llama()
        base.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    model = get_peft_model(make_tiny_llama(), LoraConfig(**LORA))
    args = training_args(root / "out", max_steps=60, save_strategy="steps", save_steps=10)
    from transformers import Trainer

    Trainer(
        model=model, args=args, train_dataset=make_lm_dataset(), processing_class=tok,
        callbacks=trainguard.all_guards(hang_watchdog=False),
    ).train()  # fmt: skip
    rows = [
        '{"prompt": "the run resumed from", "completion": " the newest verified checkpoint"}',
        '{"prompt": "a flipped byte in", "completion": " the optimizer state is caught"}',
    ]
    for name in ("train.jsonl", "eval.jsonl", "data/train.jsonl"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def copy_workspace(template: Path, target: Path) -> Path:
    shutil.copytree(template, target, symlinks=True)
    return target


class Names(dict):  # type: ignore[type-arg]
    """A snippet's globals: the names it may use without defining them, built on first use (``__missing__``,
    which exec's name lookups honour for a dict subclass), after the module's own globals for a docstring."""

    def __init__(self, module_globals: Mapping[str, Any]) -> None:
        super().__init__(__name__="__snippet__", __builtins__=__builtins__)
        self.module_globals = module_globals

    def __missing__(self, key: str) -> Any:
        if key in self.module_globals:
            return self.module_globals[key]
        maker = _MAKERS.get(key)
        if maker is None:
            raise KeyError(key)
        self[key] = value = maker(self)
        return value


def _trainer_class(names: Names) -> Any:
    from transformers import Trainer as RealTrainer

    class Trainer(RealTrainer):  # the workspace's model, arguments and data where a snippet writes "..."
        def __init__(self, *positional: Any, **kwargs: Any) -> None:
            if any(p is not Ellipsis for p in positional):
                raise TypeError("snippets pass the Trainer's arguments by keyword")
            kwargs.setdefault("model", names["model"])
            kwargs.setdefault("args", names["args"])
            kwargs.setdefault("train_dataset", names["ds"])
            kwargs.setdefault("processing_class", names["tok"])
            super().__init__(**kwargs)

    return Trainer


def _peft_model(names: Names) -> Any:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(make_tiny_llama(), LoraConfig(**LORA))


_MAKERS: dict[str, Any] = {
    "trainguard": lambda n: importlib.import_module("trainguard"),
    "Trainer": _trainer_class,
    "model": _peft_model,
    "base": lambda n: make_tiny_llama(),
    "args": lambda n: training_args("out", max_steps=62, save_strategy="steps", save_steps=10),
    "ds": lambda n: make_lm_dataset(),
    "train_ds": lambda n: make_lm_dataset(),
    "eval_ds": lambda n: make_lm_dataset(8, seed=1),
    "tok": lambda n: make_tokenizer(),
    "tokenizer": lambda n: make_tokenizer(),
    "trainer": lambda n: n["Trainer"](),
    "LoraConfig": lambda n: importlib.import_module("peft").LoraConfig,
    "get_peft_model": lambda n: importlib.import_module("peft").get_peft_model,
    "lora_config": lambda n: importlib.import_module("peft").LoraConfig(**LORA),
    "Dataset": lambda n: importlib.import_module("datasets").Dataset,
    "rows": lambda n: list(make_lm_dataset()),
    "Path": lambda n: Path,
    "json": lambda n: importlib.import_module("json"),
    "math": lambda n: importlib.import_module("math"),
    "torch": lambda n: importlib.import_module("torch"),
    "fp": lambda n: importlib.import_module("trainguard").dataset_fingerprint(n["ds"]),
    # the records the save audit and the resume attestation compare: the workspace's, and the live trainer's
    "spec": lambda n: _compat().save_spec(n["trainer"]),
    "saved_facts": lambda n: (
        importlib.import_module("trainguard.checks.lineage").checkpoint_origin("out/checkpoint-60").record["resume"]
    ),
    "live_facts": lambda n: _compat().resume_facts(n["trainer"]),
}


def _compat() -> Any:
    return importlib.import_module("trainguard.callbacks._trainer_compat")
