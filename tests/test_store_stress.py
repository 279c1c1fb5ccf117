"""Many builds on one store at once, and builds killed with SIGKILL: the store stays consistent."""

from __future__ import annotations

import hashlib
import json
import random
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aosbuild.store import Store
from aosbuild.store.entries import list_committed

from .conftest import Aosbuild, Run, check_jsonseq, manifest, merged_copy, pipeline, stage
from .leftovers import loops_backed_by, processes_mentioning, stray_mounts
from .test_build import leftovers
from .test_devices import disk_manifest

WORKERS = 8
TREES = 10


def files(seed: str, count: int = 3, size: int = 16 * 1024, **options: Any) -> dict[str, Any]:
    return stage("org.aosbuild.test.files", seed=seed, count=count, size=size, **options)


def content(seed: str, index: int, size: int) -> bytes:
    """What org.aosbuild.test.files writes into `<seed>-<index>`."""
    unit = hashlib.sha256(f"{seed}:{index}".encode()).hexdigest().encode()
    return (unit * (size // len(unit) + 1))[:size]


class Trees:
    """What every entry a manifest can make must contain, by stage id, to check committed trees."""

    def __init__(self, aosbuild: Aosbuild, universe: dict[str, Any]) -> None:
        described = json.loads(aosbuild(universe, "--inspect").stdout)
        self.expected: dict[str, dict[str, bytes]] = {}
        self.prefixes: dict[str, list[str]] = {}
        self.verified: set[tuple[str, float]] = set()  # (id, created): an entry is checked once
        for source, pipe in zip(universe["pipelines"], described["pipelines"], strict=True):
            tree: dict[str, bytes] = {}
            ids: list[str] = []
            for options, described_stage in zip((s["options"] for s in source["stages"]), pipe["stages"],
                                                strict=True):
                for i in range(options.get("count", 1)):
                    tree[f"{options['seed']}-{i}"] = content(options["seed"], i, options.get("size", 4096))
                ids.append(described_stage["id"])
                self.expected[described_stage["id"]] = dict(tree)
                self.prefixes[described_stage["id"]] = list(ids)

    def add(self, other: Trees) -> None:
        self.expected.update(other.expected)
        self.prefixes.update(other.prefixes)

    def check(self, store: Path, *, known_only: bool = False) -> int:
        """Check every committed entry (read-locked while it is read); returns how many were checked.
        With `known_only`, entries of other manifests are left alone rather than an error."""
        checked = 0
        reader = Store(store)
        for committed in list_committed(store / "objects"):
            if (committed.id, committed.created) in self.verified:
                continue
            entry = reader.try_load(committed.id)
            if entry is None:
                continue  # being evicted or committed right now
            below = [reader.try_load(i) for i in entry.layers]  # read-locked too, while they are merged
            try:
                if known_only and committed.id not in self.expected:
                    continue
                if any(layer is None for layer in below):
                    continue  # a layer below is gone: a miss for every build, never read
                assert committed.id in self.expected, f"an entry nobody asked for: {committed.id}"
                with tempfile.TemporaryDirectory(dir=store.parent) as scratch:
                    merged = merged_copy(store, committed.id, Path(scratch, "tree"))
                    found = {p.name: p.read_bytes() for p in merged.iterdir()}
                assert found == self.expected[committed.id], f"entry {committed.id} is not what it should be"
                assert [r["id"] for r in entry.results] == self.prefixes[committed.id]
                info = json.loads((entry.path / "object.info").read_text())
                assert info["size"] > 0
                self.verified.add((committed.id, info["created"]))
                checked += 1
            finally:
                entry.close()
                for layer in below:
                    if layer is not None:
                        layer.close()
        return checked


@dataclass
class Workload:
    """Builds of random manifests, one after another, in each of `WORKERS` threads."""

    aosbuild: Aosbuild
    pool: list[dict[str, Any]]
    runs: list[Run] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def worker(self, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            chosen = {p["name"]: p for p in rng.sample(self.pool, 2)}
            # a pipeline that reads t<i> needs t<i> in its manifest, before it
            needed = {f"t{name[1:]}" for name in chosen if name.startswith("r")}
            m = manifest(*(p for p in self.pool if p["name"] in needed or p["name"] in chosen))
            path = self.aosbuild.write_manifest(m, f"m-{seed}-{time.monotonic_ns()}.json")
            run = self.aosbuild(path, "--monitor", "jsonseq", timeout=120)
            with self.lock:
                self.runs.append(run)

    def run(self, seconds: float, trees: Trees) -> int:
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self.worker, args=(i, deadline)) for i in range(WORKERS)]
        for thread in threads:
            thread.start()
        checked = 0
        while alive := [t for t in threads if t.is_alive()]:
            checked += trees.check(self.aosbuild.store)  # while the builds run, too
            alive[0].join(0.2)  # and leave the CPUs to them in between
        return checked + trees.check(self.aosbuild.store)


def stress_pool(generation: str) -> list[dict[str, Any]]:
    """Overlapping pipelines: ten trees of two stages, and pipelines that read one of them."""
    pool = [pipeline(f"t{i}", files(f"{generation}t{i}a"), files(f"{generation}t{i}b", pause=0.05))
            for i in range(TREES)]
    for i in range(TREES):
        reads = {"t": {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": [f"name:t{i}"]}}
        pool.append(pipeline(f"r{i}", pool[i]["stages"][0], pool[i]["stages"][1],
                             {"type": "org.aosbuild.test.files", "inputs": reads,
                              "options": {"seed": f"{generation}r{i}", "count": 2, "size": 8192}}))
    return pool


def outcomes(runs: list[Run]) -> tuple[Counter[str], Counter[str]]:
    """How often each pipeline id was built, and how often a build of it lost the race to store it."""
    built: Counter[str] = Counter()
    discarded: Counter[str] = Counter()
    for run in runs:
        contexts: dict[str, dict[str, Any]] = {}
        for record in run.jsonseq():
            context = record["context"]
            if "origin" in context:
                contexts[context["id"]] = context
            message = str(record.get("message", ""))
            if message.startswith("Starting pipeline") and not message.startswith("Starting pipeline source"):
                built[contexts[context["id"]]["pipeline"]["id"]] += 1
            lost = re.search(r"another build stored pipeline \S+ \((\w+)\) first", message)
            if lost:
                discarded[lost.group(1)] += 1
    return built, discarded


def limit(aosbuild: Aosbuild, size: str) -> None:
    subprocess.run([*aosbuild.command(manifest())[:3], "store", "limit", "--cache-max-size", size,
                    "--store", str(aosbuild.store)], check=True, capture_output=True)


@pytest.mark.slow
def test_eight_builds_at_once_on_one_store(aosbuild: Aosbuild) -> None:
    first, second = stress_pool("a"), stress_pool("b")
    trees = Trees(aosbuild, manifest(*first))
    trees.add(Trees(aosbuild, manifest(*second)))
    work = Workload(aosbuild, first)
    limit(aosbuild, "unlimited")

    # unbounded: every tree is stored exactly once; a build that loses the race discards its copy
    checked = work.run(16, trees)
    runs = list(work.runs)
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert "Traceback" not in run.stderr
    check_jsonseq(runs[-1].stdout)
    built, discarded = outcomes(runs)
    assert built, "nothing was built"
    for pipeline_id, count in built.items():
        assert count - discarded[pipeline_id] == 1, f"{pipeline_id} stored {count - discarded[pipeline_id]} times"
    assert leftovers(aosbuild.store) == []
    assert checked >= len(built)

    # bounded to a third of what was stored, and new trees: eviction all the time, and no build fails
    objects = aosbuild.store / "objects"
    bound = sum(c.size for c in list_committed(objects)) // 3
    limit(aosbuild, str(bound))
    assert sum(c.size for c in list_committed(objects)) <= bound  # a lower bound prunes at once
    work = Workload(aosbuild, second)
    checked = work.run(16, trees)
    for run in work.runs:
        assert run.returncode == 0, run.stderr
        assert "Traceback" not in run.stderr
    assert len(work.runs) >= WORKERS
    assert sum(c.size for c in list_committed(objects)) <= bound
    assert leftovers(aosbuild.store) == []
    assert checked > 0


def crash_manifest(variant: int) -> dict[str, Any]:
    """Loop devices, mounts, a source, checkpoints and slow stages; `variant` makes some of it new."""
    m = disk_manifest(stage("org.aosbuild.test.sleep", seconds=0.2, marker=f"v{variant}"))
    m["pipelines"].append(pipeline(f"files{variant}", files(f"f{variant}a"), files(f"f{variant}b", pause=0.1),
                                   files(f"f{variant}c")))
    m["pipelines"].append(pipeline("shared", files("shared", pause=0.1), files("shared2")))
    return m


@pytest.mark.slow
def test_kill_9_at_random_moments(aosbuild: Aosbuild) -> None:
    rng = random.Random(9)
    checked = Trees(aosbuild, manifest(*{p["name"]: p for v in range(4) for p in crash_manifest(v)["pipelines"]
                                         if p["name"].startswith(("files", "shared"))}.values()))
    reference = Aosbuild(aosbuild.workdir / "reference")
    reference.workdir.mkdir()
    records = len(reference(crash_manifest(0), "--monitor", "jsonseq").jsonseq())
    for attempt in range(20):
        m = crash_manifest(attempt % 4)
        kill_after = rng.randrange(1, records)
        with subprocess.Popen(aosbuild.command(m, "--monitor", "jsonseq"), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, cwd=aosbuild.workdir) as proc:
            assert proc.stdout is not None
            for _ in range(kill_after):
                if not proc.stdout.readline():
                    break
            proc.send_signal(signal.SIGKILL)
        after = aosbuild(m, "--monitor", "jsonseq")
        assert after.returncode == 0, f"attempt {attempt}, killed after record {kill_after}: {after.stderr}"
        check_jsonseq(after.stdout)
        assert leftovers(aosbuild.store) == [], f"attempt {attempt}"
        assert [str(m) for m in stray_mounts(aosbuild.workdir)] == []
        assert loops_backed_by(aosbuild.workdir) == []
        checked.check(aosbuild.store, known_only=True)
    assert processes_mentioning(str(aosbuild.workdir)) == []
