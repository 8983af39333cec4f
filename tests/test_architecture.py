"""The layers and the seam, checked on the source (pure ``ast``, no import): arrows point down only, and a private
name of another library is read only in a seam module. Also: docs/architecture.md's module table names every module.

A planted upward import (``from ..callbacks import x`` in a check, even inside a function) or a planted
``trainer._x`` outside a seam fails these tests; the synthetic-source tests below prove the checker can fail.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import trainguard

SRC = Path(trainguard.__file__).resolve().parent
DOCS = SRC.parents[1] / "docs" / "architecture.md"

# Rank of each layer; a module may import only modules of its own rank or lower. The first matching prefix wins;
# every other ``trainguard.*`` module is foundation (rank 0).
LAYERS: tuple[tuple[str, int], ...] = (
    ("trainguard.checks", 1),
    ("trainguard.config", 2),  # validates options without importing a callback: the callbacks pass their table
    # The tracker adapters every guard reports through (imported by callbacks/_base.py), below the callbacks.
    ("trainguard.integrations.reporting", 2),
    ("trainguard.integrations._tracker_compat", 2),
    ("trainguard.callbacks", 3),
    ("trainguard.commands", 4),
    ("trainguard.cli", 5),
    ("trainguard.integrations", 6),  # the framework plugins (axolotl, LLaMA-Factory) drive the guards
    ("trainguard.recovery", 6),
    ("trainguard.__main__", 7),
)
ROOT_RANK = 7  # the package itself re-exports everything

# The only modules that may read a private name of another library; each wraps the names it reads in functions that
# turn the feature off (one log line) when a release renames them.
SEAMS = frozenset(
    {
        "callbacks/_trainer_compat.py",  # transformers' Trainer internals
        "checks/dataset/_datasets_compat.py",  # datasets' row selection and streaming pipeline
        "integrations/_tracker_compat.py",  # W&B's and MLflow's run state
        "_dist_compat.py",  # torch.distributed's c10d store and sequence numbers
    }
)
# Underscored names that are documented public API of the standard library.
DOCUMENTED = frozenset({"os._exit", "sys._getframe", "sys._current_frames"})


def rank_of(module: str) -> int:
    if module == "trainguard":
        return ROOT_RANK
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return 0


def module_name(rel: str) -> str:
    parts = ["trainguard", *Path(rel).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(
    tree: ast.AST, module: str, is_package: bool, known: frozenset[str] = frozenset()
) -> list[tuple[int, str]]:
    """Every trainguard module ``tree`` imports, anywhere (functions, ``TYPE_CHECKING`` blocks), relative or not;
    ``from package import name`` counts as ``package.name`` when that is one of the ``known`` modules."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if node.module is None:  # from .. import distributed: each name is a module
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            else:
                subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
                found += [(node.lineno, sub) for sub in subs] or [(node.lineno, base)]
    return [(line, name) for line, name in found if name == "trainguard" or name.startswith("trainguard.")]


def upward_imports(sources: dict[str, str]) -> list[str]:
    """``file:line importer -> imported`` for each import of a higher layer; ``sources`` maps paths relative to
    src/trainguard to their text."""
    problems = []
    known = frozenset(module_name(rel) for rel in sources)
    for rel, text in sorted(sources.items()):
        module = module_name(rel)
        for line, target in imported_modules(ast.parse(text), module, rel.endswith("__init__.py"), known):
            if rank_of(target) > rank_of(module):
                problems.append(f"{rel}:{line} {module} (layer {rank_of(module)}) imports {target} ({rank_of(target)})")
    return problems


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def own_names(sources: dict[str, str]) -> set[str]:
    """Every name trainguard defines: modules, functions, classes, variables, attributes set on ``self``/``cls``."""
    names = {Path(rel).stem for rel in sources}
    for text in sources.values():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
            ):
                names.add(node.attr)
    return names


def private_accesses(sources: dict[str, str]) -> list[str]:
    """``file:line expression`` for each read of another library's private name outside :data:`SEAMS`: ``obj._x``
    or ``getattr/hasattr/setattr(obj, "_x")`` where ``obj`` is not ``self``/``cls`` and trainguard defines no
    ``_x`` itself."""
    own = own_names(sources)
    problems = []
    for rel, text in sorted(sources.items()):
        if rel in SEAMS:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                owner, name = node.value, node.attr
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _is_private(node.args[1].value)
            ):
                owner, name = node.args[0], node.args[1].value
            else:
                continue
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if name in own or ast.unparse(node) in DOCUMENTED:
                continue
            problems.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
    return problems


def package_sources() -> dict[str, str]:
    return {p.relative_to(SRC).as_posix(): p.read_text(encoding="utf-8") for p in sorted(SRC.rglob("*.py"))}


def test_no_module_imports_a_layer_above_it() -> None:
    assert upward_imports(package_sources()) == []


def test_private_names_of_other_libraries_are_read_only_in_the_seams() -> None:
    assert private_accesses(package_sources()) == []


def test_every_seam_module_exists() -> None:
    assert sorted(rel for rel in SEAMS if not (SRC / rel).is_file()) == []


def test_the_checker_finds_a_planted_upward_import_relative_and_inside_a_function() -> None:
    planted = {
        "checks/foo.py": "def f():\n    from ..callbacks import nan_guard\n",
        "callbacks/bar.py": "import trainguard.commands.verify\n",
        "commands/baz.py": "from ..cli import EXIT_OK\n",
        "checks/dataset/qux.py": "from ... import config\n",
        "config.py": "from .callbacks._base import GuardCallback\n",
        "errors.py": "from .integrations import axolotl\n",
    }
    found = upward_imports(planted)
    assert [line.split(" ")[0] for line in found] == [
        "callbacks/bar.py:1",
        "checks/dataset/qux.py:1",
        "checks/foo.py:2",
        "commands/baz.py:1",
        "config.py:1",
        "errors.py:1",
    ]
    assert upward_imports({"callbacks/ok.py": "from ..checks import lineage\nfrom .. import distributed\n"}) == []


def test_the_checker_finds_a_planted_private_access_outside_the_seams() -> None:
    planted = {
        "checks/foo.py": "def f(ds):\n    return ds._indices\n",
        "callbacks/bar.py": "def g(trainer):\n    return getattr(trainer, '_save_checkpoint', None)\n",
        "callbacks/_trainer_compat.py": "def h(trainer):\n    return trainer._save_checkpoint\n",
        "callbacks/own.py": "class A:\n    def __init__(self):\n        self._mine = 1\n\n"
        "def k(a):\n    return a._mine\n",
    }
    assert private_accesses(planted) == [
        "callbacks/bar.py:2 getattr(trainer, '_save_checkpoint', None)",
        "checks/foo.py:2 ds._indices",
    ]


def _documented_modules(text: str) -> set[str]:
    named: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        first_cell = line.split("|")[1]
        for token in re.findall(r"`([^`]+)`", first_cell):
            braces = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", token)
            variants = [braces[1] + part + braces[3] for part in braces[2].split(",")] if braces else [token]
            named.update(v.strip() for v in variants)
    return named


def test_the_architecture_page_names_every_module_in_its_tables() -> None:
    named = _documented_modules(DOCS.read_text(encoding="utf-8"))
    missing = [
        rel
        for rel in package_sources()
        if rel not in named and not (rel.endswith("/__init__.py") and rel[: -len("__init__.py")] in named)
    ]
    assert missing == [], "docs/architecture.md: give each module a row (its path under src/trainguard/)"
