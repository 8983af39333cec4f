"""docs/do-no-harm.md lists every deliberate difference a guard makes (issue #26: "anything not in that table is a
bug"). These tests keep the table true: every trainguard error class the guards and their checks use is in it, and
every opt-out it spells as ``Guard(option=...)``, ``all_guards(guard=...)`` or ``TRAINGUARD_GUARDS_OFF=guard``
names a real guard and a real option."""

from __future__ import annotations

import ast
import builtins
import inspect
import re
from pathlib import Path

import trainguard
from trainguard import errors
from trainguard.callbacks import _GUARDS
from trainguard.checks.watchdog import WatchdogOptions

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "do-no-harm.md"
PACKAGE = ROOT / "src" / "trainguard"
TABLE_HEADING = "## The deliberate differences"
COLUMNS = ["guard", "when", "what trainguard does", "why", "opt-out"]
CALL = re.compile(r"`(\w+)\(([^`]*)\)`")
GUARDS_OFF = re.compile(r"TRAINGUARD_GUARDS_OFF=([\w,]+)")


def table_rows(text: str) -> list[dict[str, str]]:
    """The rows of the table under :data:`TABLE_HEADING`, as ``{column: cell}``."""
    lines = text.split(TABLE_HEADING, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, rule, *body = rows
    assert header == COLUMNS and set("".join(rule)) <= {"-"}, header
    assert all(len(row) == len(COLUMNS) for row in body), [row for row in body if len(row) != len(COLUMNS)]
    return [dict(zip(COLUMNS, row, strict=True)) for row in body]


def error_classes() -> dict[str, type]:
    """Every subclass of TrainGuardError in trainguard.errors, by name (the base class left out)."""
    return {
        name: cls
        for name, cls in vars(errors).items()
        if inspect.isclass(cls) and issubclass(cls, errors.TrainGuardError) and cls is not errors.TrainGuardError
    }


def used_error_classes(known: dict[str, type]) -> set[str]:
    """The error classes named anywhere under callbacks/ and checks/: imported, raised, constructed or caught."""
    used: set[str] = set()
    for path in [*(PACKAGE / "callbacks").rglob("*.py"), *(PACKAGE / "checks").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Name):
                used.add(node.id)
            elif isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif isinstance(node, ast.ImportFrom):
                used.update(alias.name for alias in node.names)
    return used & known.keys()


def missing_errors(rows: list[dict[str, str]], used: set[str]) -> list[str]:
    """Used error classes that no row of the table names (in backticks)."""
    cells = " ".join(" ".join(row.values()) for row in rows)
    return sorted(name for name in used if f"`{name}`" not in cells)


def guard_parameters() -> dict[str, set[str]]:
    """For each guard class of all_guards(): the keyword options its constructor takes."""
    options: dict[str, set[str]] = {}
    for _keyword, target in _GUARDS:
        module, _, name = target.partition(":")
        cls = getattr(__import__(module, fromlist=[name]), name)
        params = inspect.signature(cls.__init__).parameters
        named = {p for p, v in params.items() if p != "self" and v.kind is not inspect.Parameter.VAR_KEYWORD}
        if any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values()):
            named |= set(WatchdogOptions.__annotations__) if name == "HangWatchdog" else set()
        options[name] = named
    return options


def bad_opt_outs(rows: list[dict[str, str]]) -> list[str]:
    """Every ``Guard(option=...)``, ``all_guards(guard=...)`` or ``TRAINGUARD_GUARDS_OFF=guard`` in the table that
    names no such guard or option."""
    options = guard_parameters()
    keywords = {keyword for keyword, _ in _GUARDS}
    bad: list[str] = []
    for row in rows:
        for cell in row.values():
            for callee, arguments in CALL.findall(cell):
                given = re.findall(r"(\w+)=", arguments)
                if callee == "all_guards":
                    bad += [f"all_guards({k}=...)" for k in given if k not in keywords]
                elif callee in options:
                    bad += [f"{callee}({k}=...)" for k in given if k not in options[callee]]
            for names in GUARDS_OFF.findall(cell):
                bad += [f"TRAINGUARD_GUARDS_OFF={n}" for n in names.split(",") if n not in keywords]
    return bad


# ------------------------------------------------------------------------------------------------ the page
def test_every_error_class_the_guards_use_is_in_the_table() -> None:
    known = error_classes()
    used = used_error_classes(known)
    # The scan itself must see the guards' errors, or this test would pass on an empty set.
    assert {"RunLockedError", "NonFiniteError", "SaveAuditError", "LossSpikeError"} <= used, used
    assert missing_errors(table_rows(PAGE.read_text(encoding="utf-8")), used) == []


def test_every_opt_out_names_a_real_guard_option() -> None:
    rows = table_rows(PAGE.read_text(encoding="utf-8"))
    assert bad_opt_outs(rows) == []
    spelled = sum(len(CALL.findall(row["opt-out"])) for row in rows)
    assert spelled >= 30, spelled  # the opt-outs are spelled as calls, so the check above has something to check


def test_every_row_says_when_what_why_and_how_to_opt_out() -> None:
    rows = table_rows(PAGE.read_text(encoding="utf-8"))
    assert len(rows) >= 30
    assert [row for row in rows if not row["when"] or not row["what trainguard does"] or not row["opt-out"]] == []
    named = {row["guard"].split()[0].strip("`") for row in rows}
    assert {name for _, target in _GUARDS if (name := target.rpartition(":")[2]) != "RunReporter"} <= named


def test_the_page_is_linked_from_the_index_and_the_readme() -> None:
    assert "(do-no-harm.md)" in (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert "(docs/do-no-harm.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ the checker
SAMPLE = f"""{TABLE_HEADING}

| guard | when | what trainguard does | why | opt-out |
|---|---|---|---|---|
| `NanGuard` | a NaN | `NonFiniteError` | poison | `NanGuard(action="warn")` |
| `RunLock` | two runs | `RunLockedError` | clash | `all_guards(run_lock=False)`; `TRAINGUARD_GUARDS_OFF=run_lock` |
| `HangWatchdog` | a stall | exits | restart | `HangWatchdog(action="dump")` |

after the table
"""


def test_a_new_error_class_not_in_the_table_is_reported() -> None:
    rows = table_rows(SAMPLE)
    assert missing_errors(rows, {"NonFiniteError", "RunLockedError"}) == []
    assert missing_errors(rows, {"NonFiniteError", "RunLockedError", "LossSpikeError"}) == ["LossSpikeError"]


def test_an_invented_option_or_guard_name_is_reported() -> None:
    assert bad_opt_outs(table_rows(SAMPLE)) == []
    typos = (
        SAMPLE.replace('NanGuard(action="warn")', 'NanGuard(acton="warn")')
        .replace("all_guards(run_lock=False)", "all_guards(runlock=False)")
        .replace("GUARDS_OFF=run_lock", "GUARDS_OFF=run_lok")
        .replace('HangWatchdog(action="dump")', 'HangWatchdog(actions="dump")')
    )
    assert bad_opt_outs(table_rows(typos)) == [
        "NanGuard(acton=...)",
        "all_guards(runlock=...)",
        "TRAINGUARD_GUARDS_OFF=run_lok",
        "HangWatchdog(actions=...)",
    ]


def test_the_errors_named_in_the_table_exist() -> None:
    # A renamed error class must not leave a stale name in the page.
    rows = table_rows(PAGE.read_text(encoding="utf-8"))
    named = set(re.findall(r"`(\w+Error)`", " ".join(" ".join(row.values()) for row in rows)))
    ours = named - set(dir(builtins)) - {"SafetensorError"}  # the plain Trainer's errors, named for comparison
    assert ours - set(error_classes()) == set()
    assert all(hasattr(trainguard, name) for name in ours)
