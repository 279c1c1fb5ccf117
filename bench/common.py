"""What every benchmark scenario shares: timing a command, repetitions, summaries, the machine, sections.

Each scenario module (engine, store, downloads, debian) returns `Section`s; `suite.py` runs them, prints
their tables and writes them with the commit and the machine to bench/results/.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
TEST_LIBDIR = REPO / "tests" / "lib"
# the root disk is slow at creating files; stores on it would measure the disk, not aosbuild
FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
# what the benchmarked commands run with: this environment, but with bytecode written and used as an
# installed package has it (PYTHONDONTWRITEBYTECODE, set on these machines, made every run compile every
# module of aosbuild and osbuild again: about 0.1 s of each start)
BENCH_ENV = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
# what `--jobs` defaults to in aosbuild's CLI; recorded so the tables say what "default" meant
DEFAULT_JOBS = max(4, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """Median and spread of one measurement, in the unit of its samples."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        return cls(median=statistics.median(samples), min=min(samples), max=max(samples))

    def cell(self, digits: int = 1) -> str:
        return f"{self.median:.{digits}f} ({self.min:.{digits}f}-{self.max:.{digits}f})"


@dataclass(kw_only=True)
class Section:
    """One scenario's outcome: every sample, the table people read, and the few numbers the history follows."""

    name: str
    samples: dict[str, list[float]]
    table: list[str]
    headline: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def summaries(self) -> dict[str, Summary]:
        return summarise(self.samples)


def summarise(samples: dict[str, list[float]]) -> dict[str, Summary]:
    """Every measurement's median and spread, by the same keys."""
    return {key: Summary.of(values) for key, values in samples.items()}


def summary_table(title: str, unit: str, rows: Sequence[tuple[str, Summary]], digits: int = 1) -> list[str]:
    """A two-column Markdown table of medians with their min-max."""
    return [title, "", f"| measurement | median {unit} (min-max) |", "|---|---|",
            *(f"| {label} | {summary.cell(digits)} |" for label, summary in rows)]


def timed_ms(argv: Sequence[str], *, cwd: Path = REPO, env: dict[str, str] | None = None) -> float:
    """Run one command to completion and return its wall time; a failure aborts: its time means nothing."""
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=BENCH_ENV if env is None else env, capture_output=True, text=True,
                          check=False)
    elapsed = (time.perf_counter() - start) * 1000
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed with exit status {proc.returncode}: {' '.join(map(str, argv))}\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return elapsed


def timed_cpu_ms(argv: Sequence[str], *, cwd: Path = REPO, env: dict[str, str] | None = None) -> tuple[float, float]:
    """`timed_ms`, and the CPU time of the command and every process under it (`perf stat`'s task-clock,
    which follows every fork: getrusage misses a sandbox's processes, which bwrap never reaps). Less
    disturbed by a loaded machine than wall time."""
    out = RESULTS / f".perf-{os.getpid()}.csv"
    RESULTS.mkdir(exist_ok=True)
    try:
        wall = timed_ms(["perf", "stat", "-x,", "-e", "task-clock", "-o", os.fspath(out), "--", *argv],
                        cwd=cwd, env=env)
        line = next(line for line in out.read_text().splitlines() if "task-clock" in line)
        return wall, float(line.split(",")[0])
    finally:
        out.unlink(missing_ok=True)


def aosbuild(*args: str | os.PathLike[str]) -> list[str]:
    """The argv of `python -m aosbuild ARGS`, with this interpreter."""
    return [sys.executable, "-m", "aosbuild", *(os.fspath(arg) for arg in args)]


def write_sample(manifest: Path) -> None:
    """`aosbuild sample debian` (password `bench`) written to `manifest`: the scenarios' real image."""
    subprocess.run(aosbuild("sample", "debian", "--output", manifest, "--password", "bench"), check=True,
                   capture_output=True)


def sources_store(store: Path, manifest: Path) -> None:
    """A store holding every source of the manifest and no object: untimed setup, copied as the starting
    point of every cold build (downloads are the downloads scenario's subject)."""
    subprocess.run(aosbuild("--store", store, "-q", "--sources-only", manifest), check=True)


def in_seconds(samples: dict[str, list[float]]) -> dict[str, list[float]]:
    """The samples with each `*_ms` measurement as `*_s`, in seconds; the others as they are."""
    return {(key.removesuffix("_ms") + "_s" if key.endswith("_ms") else key):
            ([v / 1000 for v in values] if key.endswith("_ms") else values) for key, values in samples.items()}


def repeat(times: int, sample: Callable[[], dict[str, float]]) -> dict[str, list[float]]:
    """Collect `times` samples, each a dict of interleaved measurements, so drift hits all of them alike."""
    runs = [sample() for _ in range(times)]
    return {key: [run[key] for run in runs] for key in runs[0]}


def git(*args: str) -> str:
    """Git's output, or "" outside a checkout: a benchmark copied elsewhere should still run."""
    proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def machine() -> dict[str, Any]:
    """Where the numbers came from: they mean little without the commit, the hardware and the load."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    # "dirty": uncommitted changes mean the commit alone does not say what was measured
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain")),
            "kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(), "default_jobs": DEFAULT_JOBS,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "store_dir": FAST_TMP or tempfile.gettempdir()}
