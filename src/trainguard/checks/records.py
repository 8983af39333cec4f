"""The records trainguard writes and reads back, as versioned, frozen types with ``to_json`` / ``from_json`` and
bounds: one place that says what each file holds, so a writer and a reader cannot drift apart unnoticed.

``from_json`` checks every field it knows (type, size) and names the one that is wrong
(:class:`~trainguard.errors.MalformedFileError` with ``file`` and ``field``); a record of a newer format version is
refused by name, never half read. Fields a record does not know are dropped on the next write (they are not
trainguard's). Started with the lineage registry (``trainguard-checkpoints.json``); the crash log and the manifest
metadata are to follow.

Imports nothing heavy.

Example::

    from trainguard.checks.records import Registry
    registry = Registry.from_json({"format": "trainguard-lineage/1", "runs": []}, source="out/registry.json")
    registry.to_json()["format"]     # 'trainguard-lineage/1'
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import MalformedFileError
from ._layout import LINEAGE_FORMAT

__all__ = ["AfterSave", "CurrentLineage", "LineageEntry", "Registry", "RunEntry", "summarize_ranks"]

_FAMILY, _, _VERSION = LINEAGE_FORMAT.rpartition("/")
MAX_TEXT = 4096  # one id, host, time or name; a longer one is not trainguard's
MAX_ENTRIES = 10_000  # runs, lineages or saves in one registry (writers keep 200, 200 and 100)


class _Reader:
    """Reads fields of one JSON object, naming the file and the field path of the first that is wrong."""

    def __init__(self, source: str, path: str = "") -> None:
        self.source, self.path = source, path

    def at(self, key: str | int) -> _Reader:
        return _Reader(self.source, f"{self.path}[{key}]" if isinstance(key, int) else f"{self.path}.{key}".lstrip("."))

    def wrong(self, what: str) -> MalformedFileError:
        return MalformedFileError(
            f"{self.source}: field {self.path or '(top)'} {what}",
            where={"file": self.source, "field": self.path or "(top)"},
        )

    def obj(self, value: Any) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.wrong(f"is a {type(value).__name__}, not an object")
        if len(value) > MAX_ENTRIES:
            raise self.wrong(f"has {len(value)} entries, more than the {MAX_ENTRIES} trainguard writes")
        return value

    def items(self, value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise self.wrong(f"is a {type(value).__name__}, not a list")
        if len(value) > MAX_ENTRIES:
            raise self.wrong(f"has {len(value)} entries, more than the {MAX_ENTRIES} trainguard writes")
        return value

    def text(self, obj: Mapping[str, Any], key: str) -> str | None:
        value = obj.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.at(key).wrong(f"is a {type(value).__name__}, not text")
        if len(value) > MAX_TEXT:
            raise self.at(key).wrong(f"is {len(value)} characters long, more than {MAX_TEXT}")
        return value

    def number(self, obj: Mapping[str, Any], key: str, *, minimum: int = 0) -> int | None:
        value = obj.get(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.at(key).wrong(f"is {value!r}, not a whole number >= {minimum}")
        return value

    def flag(self, obj: Mapping[str, Any], key: str) -> bool:
        value = obj.get(key, False)
        if not isinstance(value, bool):
            raise self.at(key).wrong(f"is {value!r}, not true or false")
        return value


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _digest_of(values: list[Any]) -> str | None:
    """One digest of every rank's value in rank order; None when no rank has one."""
    if not any(isinstance(v, str) and v for v in values):
        return None
    joined = "\n".join(v if isinstance(v, str) else "" for v in values)
    return hashlib.sha256(joined.encode()).hexdigest()[:32]


def summarize_ranks(observations: list[Any]) -> dict[str, Any]:
    """What the first step after a save saw on all ranks, in a size that does not grow with them: the number of
    ranks, and one digest each of every rank's RNG digest and batch digest (rank order). Two runs whose summaries
    match saw the same random state and the same batch on every rank; one that differs names which of the two.

    Example::

        summarize_ranks([{"rng": "a1", "batch": "b1"}, {"rng": "a2", "batch": "b2"}])["world_size"]   # 2
    """
    items = [o if isinstance(o, Mapping) else {} for o in observations]
    return {
        "world_size": len(items),
        "rng": _digest_of([o.get("rng") for o in items]),
        "batch": _digest_of([o.get("batch") for o in items]),
    }


@dataclass(frozen=True)
class CurrentLineage:
    """The lineage ``resume_from_checkpoint=True`` continues, since when, and whether it adopts checkpoints that
    record no lineage."""

    lineage: str
    since_utc: str | None = None
    adopts_unrecorded: bool = False

    def to_json(self) -> dict[str, Any]:
        return _drop_none(
            {"lineage": self.lineage, "since_utc": self.since_utc, "adopts_unrecorded": self.adopts_unrecorded}
        )

    @classmethod
    def from_json(cls, value: Any, read: _Reader) -> CurrentLineage | None:
        obj = read.obj(value)
        lineage = read.text(obj, "lineage")
        if not lineage:
            return None  # a registry with no current lineage
        return cls(lineage, read.text(obj, "since_utc"), read.flag(obj, "adopts_unrecorded"))


@dataclass(frozen=True)
class LineageEntry:
    """One lineage that trained here: when and where it began, and the checkpoint it grew from (None: step 0)."""

    started_utc: str | None = None
    host: str | None = None
    origin: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"started_utc": self.started_utc, "host": self.host, "from": dict(self.origin) if self.origin else None}

    @classmethod
    def from_json(cls, value: Any, read: _Reader) -> LineageEntry:
        obj = read.obj(value)
        origin = obj.get("from")
        if origin is not None:
            found = read.at("from").obj(origin)
            for key in ("name", "lineage", "run", "state", "saved_by"):
                read.at("from").text(found, key)
            read.at("from").number(found, "step")
            origin = dict(found)
        return cls(read.text(obj, "started_utc"), read.text(obj, "host"), origin)


@dataclass(frozen=True)
class RunEntry:
    """One ``train()`` call: its id, lineage, start, host, PID, world size and the checkpoint it resumed from."""

    run: str
    lineage: str | None = None
    started_utc: str | None = None
    host: str | None = None
    pid: int | None = None
    world_size: int | None = None
    resumed_from: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "lineage": self.lineage,
            "started_utc": self.started_utc,
            "host": self.host,
            "pid": self.pid,
            "world_size": self.world_size,
            "resumed_from": self.resumed_from,
        }

    @classmethod
    def from_json(cls, value: Any, read: _Reader) -> RunEntry:
        obj = read.obj(value)
        run = read.text(obj, "run")
        if not run:
            raise read.at("run").wrong("is missing")
        return cls(
            run,
            read.text(obj, "lineage"),
            read.text(obj, "started_utc"),
            read.text(obj, "host"),
            read.number(obj, "pid"),
            read.number(obj, "world_size", minimum=1),
            read.text(obj, "resumed_from"),
        )


@dataclass(frozen=True)
class AfterSave:
    """What the first step after one save saw, on all ranks (``lineage.summarize_ranks``): the number of ranks and
    one digest each of every rank's RNG and batch digests."""

    run: str | None
    utc: str | None
    world_size: int
    rng: str | None = None
    batch: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "utc": self.utc, "world_size": self.world_size, "rng": self.rng, "batch": self.batch}

    @classmethod
    def from_json(cls, value: Any, read: _Reader) -> AfterSave:
        obj = read.obj(value)
        run, utc = read.text(obj, "run"), read.text(obj, "utc")
        if isinstance(obj.get("ranks"), list):  # a release before summaries kept one observation per rank
            return cls(run, utc, **summarize_ranks(read.at("ranks").items(obj["ranks"])))
        size = read.number(obj, "world_size", minimum=1)
        if size is None:
            raise read.at("world_size").wrong("is missing")
        return cls(run, utc, size, read.text(obj, "rng"), read.text(obj, "batch"))


@dataclass(frozen=True)
class Registry:
    """The lineage registry, ``output_dir/trainguard-checkpoints.json`` (format ``trainguard-lineage/1``).

    A marker of a release before lineages (another ``format``, no ``current``) reads as a registry with no current
    lineage; one of a newer lineage format is refused by name.
    """

    since_utc: str | None = None
    meaning: str | None = None
    current: CurrentLineage | None = None
    lineages: Mapping[str, LineageEntry] = field(default_factory=dict)
    runs: tuple[RunEntry, ...] = ()
    after_save: Mapping[str, AfterSave] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        head = {"format": LINEAGE_FORMAT, "since_utc": self.since_utc, "meaning": self.meaning}
        out: dict[str, Any] = _drop_none(head)
        if self.current is not None:
            out["current"] = self.current.to_json()
        if self.lineages:
            out["lineages"] = {k: v.to_json() for k, v in self.lineages.items()}
        if self.runs:
            out["runs"] = [r.to_json() for r in self.runs]
        if self.after_save:
            out["after_save"] = {k: v.to_json() for k, v in self.after_save.items()}
        return out

    @classmethod
    def from_json(cls, value: Any, *, source: str) -> Registry:
        """The registry in ``value`` (a parsed JSON object read from ``source``).

        Raises:
            MalformedFileError: a field of the wrong type or size (named: ``where["field"]``), or a newer format.
        """
        read = _Reader(source)
        obj = read.obj(value)
        fmt = read.text(obj, "format")
        if fmt is not None and fmt.startswith(_FAMILY + "/") and fmt != LINEAGE_FORMAT:
            raise MalformedFileError(
                f"{source} is in format {fmt}, which this trainguard release does not know (it reads {LINEAGE_FORMAT})",
                where={"file": source, "field": "format"},
                next_step="Upgrade trainguard to the release that wrote it, or give this run another output_dir.",
            )
        current = obj.get("current")
        lineages = read.at("lineages").obj(obj.get("lineages", {}))
        runs = read.at("runs").items(obj.get("runs", []))
        after = read.at("after_save").obj(obj.get("after_save", {}))
        saves = {str(k): AfterSave.from_json(v, read.at("after_save").at(str(k))) for k, v in after.items()}
        return cls(
            since_utc=read.text(obj, "since_utc"),
            meaning=read.text(obj, "meaning"),
            current=CurrentLineage.from_json(current, read.at("current")) if current is not None else None,
            lineages={str(k): LineageEntry.from_json(v, read.at("lineages").at(str(k))) for k, v in lineages.items()},
            runs=tuple(RunEntry.from_json(r, read.at("runs").at(i)) for i, r in enumerate(runs)),
            after_save=saves,
        )
