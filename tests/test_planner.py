"""The planner (`aosbuild/planner.py`) and the scheduler's decisions, without bubblewrap.

Planning is tested on models built here, with plain sets for what the store holds: a pipeline's id is
its last stage's id, and these stage ids are made up (`os-0`, `os-1`, ...) so that a test reads as what
is stored. Pinning is tested with a fake pinner and with a real store on tmpfs. The scheduler runs plans
with fake build functions that record what starts, finishes or is cancelled, and when.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from contextlib import aclosing, closing
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import wait_all_tasks_blocked

from aosbuild import planner
from aosbuild.errors import UsageError, flatten
from aosbuild.manifest import PIPELINE_ORIGIN, Input, Manifest, Pipeline, Stage
from aosbuild.planner import Goal, Plan, Step
from aosbuild.scheduler import run_steps
from aosbuild.store import Pins, Store
from aosbuild.store import entries as store_entries

# -- models ----------------------------------------------------------------------------------------------


def stage(stage_id: str, *reads: str, type_: str = "org.osbuild.test") -> Stage:
    """A stage that reads the trees of the pipelines `reads` (their ids) through its inputs."""
    inputs = {f"tree{i}": Input(name=f"tree{i}", type="org.osbuild.tree", origin=PIPELINE_ORIGIN, refs={ref: {}})
              for i, ref in enumerate(reads)}
    return Stage(type=type_, id=stage_id, inputs=inputs)


def pipeline(name: str, count: int, *, build: Pipeline | str | None = None,
             reads: dict[int, Sequence[Pipeline | str]] | None = None) -> Pipeline:
    """`count` stages named `NAME-0`, `NAME-1`, ...; stage `i` reads the pipelines `reads[i]`."""
    reads = reads or {}

    def ref(p: Pipeline | str) -> str:
        return p if isinstance(p, str) else str(p.id)

    return Pipeline(name=name, build=None if build is None else ref(build),
                    stages=tuple(stage(f"{name}-{i}", *(ref(p) for p in reads.get(i, ()))) for i in range(count)))


def manifest(*pipelines: Pipeline) -> Manifest:
    return Manifest(version="2", pipelines=pipelines)


def ids(stages: Pipeline, *indices: int) -> set[str]:
    return {stages.stages[i].id for i in indices}


def steps(plan: Plan) -> dict[str, tuple[int, set[str]]]:
    """Each step's pipeline name: its resume index and the names of the steps it waits for."""
    names = {s.id: s.pipeline.name for s in plan.build}
    return {s.pipeline.name: (s.resume, {names[d] for d in s.waits_for}) for s in plan.build}


def names(pipelines: Sequence[Pipeline]) -> list[str]:
    return [p.name for p in pipelines]


# A build root built on the host, a second one built in the first, an OS tree built in the second, and
# an image built in the second that reads the OS tree at its stage 1.
BUILD0 = pipeline("build0", 2)
BUILD1 = pipeline("build1", 3, build=BUILD0)
OS = pipeline("os", 5, build=BUILD1)
IMAGE = pipeline("image", 3, build=BUILD1, reads={1: [OS]})
CHAIN = manifest(BUILD0, BUILD1, OS, IMAGE)


# -- planning --------------------------------------------------------------------------------------------


def test_an_empty_store_builds_every_pipeline_after_its_build_root_and_inputs() -> None:
    plan = planner.plan(Goal(manifest=CHAIN), set())
    assert steps(plan) == {"build0": (0, set()), "build1": (0, {"build0"}), "os": (0, {"build1"}),
                           "image": (0, {"build1", "os"})}
    assert [s.pipeline.name for s in plan.build] == ["build0", "build1", "os", "image"]
    assert [[s.pipeline.name for s in level] for level in plan.levels()] == [["build0"], ["build1"], ["os"], ["image"]]
    assert (plan.cached, plan.unused, plan.external, plan.relies_on) == ((), (), frozenset(), frozenset())


def test_an_export_plans_only_what_it_needs() -> None:
    plan = planner.plan(Goal(manifest=CHAIN, exports=("os",)), set())
    assert steps(plan) == {"build0": (0, set()), "build1": (0, {"build0"}), "os": (0, {"build1"})}
    assert names(plan.unused) == ["image"]
    assert plan.exports == (("os", OS),)


def test_an_export_by_id_and_an_unknown_export() -> None:
    assert planner.plan(Goal(manifest=CHAIN, exports=(str(BUILD0.id),)), set()).exports == ((BUILD0.id, BUILD0),)
    with pytest.raises(UsageError, match=r"Export nope not found in \['build0', 'build1', 'os', 'image'\]"):
        planner.plan(Goal(manifest=CHAIN, exports=("nope",)), set())


def test_the_resume_point_is_the_newest_stored_stage_whatever_the_gaps_below_it() -> None:
    assert planner.resume_point(OS, set()) == 0
    assert planner.resume_point(OS, ids(OS, 0)) == 1
    assert planner.resume_point(OS, ids(OS, 0, 2)) == 3       # stage 1 is gone: stage 2 is still newer
    assert planner.resume_point(OS, ids(OS, 3)) == 4          # nothing below it stored
    assert planner.resume_point(OS, ids(OS, 0, 1, 2, 3, 4)) == 5

    stored = ids(OS, 1, 3) | {str(BUILD1.id)}
    plan = planner.plan(Goal(manifest=CHAIN, exports=("os",)), stored)
    (step,) = plan.build
    assert (step.pipeline, step.resume, step.resume_id) == (OS, 4, OS.stages[3].id)
    assert step.needs == {BUILD1.id}
    assert step.waits_for == frozenset()
    assert plan.relies_on == {OS.stages[3].id, BUILD1.id}


def test_a_pipeline_the_store_has_whole_is_cached_with_the_stored_pipelines_it_was_built_from() -> None:
    stored = {str(OS.id), str(BUILD1.id)}  # build0 was evicted since
    plan = planner.plan(Goal(manifest=CHAIN, exports=("os",)), stored)
    assert plan.build == ()
    assert names(plan.cached) == ["build1", "os"]     # dependencies first, to be reported as built then
    assert names(plan.unused) == ["build0", "image"]  # needed by nothing this build does
    assert plan.relies_on == stored


def test_an_export_whose_dependencies_are_cached_waits_for_nothing() -> None:
    stored = {str(OS.id), str(BUILD1.id), str(BUILD0.id)}
    plan = planner.plan(Goal(manifest=CHAIN, exports=("image",)), stored)
    assert steps(plan) == {"image": (0, set())}
    (step,) = plan.build
    assert step.needs == {OS.id, BUILD1.id}
    assert step.level == 0
    assert names(plan.cached) == ["build0", "build1", "os"]


def test_inputs_of_stages_already_stored_are_not_needed() -> None:
    # image resumes after its stage 1, which read os: os is neither built nor reported
    stored = ids(IMAGE, 1) | {str(BUILD1.id)}
    plan = planner.plan(Goal(manifest=CHAIN, exports=("image",)), stored)
    assert steps(plan) == {"image": (2, set())}
    assert names(plan.cached) == ["build1"]
    assert names(plan.unused) == ["build0", "os"]
    # resumed before stage 1, it reads os again
    plan = planner.plan(Goal(manifest=CHAIN, exports=("image",)), ids(IMAGE, 0) | {str(BUILD1.id)})
    assert steps(plan) == {"os": (0, set()), "image": (1, {"os"})}


def test_a_build_root_chain_resumes_each_pipeline_separately() -> None:
    stored = ids(BUILD0, 1) | ids(BUILD1, 0) | ids(OS, 2)
    plan = planner.plan(Goal(manifest=CHAIN, exports=("os",)), stored)
    assert steps(plan) == {"build1": (1, set()), "os": (3, {"build1"})}
    assert names(plan.cached) == ["build0"]
    assert plan.relies_on == {BUILD0.id, BUILD1.stages[0].id, OS.stages[2].id}
    assert [[s.pipeline.name for s in level] for level in plan.levels()] == [["build1"], ["os"]]


def test_independent_pipelines_share_a_level() -> None:
    left = pipeline("left", 2, build=BUILD0)
    right = pipeline("right", 2, build=BUILD0)
    both = pipeline("both", 1, reads={0: [left, right]})
    plan = planner.plan(Goal(manifest=manifest(BUILD0, left, right, both)), set())
    assert [sorted(s.pipeline.name for s in level) for level in plan.levels()] == \
        [["build0"], ["left", "right"], ["both"]]


def test_checkpoint_globs_match_pipeline_names_stage_ids_and_stage_types() -> None:
    typed = Pipeline(name="typed", stages=(stage("t-0", type_="org.osbuild.rpm"), stage("t-1", type_="org.osbuild.ln")))
    goal = Goal(manifest=manifest(BUILD0, BUILD1, OS, typed), checkpoints=("build?", "os-[13]", "*.rpm"))
    assert planner.plan(goal, set()).checkpoints == {BUILD0.id, BUILD1.id, "os-1", "os-3", "t-0"}
    assert planner.plan(Goal(manifest=CHAIN), set()).checkpoints == frozenset()
    with pytest.raises(UsageError, match="No checkpoints matched provided patterns"):
        planner.plan(Goal(manifest=CHAIN, checkpoints=("nothing*",)), set())


def test_a_cycle_of_references_is_an_error_naming_it() -> None:
    a = Pipeline(name="a", stages=(stage("a-0", "b-0"),))
    b = Pipeline(name="b", stages=(stage("b-0", "c-0"),))
    c = Pipeline(name="c", build="a-0", stages=(stage("c-0"),))
    with pytest.raises(UsageError, match=r"needs pipeline a-0, which needs it in turn \(a -> b -> c -> a\)"):
        planner.plan(Goal(manifest=manifest(a, b, c)), set())
    # with one of them stored, nothing in the cycle is built past it, and the plan holds
    plan = planner.plan(Goal(manifest=manifest(a, b, c)), {"c-0"})
    assert steps(plan) == {"b": (0, set()), "a": (0, {"b"})}


def test_a_reference_neither_in_the_manifest_nor_in_the_store_is_an_error() -> None:
    lone = pipeline("lone", 2, build="f" * 64)
    with pytest.raises(UsageError, match=f"pipeline 'lone' needs pipeline {'f' * 64}, which is neither in "
                                         "the manifest nor in the store"):
        planner.plan(Goal(manifest=manifest(lone)), set())
    plan = planner.plan(Goal(manifest=manifest(lone)), {"f" * 64})  # only the store has it: used as stored
    assert steps(plan) == {"lone": (0, set())}
    assert plan.external == {"f" * 64}
    assert plan.relies_on == {"f" * 64}


def test_an_empty_pipeline_is_never_built_and_can_be_exported() -> None:
    empty = Pipeline(name="empty")
    plan = planner.plan(Goal(manifest=manifest(empty, BUILD0), exports=("empty",)), set())
    assert (plan.build, names(plan.unused), plan.exports) == ((), ["empty", "build0"], (("empty", empty),))


def test_targets_are_built_besides_the_exports_without_being_exported() -> None:
    plan = planner.plan(Goal(manifest=CHAIN, exports=("build1",), targets=("image",)), {str(OS.id)})
    assert steps(plan) == {"build0": (0, set()), "build1": (0, {"build0"}), "image": (0, {"build1"})}
    assert plan.exports == (("build1", BUILD1),)
    assert names(plan.cached) == ["os"]
    with pytest.raises(UsageError, match="Pipeline nope not found"):
        planner.plan(Goal(manifest=CHAIN, targets=("nope",)), set())


# -- pinning ---------------------------------------------------------------------------------------------


class FakePins:
    """Pins what `holds` has: `try_pin` of anything else fails, as for an entry evicted or being written."""

    def __init__(self, holds: set[str]) -> None:
        self.holds = holds
        self.pinned: set[str] = set()
        self.tried: list[str] = []

    def try_pin(self, object_id: str) -> bool:
        self.tried.append(object_id)
        if object_id in self.holds:
            self.pinned.add(object_id)
        return object_id in self.holds


def test_pinning_pins_what_the_plan_relies_on() -> None:
    stored = ids(OS, 2) | {str(BUILD1.id)}
    first = planner.plan(Goal(manifest=CHAIN, exports=("os",)), stored)
    pins = FakePins(set(stored))
    assert planner.pin(first, pins, stored) is first
    assert pins.pinned == first.relies_on == stored


def test_an_entry_lost_between_planning_and_pinning_is_planned_again_as_a_miss() -> None:
    stored = ids(OS, 1, 3) | {str(BUILD1.id), str(BUILD0.id)}
    first = planner.plan(Goal(manifest=CHAIN, exports=("os",)), stored)
    assert steps(first) == {"os": (4, set())}
    # meanwhile another build evicted os-3 and build1
    pins = FakePins(stored - {OS.stages[3].id, str(BUILD1.id)})
    pinned = planner.pin(first, pins, stored)
    assert steps(pinned) == {"build1": (0, set()), "os": (2, {"build1"})}
    assert names(pinned.cached) == ["build0"]
    assert pinned.relies_on <= pins.pinned
    assert pins.tried.count(OS.stages[3].id) == 1  # a lost entry is not tried again


TREE = pipeline("tree", 4)


@pytest.fixture
async def real_store(workdir: Path) -> Store:
    """A store with tree-0, tree-1 over it and tree-2 over both, committed as a build commits layers."""
    store = Store.open(workdir / "store", use=False)
    below: list[str] = []
    for stage_ in TREE.stages[:3]:
        async with store.store(stage_.id, layers=below) as entry:
            (entry.tree / stage_.id).write_text("made")
        below.append(stage_.id)
    return store


async def test_pinning_a_real_store_re_checks_each_entry_under_its_lock(real_store: Store) -> None:
    stored = planner.Predicate(real_store.contains)
    first = planner.plan(Goal(manifest=manifest(TREE)), stored)
    assert steps(first) == {"tree": (3, set())}

    # tree-2 is being evicted by another build right now (it holds the write lock): a miss
    evicting = store_entries.take_for_eviction(real_store.objects, "tree-2")
    assert evicting is not None
    with closing(evicting):
        async with aclosing(Pins(real_store)) as pins:
            assert steps(planner.pin(first, pins, stored)) == {"tree": (2, set())}
            assert ("tree-1" in pins, "tree-2" in pins) == (True, False)

    # tree-1, a layer below tree-2, was evicted since planning: neither can be read; from tree-0
    lock = store_entries.take_for_eviction(real_store.objects, "tree-1")
    assert lock is not None
    store_entries.remove(store_entries.move_out(real_store.objects, "tree-1", real_store.staging, lock))
    assert real_store.contains("tree-2")
    async with aclosing(Pins(real_store)) as pins:
        assert steps(planner.pin(first, pins, stored)) == {"tree": (1, set())}
        assert ("tree-0" in pins, "tree-2" in pins) == (True, False)


# -- scheduling ------------------------------------------------------------------------------------------


class FakeBuilds:
    """A build function whose builds each wait for the test to finish (or fail) them; records events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.gates: dict[str, anyio.Event] = {}
        self.failing: set[str] = set()

    def gate(self, name: str) -> anyio.Event:
        return self.gates.setdefault(name, anyio.Event())

    def running(self) -> set[str]:
        started = {n for e, n in self.events if e == "start"}
        return started - {n for e, n in self.events if e != "start"}

    async def __call__(self, step: Step) -> None:
        name = step.pipeline.name
        self.events.append(("start", name))
        try:
            await self.gate(name).wait()
        except anyio.get_cancelled_exc_class():
            self.events.append(("cancelled", name))
            raise
        if name in self.failing:
            self.events.append(("failed", name))
            raise RuntimeError(f"{name} failed")
        self.events.append(("done", name))


def diamond() -> Plan:
    left = pipeline("left", 2, build=BUILD0)
    right = pipeline("right", 2, build=BUILD0)
    top = pipeline("top", 1, reads={0: [left, right]})
    return planner.plan(Goal(manifest=manifest(BUILD0, left, right, top)), set())


async def test_the_scheduler_runs_what_is_ready_at_once_and_holds_the_rest() -> None:
    builds = FakeBuilds()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_steps(diamond().build, builds, jobs=4))
        await wait_all_tasks_blocked()
        assert builds.running() == {"build0"}       # the others wait for their build root
        builds.gate("build0").set()
        await wait_all_tasks_blocked()
        assert builds.running() == {"left", "right"}  # independent: in parallel
        builds.gate("left").set()
        await wait_all_tasks_blocked()
        assert builds.running() == {"right"}         # top waits for both of its inputs
        builds.gate("right").set()
        await wait_all_tasks_blocked()
        assert builds.running() == {"top"}
        builds.gate("top").set()
    assert [n for e, n in builds.events if e == "done"][-1] == "top"


async def test_the_scheduler_runs_at_most_jobs_builds_at_once() -> None:
    builds = FakeBuilds()
    plan = planner.plan(Goal(manifest=manifest(*(pipeline(f"p{i}", 1) for i in range(5)))), set())
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_steps(plan.build, builds, jobs=2))
        for _ in range(3):
            await wait_all_tasks_blocked()
            assert len(builds.running()) == 2
            builds.gate(sorted(builds.running())[0]).set()
        await wait_all_tasks_blocked()
        assert len(builds.running()) == 2
        for name in [p.name for p in plan.goal.manifest.pipelines]:
            builds.gate(name).set()
    assert sorted(n for e, n in builds.events if e == "done") == ["p0", "p1", "p2", "p3", "p4"]


async def test_a_failure_cancels_the_running_builds_and_starts_no_other() -> None:
    builds = FakeBuilds()
    builds.failing.add("left")

    async def build_and_fail_left() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: run_steps(diamond().build, builds, jobs=4))
            await wait_all_tasks_blocked()
            builds.gate("build0").set()
            await wait_all_tasks_blocked()
            builds.gate("left").set()

    with pytest.raises(ExceptionGroup) as raised:
        await build_and_fail_left()
    assert [str(e) for e in flatten(raised.value)] == ["left failed"]
    # the failure first, then the sibling that was running is cancelled; top, which waited, never starts
    assert builds.events[-2:] == [("failed", "left"), ("cancelled", "right")]
    assert ("start", "top") not in builds.events


# -- properties over random manifests --------------------------------------------------------------------


@st.composite
def random_builds(draw: st.DrawFn) -> tuple[Manifest, frozenset[str], tuple[str, ...]]:
    """A random DAG of pipelines (build roots and tree inputs on earlier ones), a random subset of its
    stages stored, and random exports."""
    made: list[Pipeline] = []
    for i in range(draw(st.integers(1, 8))):
        earlier = [p for p in made if p.id is not None]
        pick = st.sampled_from(earlier) if earlier else st.nothing()
        build = draw(st.none() | pick) if earlier else None
        reads: dict[int, Sequence[Pipeline | str]] = {}
        for j in range(draw(st.integers(0, 4))):
            reads[j] = draw(st.lists(pick, max_size=2, unique_by=id)) if earlier else []
        made.append(pipeline(f"p{i}", len(reads), build=build, reads=reads))
    all_ids = sorted(s.id for p in made for s in p.stages)
    stored = draw(st.frozensets(st.sampled_from(all_ids))) if all_ids else frozenset()
    exports = draw(st.lists(st.sampled_from([p.name for p in made]), max_size=3, unique=True))
    return manifest(*made), stored, tuple(exports)


@settings(max_examples=300, deadline=None)
@given(random_builds())
def test_plans_of_random_dags_are_ordered_minimal_and_consistent_with_the_store(
        case: tuple[Manifest, frozenset[str], tuple[str, ...]]) -> None:
    graph, stored, exports = case
    plan = planner.plan(Goal(manifest=graph, exports=exports[:1], targets=exports[1:]), stored)
    built: dict[str, Step] = {}
    cached = {str(p.id) for p in plan.cached}
    for step in plan.build:
        stages = step.pipeline.stages
        assert step.waits_for <= built.keys()  # every pipeline after those it waits for
        assert step.level == 1 + max((built[d].level for d in step.waits_for), default=-1)
        # resumed after its newest stored stage, and none of the stages it runs is stored
        assert step.resume == 0 or stages[step.resume - 1].id in stored
        assert not any(s.id in stored for s in stages[step.resume:])
        assert step.needs == step.pipeline.dependencies(after=step.resume)
        assert step.needs <= built.keys() | cached | plan.external
        assert step.waits_for == step.needs & built.keys()
        built[step.id] = step
    assert cached | plan.external | plan.relies_on <= stored
    targets = [p for p in graph.pipelines if p.name in exports] if exports else list(graph.pipelines)
    assert {str(p.id) for p in targets if p.id is not None} <= built.keys() | cached
    # nothing built that no target needs
    needed = {str(p.id) for p in targets} | {d for s in plan.build for d in s.needs}
    assert built.keys() <= needed
    # every pipeline of the manifest is built, reported from the store, or unused
    parts = [*(s.pipeline.name for s in plan.build), *names(plan.cached), *names(plan.unused)]
    assert sorted(parts) == sorted(names(graph.pipelines))


@settings(max_examples=200, deadline=None)
@given(random_builds(), st.data())
def test_pinning_after_random_losses_gives_the_plan_of_what_is_left(
        case: tuple[Manifest, frozenset[str], tuple[str, ...]], data: st.DataObject) -> None:
    graph, stored, exports = case
    goal = Goal(manifest=graph, exports=exports)
    first = planner.plan(goal, stored)
    lost = data.draw(st.frozensets(st.sampled_from(sorted(stored)))) if stored else frozenset()
    pins = FakePins(set(stored - lost))
    pinned = planner.pin(first, pins, stored)
    assert pinned.relies_on <= pins.pinned
    # the plan that holds is one the planner makes with no more than what survived
    survived = stored - (set(pins.tried) - pins.pinned)
    assert pinned == planner.plan(goal, survived)


@settings(max_examples=100, deadline=None)
@given(random_builds(), st.integers(1, 3), st.sampled_from(["trio", "asyncio"]))
def test_the_scheduler_builds_each_step_once_after_what_it_waits_for(
        case: tuple[Manifest, frozenset[str], tuple[str, ...]], jobs: int, backend: str) -> None:
    graph, stored, exports = case
    plan = planner.plan(Goal(manifest=graph, exports=exports), stored)
    finished: list[str] = []
    running: set[str] = set()
    most = 0

    async def build(step: Step) -> None:
        nonlocal most
        assert step.waits_for <= set(finished)
        running.add(step.id)
        most = max(most, len(running))
        await anyio.lowlevel.checkpoint()  # let others start meanwhile, if they may
        await anyio.lowlevel.checkpoint()
        running.discard(step.id)
        finished.append(step.id)

    anyio.run(lambda: run_steps(plan.build, build, jobs=jobs), backend=backend)
    assert sorted(finished) == sorted(s.id for s in plan.build)
    assert most <= jobs


# -- purity ----------------------------------------------------------------------------------------------


def test_the_planner_imports_nothing_that_does_io_locks_or_async() -> None:
    source = Path(planner.__file__)
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported == {"__future__", "fnmatch", "collections.abc", "dataclasses", "typing", ".errors",
                        ".manifest"}
