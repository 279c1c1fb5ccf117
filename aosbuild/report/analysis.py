"""What a timeline says about the schedule: parallelism, waits, and the critical path through the DAG.

A stream has no dependencies in it. With the manifest they are the pipelines' build roots and input
references (and the sources whose items their stages read). Without it they are inferred from the timing
alone, conservatively: a pipeline may have waited for every pipeline that finished before it started. Every
real dependency is among those (a pipeline starts only after what it needs has finished), so an inferred
critical path is never shorter than the real one and the savings are never overstated; on a stream where
everything ran one after the other (osbuild) it is the whole build, and only `--manifest` can tell more.

The critical path is the longest chain of dependent pipelines, weighted by how long each ran: with
unbounded slots and the same pipeline durations, no schedule finishes sooner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from graphlib import TopologicalSorter

from ..manifest import Manifest
from .timeline import SOURCE_PREFIX, Timeline


@dataclass(frozen=True, slots=True, kw_only=True)
class Dag:
    edges: Mapping[str, tuple[str, ...]]  # pipeline name -> the names it waited for (among those that ran)
    inferred: bool
    how: str                              # one sentence: where the dependencies come from


@dataclass(frozen=True, slots=True, kw_only=True)
class Analysis:
    timeline: Timeline
    dag: Dag
    busy: float                      # the sum of the durations of the pipelines (and sources) that ran
    parallelism: float               # busy / wall
    span: float                      # from the first pipeline's start to the last one's end
    waits: Mapping[str, float]       # from the moment a pipeline could start (its dependencies done) to its start
    critical_path: tuple[str, ...]
    critical_length: float           # the sum of the durations along the critical path
    saving: float                    # span - critical_length: what a perfect scheduler could have saved
    not_in_stream: tuple[str, ...]   # pipelines of the manifest the stream never mentions

    @property
    def wall(self) -> float:
        return self.timeline.wall


@dataclass(frozen=True, slots=True)
class _Span:
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def _ran(timeline: Timeline) -> dict[str, _Span]:
    """The pipelines (and sources) that ran, by name."""
    return {p.name: _Span(p.start, p.end) for p in timeline.pipelines if p.start is not None and p.end is not None}


def manifest_dag(manifest: Manifest, timeline: Timeline, source: str) -> Dag:
    """Build roots, pipeline inputs and source items, for the pipelines that ran."""
    ran = _ran(timeline)
    owner = {checksum: SOURCE_PREFIX + s.type for s in manifest.sources for checksum in s.items}
    edges: dict[str, tuple[str, ...]] = {}
    contradicted = 0
    for pipeline in manifest.pipelines:
        run = ran.get(pipeline.name)
        if run is None:
            continue
        needs = {dep.name for dep in map(manifest.by_id, pipeline.dependencies()) if dep is not None}
        needs |= {owner[c] for stage in pipeline.stages for c in stage.source_refs() if c in owner}
        kept = []
        for name in sorted(needs & ran.keys()):
            # a dependency that ended after the pipeline started was not waited for: the pipeline resumed
            # after the stage that reads it, or (aosbuild) a stage waited for its source items inside
            if ran[name].end <= run.start:
                kept.append(name)
            else:
                contradicted += 1
        edges[pipeline.name] = tuple(kept)
    how = f"dependencies from the manifest {source} (build roots, pipeline inputs, source items)"
    names = {p.name: p.id for p in manifest.pipelines}
    unknown = [p.name for p in timeline.pipelines if p.kind == "pipeline" and p.name not in names]
    changed = [p.name for p in timeline.pipelines if p.name in names and p.id and p.id != names[p.name]]
    if unknown:
        how += f"; not in the manifest: {', '.join(unknown)}"
    if changed:
        how += f"; other ids than in the manifest (was it changed since?): {', '.join(changed)}"
    if contradicted:
        how += (f"; {contradicted} left out that the pipeline did not wait for before it started (aosbuild waits "
                "for source items in the stage that reads them; a resumed pipeline skips its stored stages' inputs)")
    return Dag(edges=edges, inferred=False, how=how)


def inferred_dag(timeline: Timeline) -> Dag:
    """Each pipeline may have waited for every one that finished before it started (reduced for display)."""
    ran = _ran(timeline)
    # ordered by (start, end, name) as well, so that pipelines of no duration at one instant make no cycle
    key = {name: (span.start, span.end, name) for name, span in ran.items()}
    before = {q: {p for p in ran if ran[p].end <= ran[q].start and key[p] < key[q]} for q in ran}
    # keep only the immediate predecessors: the chains, and so the critical path, stay the same
    edges = {q: tuple(sorted(p for p in preds if not any(p in before[r] for r in preds)))
             for q, preds in before.items()}
    how = ("dependencies inferred from the timing (no --manifest): a pipeline is assumed to have waited for "
           "every pipeline that finished before it started; this may lengthen the critical path, never shorten it")
    return Dag(edges=edges, inferred=True, how=how)


def analyse(timeline: Timeline, dag: Dag, manifest: Manifest | None = None) -> Analysis:
    ran = _ran(timeline)
    busy = sum(p.duration for p in ran.values())
    span = max(p.end for p in ran.values()) - min(p.start for p in ran.values()) if ran else 0.0
    longest: dict[str, float] = {}
    previous: dict[str, str | None] = {}
    waits: dict[str, float] = {}
    order = TopologicalSorter({name: dag.edges.get(name, ()) for name in ran}).static_order()
    for name in order:
        if name not in ran:
            continue
        run = ran[name]
        deps = [d for d in dag.edges.get(name, ()) if d in ran]
        ready = max((ran[d].end for d in deps), default=timeline.start)
        waits[name] = max(0.0, run.start - ready)
        # ties go to the dependency that finished last: the one the pipeline really waited for
        best = max(deps, key=lambda d: (longest[d], ran[d].end), default=None)
        longest[name] = run.duration + (longest[best] if best else 0.0)
        previous[name] = best
    path: list[str] = []
    node = max(longest, key=lambda n: (longest[n], ran[n].end), default=None)
    while node is not None:
        path.append(node)
        node = previous[node]
    critical_length = sum(ran[n].duration for n in path)
    mentioned = {p.name for p in timeline.pipelines}
    absent = tuple(p.name for p in manifest.pipelines if p.name not in mentioned) if manifest else ()
    return Analysis(timeline=timeline, dag=dag, busy=busy,
                    parallelism=busy / timeline.wall if timeline.wall > 0 else 0.0, span=span, waits=waits,
                    critical_path=tuple(reversed(path)), critical_length=critical_length,
                    saving=max(0.0, span - critical_length), not_in_stream=absent)
