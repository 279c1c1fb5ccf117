"""Where one stage's time goes: timestamps at each step of running a stage, from the engine's side.

Runs the real engine in this process on a pipeline of `org.osbuild.noop` stages (store on tmpfs),
with the steps of the stage path wrapped to note the time: the scratch entry and the stage's /dev made,
bwrap started, the runner's first request ("arguments") in, its reply out, the output's end of file,
bwrap reaped, the channel closed, the stage's teardown done, the next stage begun. It prints, per step,
the median over the stages (the first is left out: it pays for cold caches) of the time since the step
before, and the bare `bwrap ... python3 -S -c pass` of the same namespaces for scale. A tool for finding
waiting, not a benchmark: the wrappers cost a few microseconds each. Stages run in their turn
(`AOSBUILD_AHEAD=0` unless set otherwise): a stage started ahead of its turn overlaps the one before it,
and the steps of two stages would interleave.

    .venv/bin/python bench/stagetrace.py [--stages 20]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, os.fspath(BENCH.parent))

from aosbuild import builder, cli, process, sandbox  # noqa: E402

os.environ.setdefault("AOSBUILD_AHEAD", "0")

# the cheapest sandbox with the namespaces a stage gets, running the cheapest Python
BARE_ARGV = ["bwrap", "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64",
             "/lib64", "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev", "--unshare-ipc",
             "--unshare-pid", "--unshare-net", "--unshare-uts", "--die-with-parent", "--new-session",
             "python3", "-S", "-c", "pass"]

STEPS = [
    ("begin", "stage begun (previous stage's teardown done)"),
    ("scratch", "scratch entry, loop server, /dev tmpfs ready"),
    ("spawned", "bwrap started (argv built, fork+exec returned)"),
    ("arguments", "runner's first request in: sandbox up, Python started, runner and stage imported"),
    ("replied", "arguments answered"),
    ("eof", "output at end of file: stage ran and exited, sandbox gone"),
    ("reaped", "bwrap reaped"),
    ("channel", "channel closed and served to the end"),
    ("teardown", "/dev, loop server and scratch entry gone"),
    ("finished", "result recorded, stage reported"),
]


class Trace:
    def __init__(self) -> None:
        self.stages: list[dict[str, float]] = []

    def mark(self, step: str) -> None:
        self.stages[-1].setdefault(step, time.perf_counter())

    def begin(self) -> None:
        self.stages.append({"begin": time.perf_counter()})


def instrument(trace: Trace) -> None:
    """Wrap the steps of the stage path so that each notes the time it is reached."""
    run_stage, sandbox_run = builder.run_stage, sandbox.run
    popen_init = process.Process.__init__
    wait, read_output = process.Process.wait, process.Process.read_output
    on_arguments = builder.StageSession.on_arguments
    open_dev_dir = builder.open_dev_dir

    async def traced_run_stage(*args: Any, **kwargs: Any) -> Any:
        trace.begin()
        try:
            return await run_stage(*args, **kwargs)
        finally:
            trace.mark("teardown")

    @contextlib.asynccontextmanager
    async def traced_dev_dir(path: Path, **kwargs: Any) -> AsyncIterator[Any]:
        async with open_dev_dir(path, **kwargs) as devdir:
            trace.mark("scratch")
            yield devdir

    async def traced_sandbox_run(*args: Any, **kwargs: Any) -> int:
        try:
            return await sandbox_run(*args, **kwargs)
        finally:
            trace.mark("channel")

    def traced_init(self: process.Process, popen: Any) -> None:
        popen_init(self, popen)
        if trace.stages:
            trace.mark("spawned")

    async def traced_read_output(self: process.Process, on_chunk: Callable[[bytes], None]) -> None:
        await read_output(self, on_chunk)
        trace.mark("eof")

    async def traced_wait(self: process.Process) -> int:
        code = await wait(self)
        trace.mark("reaped")
        return code

    async def traced_arguments(self: Any, params: dict[str, Any], fds: list[int]) -> Any:
        trace.mark("arguments")
        try:
            return await on_arguments(self, params, fds)
        finally:
            trace.mark("replied")

    builder.run_stage = traced_run_stage  # type: ignore[assignment]
    builder.open_dev_dir = traced_dev_dir  # type: ignore[assignment]
    builder.sandbox.run = traced_sandbox_run  # type: ignore[assignment]
    process.Process.__init__ = traced_init  # type: ignore[method-assign]
    process.Process.read_output = traced_read_output  # type: ignore[method-assign]
    process.Process.wait = traced_wait  # type: ignore[method-assign]
    builder.StageSession.on_arguments = traced_arguments  # type: ignore[method-assign]


def bare_ms(times: int) -> float:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        subprocess.run(BARE_ARGV, check=True)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=20)
    args = parser.parse_args()
    trace = Trace()
    instrument(trace)
    root = Path(tempfile.mkdtemp(prefix="aosbuild-stagetrace-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK)
                                 else None))
    try:
        manifest = root / "noops.json"
        manifest.write_text(json.dumps({"version": "2", "pipelines": [{"name": "noop", "stages": [
            {"type": "org.osbuild.noop", "options": {"n": i}} for i in range(args.stages)]}]}))
        start = time.perf_counter()
        code = cli.main(["--store", os.fspath(root / "store"), "-q", os.fspath(manifest)])
        total = (time.perf_counter() - start) * 1000
        if code != 0:
            raise SystemExit(f"the build failed with exit status {code}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    stages = trace.stages[1:]
    for later, after in itertools.pairwise(stages):
        later["finished"] = after["begin"]
    stages = stages[:-1]
    print(f"{args.stages} noop stages, {total:.0f} ms in all; median ms per step over {len(stages)} stages:\n")
    print("| step | ms since the step before | what happened in between |")
    print("|---|---|---|")
    per_stage = []
    for stage in stages:
        per_stage.append((stage["finished"] - stage["begin"]) * 1000)
    for (previous, _), (step, what) in itertools.pairwise(STEPS):
        gaps = [(s[step] - s[previous]) * 1000 for s in stages if step in s and previous in s]
        print(f"| {step} | {statistics.median(gaps):.2f} | {what} |")
    print(f"| **stage, begin to next begin** | {statistics.median(per_stage):.2f} | |")
    print(f"| bare `bwrap ... python3 -S -c pass` | {bare_ms(10):.2f} | the floor, same namespaces |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
