"""Benchmark aosbuild against its floor: per-stage overhead next to bare bwrap, and pipeline concurrency.

Run with the venv's interpreter from anywhere: `.venv/bin/python bench/run.py [--repeat N] [--quick]`.
Prints a Markdown table and writes the raw timings to `bench/results/<UTC timestamp>.json`.
Standard library only, so it measures aosbuild and nothing this script pulls in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
TEST_LIBDIR = REPO / "tests" / "lib"
# the root disk is slow at creating files; stores on it would measure the disk, not aosbuild
FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

NOOP_STAGES = 20
SLEEP_SECONDS = 1.0
PIPELINE_COUNTS = (1, 2, 4, 8)
QUICK_PIPELINE_COUNTS = (1, 2)
# what `--jobs` defaults to in aosbuild's CLI; recorded so the table says what "default" meant
DEFAULT_JOBS = max(4, os.cpu_count() or 1)
# the cheapest sandbox with the same namespaces a stage gets: the floor any sandboxed stage pays
BWRAP_ARGV = ["bwrap", "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
              "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
              "--proc", "/proc", "--dev", "/dev", "--unshare-pid", "--unshare-net",
              "--die-with-parent", "true"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """Median and spread of one measurement, in milliseconds."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Summary:
        return cls(median=statistics.median(samples_ms), min=min(samples_ms), max=max(samples_ms))

    def cell(self, digits: int = 1) -> str:
        return f"{self.median:.{digits}f} ({self.min:.{digits}f}-{self.max:.{digits}f})"


def timed_ms(argv: Sequence[str]) -> float:
    """Run one command to completion and return its wall time; a failure aborts: its time means nothing."""
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    elapsed = (time.perf_counter() - start) * 1000
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed with exit status {proc.returncode}: {' '.join(argv)}\n"
                         f"{proc.stderr}")
    return elapsed


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
        self._builds += 1
        store = self.root / f"store-{self._builds}"
        argv = [sys.executable, "-m", "aosbuild", "--store", os.fspath(store), "-q",
                *args, os.fspath(manifest)]
        try:
            return timed_ms(argv)
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
    start = time.perf_counter()
    for _ in range(count):
        subprocess.run(BWRAP_ARGV, check=True, capture_output=True)
    return (time.perf_counter() - start) * 1000


def repeat(times: int, sample: Callable[[], dict[str, float]]) -> dict[str, list[float]]:
    """Collect `times` samples, each a dict of interleaved measurements, so drift hits all of them alike."""
    runs = [sample() for _ in range(times)]
    return {key: [run[key] for run in runs] for key in runs[0]}


def measure_overhead(ws: Workspace, times: int) -> dict[str, list[float]]:
    """Scenario 1: startup, a 20-noop pipeline and 20 bare bwraps, each repetition measuring all three."""
    empty = ws.manifest("empty", {"version": "2"})
    noops = ws.manifest("noops", noop_manifest(NOOP_STAGES))

    def sample() -> dict[str, float]:
        startup = ws.build_ms(empty)
        pipeline = ws.build_ms(noops)
        bwrap = bwrap_series_ms(NOOP_STAGES)
        # derived per repetition, so the spread reflects how well the pair of runs agreed
        per_stage = (pipeline - startup) / NOOP_STAGES
        return {"startup_ms": startup, "pipeline_ms": pipeline, "bwrap_total_ms": bwrap,
                "aosbuild_per_stage_ms": per_stage, "bwrap_per_stage_ms": bwrap / NOOP_STAGES,
                "overhead_per_stage_ms": per_stage - bwrap / NOOP_STAGES}

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


def git(*args: str) -> str:
    """Git's output, or "" outside a checkout: a benchmark copied elsewhere should still run."""
    proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def machine() -> dict[str, Any]:
    """Where the numbers came from: they mean little without the commit and the hardware."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    # "dirty": uncommitted changes mean the commit alone does not say what was measured
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain")),
            "kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(), "default_jobs": DEFAULT_JOBS,
            "store_dir": FAST_TMP or tempfile.gettempdir()}


def overhead_table(raw: dict[str, list[float]]) -> list[str]:
    s = {key: Summary.of(values) for key, values in raw.items()}
    return [
        f"### Per-stage overhead ({NOOP_STAGES} `org.osbuild.noop` stages"
        f" vs {NOOP_STAGES} bare `bwrap ... true`)",
        "",
        "| measurement | median ms (min-max) |",
        "|---|---|",
        f"| aosbuild startup, empty manifest | {s['startup_ms'].cell()} |",
        f"| aosbuild, {NOOP_STAGES}-stage pipeline, total | {s['pipeline_ms'].cell()} |",
        f"| bare bwrap, {NOOP_STAGES} runs, total | {s['bwrap_total_ms'].cell()} |",
        f"| aosbuild per stage (total - startup) / {NOOP_STAGES} | {s['aosbuild_per_stage_ms'].cell()} |",
        f"| bare bwrap per run | {s['bwrap_per_stage_ms'].cell()} |",
        f"| **difference per stage** | **{s['overhead_per_stage_ms'].cell()}** |",
    ]


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


def write_results(report: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{report['started']}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=None, metavar="N",
                        help="repetitions of each scenario (default: 5, or 2 with --quick)")
    parser.add_argument("--concurrency-repeat", type=int, default=None, metavar="N",
                        help="repetitions of the concurrency scenario (default: same as --repeat)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2 repetitions and only N = "
                        + ", ".join(map(str, QUICK_PIPELINE_COUNTS)))
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 2 if args.quick else 5
    if args.concurrency_repeat is None:
        args.concurrency_repeat = args.repeat
    if args.repeat < 1 or args.concurrency_repeat < 1:
        parser.error("repetitions must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = QUICK_PIPELINE_COUNTS if args.quick else PIPELINE_COUNTS
    started = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=FAST_TMP, prefix="aosbuild-bench-") as tmp:
        ws = Workspace(Path(tmp))
        warm_up(ws)
        overhead = measure_overhead(ws, args.repeat)
        concurrency = measure_concurrency(ws, args.concurrency_repeat, counts)
    info = machine()
    lines = [f"Machine: {info['cpu_model']}, {info['cpus']} CPUs, kernel {info['kernel']}, "
             f"commit {(info['commit'] or 'unknown')[:12]}{' (dirty)' if info['dirty'] else ''}; "
             f"{args.repeat} repetitions (concurrency: {args.concurrency_repeat}); median (min-max).",
             "", *overhead_table(overhead), "", *concurrency_table(concurrency, counts)]
    print("\n".join(lines))
    report = {"started": started, "machine": info, "duration_s": round(time.perf_counter() - clock, 1),
              "settings": {"repeat": args.repeat, "concurrency_repeat": args.concurrency_repeat,
                           "noop_stages": NOOP_STAGES, "sleep_seconds": SLEEP_SECONDS,
                           "pipeline_counts": list(counts), "bwrap_argv": BWRAP_ARGV},
              "overhead": {"samples_ms": overhead,
                           "summary_ms": {k: asdict(Summary.of(v)) for k, v in overhead.items()}},
              "concurrency": {"samples_ms": concurrency,
                              "summary_ms": {k: asdict(Summary.of(v)) for k, v in concurrency.items()}}}
    print(f"\nraw results: {write_results(report).relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
