"""Dispatch scenario: N independent sleep-bound pipelines built by 1, 2 and 3 Dask workers (`aosbuild
worker`, one slot each, stores of their own) against a local build, and the dispatch overhead per pipeline.

The cluster is the tests' (tests/daskcluster.py: `dask scheduler` and workers as separate processes on
127.0.0.1, the registry of tests/registry.py). Every build has manifest ids of its own, so nothing comes
from a worker's store or the remote cache. The overhead is a dispatched build of N pipelines whose stage
does nothing, less the same local build, over N: submission, a worker's engine start-up, pulls, pushes
and the replay of events, for a pipeline of one stage.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from common import BENCH_ENV, FAST_TMP, REPO, TEST_LIBDIR, Section, Summary, repeat, summarise, timed_ms

sys.path.insert(0, os.fspath(REPO))
from tests.daskcluster import Cluster, run_cluster  # the tests' cluster, not a copy of it
from tests.registry import run_registry

PIPELINES = 6
SLEEP_SECONDS = 2.0
WORKER_COUNTS = (1, 2, 3)


def manifest(root: Path, seconds: float) -> Path:
    nonce = uuid.uuid4().hex
    content: dict[str, Any] = {"version": "2", "pipelines": [
        {"name": f"sleep-{i}", "stages": [{"type": "org.aosbuild.test.sleep",
                                           "options": {"seconds": seconds, "marker": f"{nonce}-{i}"}}]}
        for i in range(PIPELINES)]}
    path = root / f"m-{nonce}.json"
    path.write_text(json.dumps(content))
    return path


def build_ms(root: Path, path: Path, *args: str, env: dict[str, str] | None = None) -> float:
    store = root / f"store-{uuid.uuid4().hex}"
    return timed_ms([sys.executable, "-m", "aosbuild", "--libdir", os.fspath(TEST_LIBDIR), "--store",
                     os.fspath(store), "-q", *args, os.fspath(path)], env=env)


def dispatched_ms(root: Path, cluster: Cluster, seconds: float) -> float:
    return build_ms(root, manifest(root, seconds), "--dispatch", cluster.address, "--cache-remote", cluster.remote,
                    env={**BENCH_ENV, "REGISTRY_AUTH_FILE": cluster.env["REGISTRY_AUTH_FILE"]})


def run(root: Path, times: int, quick: bool) -> Section:
    with tempfile.TemporaryDirectory(dir=FAST_TMP, prefix="bench-dispatch-") as d, \
            run_registry(Path(d) / "registry") as registry:
        work = Path(d)
        raw: dict[str, list[float]] = {}
        local = repeat(times, lambda: {"local_jobs1_ms": build_ms(work, manifest(work, SLEEP_SECONDS), "--jobs", "1"),
                                       "local_ms": build_ms(work, manifest(work, SLEEP_SECONDS)),
                                       "local_zero_ms": build_ms(work, manifest(work, 0))})
        raw.update(local)
        for count in WORKER_COUNTS:
            with run_cluster(work / f"cluster-{count}", registry, workers=count) as cluster:
                dispatched_ms(work, cluster, 0)  # untimed: the workers' first build pays for imports
                raw.update(repeat(times, lambda cluster=cluster, count=count: {  # type: ignore[misc]
                    f"workers{count}_ms": dispatched_ms(work, cluster, SLEEP_SECONDS),
                    f"workers{count}_zero_ms": dispatched_ms(work, cluster, 0)}))
    s = summarise(raw)
    overhead = {n: (s[f"workers{n}_zero_ms"].median - s["local_zero_ms"].median) / PIPELINES
                for n in WORKER_COUNTS}
    table = [f"{PIPELINES} independent pipelines, one `sleep {SLEEP_SECONDS:g}` stage each; workers of one slot "
             "each, on this one machine (they share its CPUs)", "",
             "| built by | wall s (min-max) | ideal s | overhead per pipeline ms (0 s stages, vs local) |",
             "|---|---|---|---|",
             f"| local, `--jobs 1` | {sec(s['local_jobs1_ms'])} | {PIPELINES * SLEEP_SECONDS:.1f} | |",
             f"| local, default jobs | {sec(s['local_ms'])} | {-(-PIPELINES // 4) * SLEEP_SECONDS:.1f} | |"]
    for n in WORKER_COUNTS:
        table.append(f"| {n} worker{'s' if n > 1 else ''} | {sec(s[f'workers{n}_ms'])} | "
                     f"{-(-PIPELINES // n) * SLEEP_SECONDS:.1f} | {overhead[n]:.0f} |")
    return Section(name="dispatch", samples=raw, table=table,
                   headline={"workers3_s": s["workers3_ms"].median / 1000, "overhead_per_pipeline_ms": overhead[3]},
                   settings={"pipelines": PIPELINES, "sleep_seconds": SLEEP_SECONDS,
                             "worker_counts": list(WORKER_COUNTS), "slots_per_worker": 1})


def sec(summary: Summary) -> str:
    return Summary(median=summary.median / 1000, min=summary.min / 1000, max=summary.max / 1000).cell(2)
