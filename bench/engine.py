"""Engine scenarios: per-stage overhead next to bare bwrap, and pipeline concurrency against `--jobs 1`."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import DEFAULT_JOBS, TEST_LIBDIR, Section, Summary, repeat, summarise, summary_table, timed_cpu_ms

NOOP_STAGES = 20
SLEEP_SECONDS = 1.0
PIPELINE_COUNTS = (1, 2, 4, 8)
QUICK_PIPELINE_COUNTS = (1, 2)
# the cheapest sandbox with the namespaces a stage gets, running the cheapest Python: the floor of a
# sandboxed Python stage
BWRAP_ARGV = ["bwrap", "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
              "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
              "--proc", "/proc", "--dev", "/dev", "--unshare-ipc", "--unshare-pid", "--unshare-net",
              "--unshare-uts", "--die-with-parent", "--new-session", "python3", "-S", "-c", "pass"]


class Workspace:
    """A temp dir on tmpfs for manifests and one fresh store per build, so no build ever hits the cache."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._builds = 0

    def manifest(self, name: str, content: dict[str, Any]) -> Path:
        path = self.root / f"{name}.json"
        path.write_text(json.dumps(content))
        return path

    def build_ms(self, manifest: Path, *args: str) -> float:
        """Time one aosbuild run on an empty store; the store is removed afterwards, outside the timing."""
        return self.build_cpu_ms(manifest, *args)[0]

    def build_cpu_ms(self, manifest: Path, *args: str) -> tuple[float, float]:
        """`build_ms`, and the CPU time of the whole run (`timed_cpu_ms`)."""
        self._builds += 1
        store = self.root / f"store-{self._builds}"
        argv = [sys.executable, "-m", "aosbuild", "--store", os.fspath(store), "-q",
                *args, os.fspath(manifest)]
        try:
            return timed_cpu_ms(argv)
        finally:
            shutil.rmtree(store, ignore_errors=True)


def noop_manifest(stages: int) -> dict[str, Any]:
    return {"version": "2", "pipelines": [
        {"name": "noop", "stages": [{"type": "org.osbuild.noop", "options": {}} for _ in range(stages)]}]}


def sleep_manifest(pipelines: int, seconds: float) -> dict[str, Any]:
    """Independent one-stage pipelines; each marker differs, else equal ids would make aosbuild build one."""
    return {"version": "2", "pipelines": [
        {"name": f"sleep-{i}",
         "stages": [{"type": "org.aosbuild.test.sleep", "options": {"seconds": seconds, "marker": f"m{i}"}}]}
        for i in range(pipelines)]}


def bwrap_series_ms(count: int) -> float:
    """`count` bare sandboxes one after another, timed as a whole, as aosbuild runs a pipeline's stages."""
    return bwrap_series_cpu_ms(count)[0]


def bwrap_series_cpu_ms(count: int) -> tuple[float, float]:
    """`bwrap_series_ms`, and the CPU time of all of them (`timed_cpu_ms`: one shell runs them)."""
    return timed_cpu_ms(["sh", "-c", " && ".join([shlex.join(BWRAP_ARGV)] * count)])


def measure_overhead(ws: Workspace, times: int) -> dict[str, list[float]]:
    """Scenario 1: startup, a 1-noop and a 20-noop pipeline and 20 bare bwraps, all in each repetition."""
    empty = ws.manifest("empty", {"version": "2"})
    one = ws.manifest("one", noop_manifest(1))
    noops = ws.manifest("noops", noop_manifest(NOOP_STAGES))

    def sample() -> dict[str, float]:
        startup = ws.build_ms(empty)
        single, single_cpu = ws.build_cpu_ms(one)
        pipeline, pipeline_cpu = ws.build_cpu_ms(noops)
        bwrap, bwrap_cpu = bwrap_series_cpu_ms(NOOP_STAGES)
        # derived per repetition, so the spread reflects how well the runs agreed; the 1-stage build
        # takes the fixed costs of building anything (the pipeline, its entry, the commit) out
        per_stage = (pipeline - single) / (NOOP_STAGES - 1)
        bare = bwrap / NOOP_STAGES
        cpu_per_stage = (pipeline_cpu - single_cpu) / (NOOP_STAGES - 1)
        bare_cpu = bwrap_cpu / NOOP_STAGES
        return {"startup_ms": startup, "one_stage_ms": single, "pipeline_ms": pipeline, "bwrap_total_ms": bwrap,
                "aosbuild_per_stage_ms": per_stage, "bwrap_per_stage_ms": bare,
                "overhead_per_stage_ms": per_stage - bare, "per_stage_ratio": per_stage / bare,
                "cpu_per_stage_ms": cpu_per_stage, "bwrap_cpu_per_run_ms": bare_cpu,
                "cpu_per_stage_ratio": cpu_per_stage / bare_cpu}

    return repeat(times, sample)


def measure_concurrency(ws: Workspace, times: int, counts: Sequence[int]) -> dict[str, list[float]]:
    """Scenario 2: N sleeping pipelines at --jobs 1 and at the default, measured in the same repetition."""
    libdir = ("--libdir", os.fspath(TEST_LIBDIR))
    manifests = {n: ws.manifest(f"sleep-{n}", sleep_manifest(n, SLEEP_SECONDS)) for n in counts}

    def sample() -> dict[str, float]:
        result: dict[str, float] = {}
        for n, path in manifests.items():
            result[f"n{n}_jobs1_ms"] = ws.build_ms(path, *libdir, "--jobs", "1")
            result[f"n{n}_default_ms"] = ws.build_ms(path, *libdir)
        return result

    return repeat(times, sample)


def warm_up(ws: Workspace) -> None:
    """One untimed run of each kind first: the first run pays for .pyc files and a cold page cache."""
    ws.build_ms(ws.manifest("warm", noop_manifest(1)))
    bwrap_series_ms(1)


def overhead_table(s: dict[str, Summary]) -> list[str]:
    lines = summary_table(
        f"### Per-stage overhead ({NOOP_STAGES} `org.osbuild.noop` stages vs {NOOP_STAGES} bare "
        "`bwrap ... python3 -S -c pass`)",
        "ms", [("aosbuild startup, empty manifest", s["startup_ms"]),
               ("aosbuild, 1-stage pipeline, total", s["one_stage_ms"]),
               (f"aosbuild, {NOOP_STAGES}-stage pipeline, total", s["pipeline_ms"]),
               (f"bare bwrap, {NOOP_STAGES} runs, total", s["bwrap_total_ms"]),
               (f"aosbuild per stage ({NOOP_STAGES}-stage - 1-stage) / {NOOP_STAGES - 1}", s["aosbuild_per_stage_ms"]),
               ("bare bwrap per run", s["bwrap_per_stage_ms"]),
               ("**difference per stage**", s["overhead_per_stage_ms"])])
    return [*lines, f"| **per stage / bare bwrap** | {s['per_stage_ratio'].cell(2)} (x) |",
            f"| CPU per stage ({NOOP_STAGES}-stage - 1-stage) / {NOOP_STAGES - 1}, every process | "
            f"{s['cpu_per_stage_ms'].cell()} |",
            f"| CPU per bare bwrap run | {s['bwrap_cpu_per_run_ms'].cell()} |",
            f"| **CPU per stage / bare bwrap** | {s['cpu_per_stage_ratio'].cell(2)} (x) |"]


def concurrency_table(raw: dict[str, list[float]], counts: Sequence[int]) -> list[str]:
    lines = [
        f"### Pipeline concurrency (N pipelines x one {SLEEP_SECONDS:g} s sleep stage)",
        "",
        f"| N | `--jobs 1` s (min-max) | default (`--jobs {DEFAULT_JOBS}`) s (min-max)"
        " | speed-up | ideal (sleep only) |",
        "|---|---|---|---|---|",
    ]
    for n in counts:
        one = Summary.of([ms / 1000 for ms in raw[f"n{n}_jobs1_ms"]])
        default = Summary.of([ms / 1000 for ms in raw[f"n{n}_default_ms"]])
        ideal = n / -(-n // DEFAULT_JOBS)  # N sleeps in ceil(N / jobs) waves
        lines.append(f"| {n} | {one.cell(2)} | {default.cell(2)} | "
                     f"{one.median / default.median:.2f}x | {ideal:.2f}x |")
    return lines


def overhead(root: Path, times: int, quick: bool) -> Section:
    ws = Workspace(root)
    warm_up(ws)
    raw = measure_overhead(ws, times)
    s = summarise(raw)
    return Section(name="overhead", samples=raw, table=overhead_table(s),
                   headline={"startup_ms": s["startup_ms"].median,
                             "overhead_per_stage_ms": s["overhead_per_stage_ms"].median,
                             "per_stage_ratio": s["per_stage_ratio"].median,
                             "cpu_per_stage_ratio": s["cpu_per_stage_ratio"].median},
                   settings={"noop_stages": NOOP_STAGES, "bwrap_argv": BWRAP_ARGV})


def concurrency(root: Path, times: int, quick: bool) -> Section:
    counts = QUICK_PIPELINE_COUNTS if quick else PIPELINE_COUNTS
    ws = Workspace(root)
    warm_up(ws)
    raw = measure_concurrency(ws, times, counts)
    n = counts[-1] if quick else 4
    speedup = Summary.of(raw[f"n{n}_jobs1_ms"]).median / Summary.of(raw[f"n{n}_default_ms"]).median
    return Section(name="concurrency", samples=raw, table=concurrency_table(raw, counts),
                   headline={f"speedup_n{n}": speedup},
                   settings={"sleep_seconds": SLEEP_SECONDS, "pipeline_counts": list(counts),
                             "default_jobs": DEFAULT_JOBS})
