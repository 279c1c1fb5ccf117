"""A Dask cluster of separate processes on 127.0.0.1 for the dispatch tests: `dask scheduler`, and
`aosbuild worker`s each with a store of its own on tmpfs, sharing nothing but the scheduler and the
registry. Every process is stopped by its pid; a worker can be killed (SIGKILL) and started again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .conftest import TEST_LIBDIR
from .readiness import wait_until_ready
from .registry import Registry, write_auth_file

START_TIMEOUT = 60.0
WAIT_STAGE = "org.aosbuild.test.wait"


@dataclass
class Worker:
    name: str
    directory: Path
    process: subprocess.Popen[bytes]
    log_start: int = 0  # where this process's lines begin in the log (a restarted worker appends)

    @property
    def store(self) -> Path:
        return self.directory / "store"

    @property
    def log(self) -> Path:
        return self.directory / "worker.log"

    def stage_runs(self) -> dict[str, int]:
        """Pipeline id -> stages this worker ran for it, summed over its tasks (from its log lines)."""
        runs: dict[str, int] = {}
        for line in self.log.read_text(errors="replace").splitlines():
            prefix = f"aosbuild worker {self.name}: pipeline "
            if line.startswith(prefix) and " stages run in " in line:
                pipeline_id, _, rest = line.removeprefix(prefix).partition(": ")
                runs[pipeline_id] = runs.get(pipeline_id, 0) + int(rest.split()[0])
        return runs


@dataclass
class Cluster:
    directory: Path
    address: str
    registry: Registry
    scheduler: subprocess.Popen[bytes]
    workers: dict[str, Worker] = field(default_factory=dict)

    @property
    def remote(self) -> str:
        return f"{self.registry.host}/aosbuild/dispatch"

    @property
    def libdir(self) -> Path:
        """The cluster's own library (searched before the tests'): a copy of the wait stage to release."""
        return self.directory / "lib"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "REGISTRY_AUTH_FILE": str(self.directory / "auth.json")}

    def start_worker(self, name: str, *extra: str) -> Worker:
        return self.wait_ready(self.spawn_worker(name, *extra))

    def spawn_worker(self, name: str, *extra: str) -> Worker:
        directory = self.directory / name
        directory.mkdir(exist_ok=True)
        with open(directory / "worker.log", "ab") as log:
            start = log.tell()
            process = subprocess.Popen(
                [sys.executable, "-m", "aosbuild", "worker", "--scheduler", self.address, "--name", name,
                 "--store", str(directory / "store"), "--cache-remote", self.remote,
                 "--libdir", str(self.libdir), "--libdir", str(TEST_LIBDIR), *extra],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env)
        worker = self.workers[name] = Worker(name, directory, process, start)
        return worker

    def wait_ready(self, worker: Worker) -> Worker:
        wait_until_ready(worker.process, lambda: b"ready at" in worker.log.read_bytes()[worker.log_start:],
                         what=f"worker {worker.name}", log=worker.log, timeout=START_TIMEOUT)
        return worker

    def kill(self, name: str) -> None:
        worker = self.workers[name]
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait(timeout=30)

    def stage_runs(self) -> dict[str, int]:
        """Pipeline id -> stages run for it, over every worker."""
        total: dict[str, int] = {}
        for worker in self.workers.values():
            for pipeline_id, count in worker.stage_runs().items():
                total[pipeline_id] = total.get(pipeline_id, 0) + count
        return total

    def release_wait_stage(self) -> None:
        with open(self.libdir / "stages" / WAIT_STAGE, "ab") as f:
            f.write(b"\n# released\n")

    def reset_wait_stage(self) -> None:
        stages = self.libdir / "stages"
        stages.mkdir(parents=True, exist_ok=True)
        for suffix in ("", ".meta.json"):
            target = stages / f"{WAIT_STAGE}{suffix}"
            if target.exists():
                target.unlink()  # a new file: a stage still running on the old one keeps its own
            shutil.copy2(TEST_LIBDIR / "stages" / f"{WAIT_STAGE}{suffix}", target)

    def stop(self) -> None:
        for worker in self.workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers.values():
            try:
                worker.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        if self.scheduler.poll() is None:
            self.scheduler.kill()
        self.scheduler.wait(timeout=20)


def start_scheduler(directory: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """`dask scheduler` on 127.0.0.1, a port of its own; its process and address."""
    directory.mkdir(parents=True, exist_ok=True)
    info = directory / "scheduler.json"
    with open(directory / "scheduler.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--no-dashboard", "--scheduler-file", str(info), *extra],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    wait_until_ready(process, lambda: info.exists() and info.read_text().strip().endswith("}"),
                     what="dask scheduler", log=directory / "scheduler.log", timeout=START_TIMEOUT)
    return process, str(json.loads(info.read_text())["address"])


def write_auth(directory: Path, registry: Registry) -> None:
    """The registry's credentials in `directory/auth.json`, which the cluster's processes are given."""
    write_auth_file(directory / "auth.json", registry.host)


@contextmanager
def run_cluster(directory: Path, registry: Registry, workers: int = 3) -> Iterator[Cluster]:
    write_auth(directory, registry)
    process, address = start_scheduler(directory / "scheduler")
    cluster = Cluster(directory, address, registry, process)
    try:
        cluster.reset_wait_stage()
        for worker in [cluster.spawn_worker(f"worker{index + 1}") for index in range(workers)]:
            cluster.wait_ready(worker)
        yield cluster
    finally:
        cluster.release_wait_stage()  # a stage still waiting (a failed test's) ends, wherever it runs
        cluster.stop()
