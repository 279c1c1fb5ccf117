"""Planning a build: which pipelines to build, from which stage, after which others, from what the store has.

`plan` is pure. Given what the build is asked for (the manifest, its exports and other targets, the
checkpoint globs: a `Goal`) and a read-only view of the ids the store holds (anything that answers `in`:
a set in the unit tests, `Predicate(store.contains)` in a build), it returns a frozen `Plan` and does
nothing else: no I/O of its own, no locks, no async. `pin` is the separate step that makes a plan hold
for the build: it pins every store entry the plan relies on, which re-checks each under its lock, and
plans again without those that were evicted or are being written meanwhile (a contended entry is a
miss: it is built).

The plan is plain data that a runner walks: the scheduler (`scheduler.py`) runs its steps here; a second
cache tier can look up, for each step, stages past its resume point, fetch them into the store, and plan
again; a dispatcher can submit each step as a task keyed by its pipeline id, after those it waits for.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import UsageError
from .manifest import Manifest, Pipeline


@dataclass(frozen=True, slots=True, kw_only=True)
class Goal:
    """What a build is asked for: everything `plan` needs besides what the store holds."""

    manifest: Manifest
    exports: tuple[str, ...] = ()       # pipeline names or ids, to build and export
    targets: tuple[str, ...] = ()       # to build besides the exports; with neither: every pipeline
    checkpoints: tuple[str, ...] = ()   # osbuild's globs over pipeline names, stage ids and stage types


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One pipeline to build."""

    pipeline: Pipeline
    resume: int                  # stages the store has: the tree after stage `resume - 1` is where it starts
    needs: frozenset[str]        # ids of the pipelines the stages to run read: build root, tree inputs
    waits_for: frozenset[str]    # of those, the ones this plan builds
    level: int                   # 0: waits for nothing; else one more than the highest level it waits for

    @property
    def id(self) -> str:
        assert self.pipeline.id is not None  # a pipeline without stages is never a step
        return self.pipeline.id

    @property
    def resume_id(self) -> str | None:
        """The stage whose tree the pipeline resumes from; None: from an empty tree."""
        return self.pipeline.stages[self.resume - 1].id if self.resume else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    goal: Goal
    exports: tuple[tuple[str, Pipeline], ...]   # each export as asked for, with its pipeline
    checkpoints: frozenset[str]                 # stage ids matched by the goal's globs
    build: tuple[Step, ...]                     # dependencies first
    cached: tuple[Pipeline, ...]                # whole in the store, reported from it; dependencies first
    external: frozenset[str]                    # needed pipeline ids only the store has, used as stored
    unused: tuple[Pipeline, ...]                # the manifest's others: not asked for, not needed, or empty

    @property
    def relies_on(self) -> frozenset[str]:
        """The store entries the build reads: what `pin` pins."""
        resumed = {s.resume_id for s in self.build if s.resume_id is not None}
        return frozenset(resumed | {str(p.id) for p in self.cached} | self.external)

    def levels(self) -> tuple[tuple[Step, ...], ...]:
        """The steps by level: each level's steps wait only for those of the levels before it."""
        grouped: list[list[Step]] = []
        for step in self.build:
            while len(grouped) <= step.level:
                grouped.append([])
            grouped[step.level].append(step)
        return tuple(tuple(level) for level in grouped)


def resolve_exports(manifest: Manifest, exports: Sequence[str], what: str = "Export") -> list[Pipeline]:
    """The pipelines named (by name or id); an unknown one is a UsageError that lists the names."""
    pipelines = []
    for name in exports:
        pipeline = manifest.lookup(name)
        if pipeline is None:
            names = [p.name for p in manifest.pipelines]
            raise UsageError(f"{what} {name} not found in {names}: name one of these pipelines or give a "
                             "pipeline's id (`aosbuild --inspect MANIFEST` shows the ids)")
        pipelines.append(pipeline)
    return pipelines


def match_checkpoints(manifest: Manifest, patterns: Sequence[str]) -> frozenset[str]:
    """Stage ids matched by osbuild's checkpoint globs: pipeline names (last stage), stage ids and types."""
    matched: set[str] = set()
    for pattern in patterns:
        for pipeline in manifest.pipelines:
            if pipeline.id and fnmatch.fnmatch(pipeline.name, pattern):
                matched.add(pipeline.id)
            for stage in pipeline.stages:
                if fnmatch.fnmatch(stage.id, pattern) or fnmatch.fnmatch(stage.type, pattern):
                    matched.add(stage.id)
    if patterns and not matched:
        raise UsageError("No checkpoints matched provided patterns! A pattern is a glob over pipeline names, "
                         "stage ids and stage types: `aosbuild --inspect MANIFEST` shows them")
    return frozenset(matched)


def resume_point(pipeline: Pipeline, stored: Container[str]) -> int:
    """How many stages of the pipeline the store has: the newest stored stage wins, gaps below it or not."""
    for index in range(len(pipeline.stages), 0, -1):
        if pipeline.stages[index - 1].id in stored:
            return index
    return 0


def plan(goal: Goal, stored: Container[str]) -> Plan:
    """What to build for the goal, given the ids the store holds; a pipeline in the store is not rebuilt.

    Each pipeline asked for (every one, without exports or targets) that the store lacks is built, resumed after its
    newest stored stage, after what its remaining stages need: its build root and the pipelines they read,
    planned the same way. A pipeline the store has whole is `cached`, with those it was built from that the
    store has too, so that the build reports their stages as the build that stored them did.
    """
    manifest = goal.manifest
    exports = resolve_exports(manifest, goal.exports)
    targets = [*exports, *resolve_exports(manifest, goal.targets, "Pipeline")]
    checkpoints = match_checkpoints(manifest, goal.checkpoints)
    by_id: dict[str, Pipeline] = {}
    for pipeline in manifest.pipelines:
        if pipeline.id is not None:
            by_id.setdefault(pipeline.id, pipeline)  # the first of equal pipelines, as `Manifest.by_id`
    steps: dict[str, Step] = {}
    cached: dict[str, Pipeline] = {}  # in the order they are reported: dependencies first
    seen: set[str] = set()  # in the store whole: reported, or about to be once its dependencies are
    external: set[str] = set()
    path: list[str] = []  # the pipelines being planned, each needed by the one before it

    def found(pipeline: Pipeline) -> None:
        assert pipeline.id is not None
        seen.add(pipeline.id)
        for dep in sorted(pipeline.dependencies()):
            if dep in by_id and dep not in seen and dep not in steps and dep in stored:
                found(by_id[dep])
        cached[pipeline.id] = pipeline

    def visit(pipeline_id: str, wanted_by: str) -> None:
        if pipeline_id in steps or pipeline_id in seen or pipeline_id in external:
            return
        if pipeline_id in path:
            names = [by_id[i].name for i in path[path.index(pipeline_id):]]
            raise UsageError(f"{wanted_by} needs pipeline {pipeline_id}, which needs it in turn "
                             f"({' -> '.join([*names, names[0]])}): the pipelines cannot be built; remove one "
                             "of these references (a build root or an input)")
        pipeline = by_id.get(pipeline_id)
        if pipeline_id in stored:
            if pipeline is None:
                external.add(pipeline_id)
            else:
                found(pipeline)
            return
        if pipeline is None:
            raise UsageError(f"{wanted_by} needs pipeline {pipeline_id}, which is neither in the manifest "
                             "nor in the store: add that pipeline to the manifest, or build the manifest that "
                             "has it into this --store first")
        resume = resume_point(pipeline, stored)
        needs = frozenset(pipeline.dependencies(after=resume))
        path.append(pipeline_id)
        for dep in sorted(needs):
            visit(dep, f"pipeline '{pipeline.name}'")
        path.pop()
        waits_for = frozenset(dep for dep in needs if dep in steps)
        steps[pipeline_id] = Step(pipeline=pipeline, resume=resume, needs=needs, waits_for=waits_for,
                                  level=1 + max((steps[dep].level for dep in waits_for), default=-1))

    for target in targets or manifest.pipelines:
        if target.id is not None:
            visit(target.id, "the command line")
    return Plan(goal=goal, exports=tuple(zip(goal.exports, exports, strict=True)), checkpoints=checkpoints,
                build=tuple(steps.values()), cached=tuple(cached.values()), external=frozenset(external),
                unused=tuple(p for p in manifest.pipelines if p.id not in steps and p.id not in cached))


class Pinner(Protocol):
    """What holds store entries for a build (`store.Pins`): `try_pin` is False for an entry that is gone,
    damaged or being written, found under the entry's lock."""

    def try_pin(self, object_id: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class Predicate:
    """The ids `has` is true of, as a container: `Predicate(store.contains)` is what the store holds."""

    has: Callable[[str], bool]

    def __contains__(self, object_id: object) -> bool:
        return isinstance(object_id, str) and self.has(object_id)


@dataclass(frozen=True, slots=True)
class Without:
    """What `stored` holds but the ids in `gone`."""

    stored: Container[str]
    gone: frozenset[str]

    def __contains__(self, object_id: object) -> bool:
        return object_id not in self.gone and object_id in self.stored


def pin(first: Plan, pins: Pinner, stored: Container[str]) -> Plan:
    """Pin every entry the plan relies on; the plan that holds once they are all pinned.

    An entry that cannot be pinned (evicted since planning, damaged, or being written by another build)
    is a miss: the goal is planned again with `stored` (what `first` was planned with) less every such
    entry, until all of a plan's entries are pinned. Each round loses at least one entry, so it ends.
    Entries pinned for an earlier round's plan stay pinned until the build ends, unused.
    """
    current, gone = first, frozenset[str]()
    while True:
        lost = frozenset(i for i in sorted(current.relies_on) if not pins.try_pin(i))
        if not lost:
            return current
        gone |= lost
        current = plan(current.goal, Without(stored, gone))
