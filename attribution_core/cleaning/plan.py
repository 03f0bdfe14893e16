"""A cleaning plan: for each training example a user or a ranking suspects, relabel it, remove it, or keep it.

A plan is made from the run's flags (annotations.py) and, optionally, the top k of a mislabel
ranking, with the defaults of DEFAULT_ACTIONS, then edited example by example. What a user edits is
kept as the run's `PlanSource` (runs/<id>/cleaning_plan.json: which flags and ranking, and the
edits), so flags set later flow into the plan and the edits stay; `make_plan` turns it into a
`CleaningPlan`, the concrete list that predictions, retrains and exports use. A concrete plan is
keyed by its content (`CleaningPlan.key`) and stored once under runs/<id>/cleaning_plans/<key>.json,
which is how jobs name it. Examples are named by their stable id (`Dataset.ids`), as flags are.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..annotations import Flag, escape_cell
from ..errors import PlanError, WorkspaceError
from ..evaluation.mislabel import MislabelRanking
from ..runs.run import Run
from ..store import atomic_write_json, check_name, content_key, read_json

ACTIONS = ("relabel", "remove", "keep")
"""What a plan does with an example: give it another class, leave it out of training, or leave it as it is."""

DEFAULT_ACTIONS = {"mislabeled": "relabel", "outlier": "remove", "ambiguous": "keep", "fine": "keep"}
"""A flag kind's default action; a mislabeled flag without a suggested class (or suggesting the class it has) removes."""

SOURCE_FILE = "cleaning_plan.json"
"""The run's plan as the user edits it (a PlanSource), in the run's folder."""

PLANS_DIR = "cleaning_plans"
"""The concrete plans jobs and exports used, by key, in the run's folder."""

CSV_COLUMNS = ("example_id", "train_index", "given_label", "given_class", "action", "new_label", "new_class", "origin")


@dataclass(frozen=True)
class PlanEntry:
    """One example's action: relabel (to `label`), remove or keep; origin says why the example is in the plan."""

    example_id: int
    action: str
    label: int | None = None
    origin: str = ""

    def content(self) -> tuple[int, str, int | None]:
        """What the entry does (its origin aside): what a plan's key is made of."""
        return self.example_id, self.action, self.label


@dataclass(frozen=True)
class CleaningPlan:
    """The actions of a plan on one run, by example id (ascending, each id once)."""

    run_id: str
    entries: tuple[PlanEntry, ...]
    description: str = ""

    def key(self) -> str:
        """A short hash of what the plan does (the run, and each entry's id, action and label), not of why."""
        return content_key({"run": self.run_id, "entries": [entry.content() for entry in self.entries]})

    def with_action(self, action: str) -> list[PlanEntry]:
        """The entries doing `action`."""
        return [entry for entry in self.entries if entry.action == action]

    def counts(self) -> dict[str, int]:
        """How many examples each action takes: {"relabel": r, "remove": m, "keep": k}."""
        return {action: len(self.with_action(action)) for action in ACTIONS}

    def summary(self) -> str:
        """'12 relabelled, 3 removed, 2 kept'."""
        counts = self.counts()
        return f"{counts['relabel']} relabelled, {counts['remove']} removed, {counts['keep']} kept"

    def to_json(self) -> dict:
        """The stored form (cleaning_plans/<key>.json)."""
        return {"run": self.run_id, "description": self.description, "entries": [asdict(entry) for entry in self.entries]}

    @classmethod
    def from_json(cls, payload: Mapping) -> "CleaningPlan":
        """Inverse of to_json."""
        return cls(payload["run"], tuple(PlanEntry(**entry) for entry in payload["entries"]), payload.get("description", ""))


@dataclass(frozen=True)
class PlanSource:
    """How a run's plan is made: from which flags and ranking, and the user's edits on top of the defaults."""

    flags: bool = field(default=True, metadata={"help": (
        "every flagged example (mislabeled, outlier, ambiguous) with its kind's default action")})
    ranking: str | None = field(default=None, metadata={"help": (
        "also the top_k most suspicious examples of this mislabel ranking (relabelled to its suggestion, else removed)")})
    top_k: int = field(default=0, metadata={"help": "how many of the ranking's most suspicious examples (0: none)"})
    edits: tuple[tuple[int, str, int | None], ...] = field(default=(), metadata={"help": (
        "(example id, action, label) the user chose instead of the default")})

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise PlanError(f"top_k={self.top_k}: give how many of the ranking's most suspicious examples (0 or more)")
        edits = tuple((int(example_id), str(action), None if label is None else int(label)) for example_id, action, label in self.edits)
        bad = [edit for edit in edits if edit[1] not in ACTIONS]
        if bad:
            raise PlanError(f"edits {bad[:3]}: an action is one of {', '.join(ACTIONS)}")
        object.__setattr__(self, "edits", edits)

    def describe(self) -> str:
        """'flags + top 300 of dynamics', 'flags', 'top 50 of loss' or 'edits': where the plan's examples come from."""
        parts = ["flags"] * self.flags + ([f"top {self.top_k} of {self.ranking}"] if self.top_k else [])
        return " + ".join(parts) or "edits"

    def edited(self, example_id: int, action: str, label: int | None = None) -> "PlanSource":
        """The source with one example's action set (replacing an earlier edit of it)."""
        kept = tuple(edit for edit in self.edits if edit[0] != int(example_id))
        return PlanSource(self.flags, self.ranking, self.top_k, (*kept, (int(example_id), action, label)))

    def to_json(self) -> dict:
        """The stored form (cleaning_plan.json)."""
        return {"flags": self.flags, "ranking": self.ranking, "top_k": self.top_k, "edits": [list(edit) for edit in self.edits]}

    @classmethod
    def from_json(cls, payload: Mapping) -> "PlanSource":
        """Inverse of to_json."""
        return cls(bool(payload.get("flags", True)), payload.get("ranking"), int(payload.get("top_k", 0)),
                   tuple(tuple(edit) for edit in payload.get("edits", [])))


def flag_entry(flag: Flag, given: int) -> PlanEntry:
    """A flag's default entry (DEFAULT_ACTIONS): a mislabeled flag relabels to its suggested class when that is another class."""
    action = DEFAULT_ACTIONS[flag.kind]
    origin = f"flag: {flag.kind}"
    if action == "relabel" and (flag.suggested_label is None or flag.suggested_label == given):
        why = "no suggested class" if flag.suggested_label is None else "its suggested class is the one it has"
        return PlanEntry(flag.example_id, "remove", None, f"{origin} ({why})")
    return PlanEntry(flag.example_id, action, flag.suggested_label if action == "relabel" else None, origin)


def ranking_entry(ranking: MislabelRanking, index: int, example_id: int, given: int, rank: int) -> PlanEntry:
    """A ranking's suspect: relabelled to the ranking's suggestion when it suggests another class, else removed."""
    suggestion = ranking.suggestion(index, given)
    origin = f"ranking: {ranking.name} #{rank + 1}"
    return PlanEntry(example_id, "remove", None, origin) if suggestion is None else PlanEntry(example_id, "relabel", suggestion, origin)


def make_plan(run: Run, source: PlanSource, flags: Mapping[int, Flag], ranking: MislabelRanking | None = None) -> CleaningPlan:
    """The plan a source gives: flagged examples and the ranking's top k with their default actions, then the edits.

    A verdict beats the ranking: a top-k example flagged fine or ambiguous is kept. flags: the run's
    flags by example id (Annotations.flags); ranking: the source's ranking (needed when top_k > 0).
    """
    train_set, _ = run.datasets()
    index_of = {int(example_id): index for index, example_id in enumerate(train_set.ids.tolist())}
    given = train_set.y.numpy()
    entries: dict[int, PlanEntry] = {}
    if source.top_k:
        if ranking is None or ranking.name != source.ranking:
            raise PlanError(f"the plan takes the top {source.top_k} of ranking {source.ranking!r}: give that ranking")
        for rank, index in enumerate(ranking.order()[: source.top_k].tolist()):
            example_id = int(train_set.ids[index])
            entries[example_id] = ranking_entry(ranking, index, example_id, int(given[index]), rank)
    if source.flags:
        for example_id, flag in flags.items():
            if flag.kind != "fine" or example_id in entries:
                entries[example_id] = flag_entry(flag, int(given[index_of[example_id]]) if example_id in index_of else -1)
    for example_id, action, label in source.edits:
        entries[example_id] = PlanEntry(example_id, action, label, "edited")
    plan = CleaningPlan(run.run_id, tuple(entries[example_id] for example_id in sorted(entries)), source.describe())
    check_plan(run, plan, allow_no_change=True)
    return plan


def check_plan(run: Run, plan: CleaningPlan, *, allow_no_change: bool = False) -> None:
    """Raise PlanError, naming the examples, unless every entry names a training example of the run once with a doable action.

    A relabel must name another class than the example has; allow_no_change accepts a plan that
    changes nothing (a plan being edited), which a prediction, retrain or export refuses.
    """
    if plan.run_id != run.run_id:
        raise PlanError(f"the plan is for run {plan.run_id!r}, not {run.run_id!r}")
    train_set, _ = run.datasets()
    index_of = {int(example_id): index for index, example_id in enumerate(train_set.ids.tolist())}
    ids = [entry.example_id for entry in plan.entries]
    if len(set(ids)) != len(ids):
        raise PlanError(f"the plan names examples more than once: {sorted({i for i in ids if ids.count(i) > 1})[:10]}")
    missing = [example_id for example_id in ids if example_id not in index_of]
    if missing:
        raise PlanError(f"the plan names example ids {missing[:10]}{' …' if len(missing) > 10 else ''} that run {run.run_id!r}'s "
                        f"training set does not hold ({len(train_set)} examples): were they flagged on another run's data?")
    for entry in plan.entries:
        if entry.action not in ACTIONS:
            raise PlanError(f"example {entry.example_id}: action {entry.action!r}; choose one of {', '.join(ACTIONS)}")
        if entry.action != "relabel":
            if entry.label is not None:
                raise PlanError(f"example {entry.example_id}: only a relabel names a class ({entry.action} names {entry.label})")
            continue
        given = int(train_set.y[index_of[entry.example_id]])
        if entry.label is None or not 0 <= entry.label < train_set.n_classes:
            raise PlanError(f"example {entry.example_id}: relabel to {entry.label}? give a class 0..{train_set.n_classes - 1}")
        if entry.label == given:
            raise PlanError(f"example {entry.example_id} is already labelled {train_set.class_names[given]!r}: a relabel names "
                            "another class; remove or keep it instead")
    if not allow_no_change and not any(entry.action != "keep" for entry in plan.entries):
        raise PlanError(f"the plan for run {run.run_id!r} changes nothing (no example is relabelled or removed): flag suspects "
                        "on the Mislabels page, take a ranking's top k, or edit the plan")
    if not allow_no_change and len(plan.with_action("remove")) >= len(train_set):
        raise PlanError(f"the plan removes all {len(train_set)} training examples: nothing would be left to train on")


def plan_arrays(run: Run, plan: CleaningPlan) -> tuple[np.ndarray, np.ndarray]:
    """(keep (N,) bool, labels (N,) int64): the training set as the plan leaves it, for `retrain(run, keep, labels=labels)`."""
    check_plan(run, plan)
    train_set, _ = run.datasets()
    index_of = {int(example_id): index for index, example_id in enumerate(train_set.ids.tolist())}
    keep, labels = np.ones(len(train_set), dtype=bool), train_set.y.numpy().astype(np.int64).copy()
    for entry in plan.with_action("remove"):
        keep[index_of[entry.example_id]] = False
    for entry in plan.with_action("relabel"):
        labels[index_of[entry.example_id]] = entry.label
    return keep, labels


def plan_indices(run: Run, plan: CleaningPlan, action: str) -> np.ndarray:
    """Training indices (ascending by example id) of the entries doing `action`."""
    train_set, _ = run.datasets()
    index_of = {int(example_id): index for index, example_id in enumerate(train_set.ids.tolist())}
    return np.asarray([index_of[entry.example_id] for entry in plan.with_action(action)], dtype=np.int64)


def plan_csv(run: Run, plan: CleaningPlan) -> str:
    """The plan as CSV text (CSV_COLUMNS), one row per entry, cells escaped against formula injection."""
    train_set, _ = run.datasets()
    index_of = {int(example_id): index for index, example_id in enumerate(train_set.ids.tolist())}
    names = train_set.class_names
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for entry in plan.entries:
        index = index_of[entry.example_id]
        given = int(train_set.y[index])
        new = "" if entry.label is None else entry.label
        writer.writerow([entry.example_id, index, given, escape_cell(names[given]), entry.action, new,
                         "" if entry.label is None else escape_cell(names[entry.label]), escape_cell(entry.origin)])
    return buffer.getvalue()


def load_source(run: Run) -> PlanSource:
    """The run's plan source as last saved, or the default (its flags) when none is."""
    path = run.directory / SOURCE_FILE
    return PlanSource.from_json(read_json(path)) if path.is_file() else PlanSource()


def save_source(run: Run, source: PlanSource) -> None:
    """Keep the run's plan source (atomically: a crash leaves the old one or the new one)."""
    atomic_write_json(run.directory / SOURCE_FILE, source.to_json())


def plan_path(run: Run, key: str) -> Path:
    """Where a concrete plan of the run is stored by its key."""
    return run.directory / PLANS_DIR / f"{check_name(key, 'plan key')}.json"


def store_plan(run: Run, plan: CleaningPlan) -> str:
    """Store a concrete plan under its key (once; plans never change) and return the key."""
    check_plan(run, plan)
    key = plan.key()
    if not plan_path(run, key).is_file():
        atomic_write_json(plan_path(run, key), plan.to_json())
    return key


def load_plan(run: Run, key: str) -> CleaningPlan:
    """A stored plan by its key, checked to be what its key says."""
    path = plan_path(run, key)
    if not path.is_file():
        raise PlanError(f"run {run.run_id!r} has no stored cleaning plan {key!r} ({path})")
    try:
        plan = CleaningPlan.from_json(read_json(path))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise WorkspaceError(f"{path} is not a cleaning plan ({exc}); delete it and make the plan again") from exc
    if plan.key() != key:
        raise WorkspaceError(f"{path} holds another plan than its name says; delete it and make the plan again")
    return plan
