"""`aosbuild --dispatch` and `aosbuild worker`: builds on a Dask cluster of separate processes on 127.0.0.1.

One scheduler and three workers for the module, each worker with its own store on tmpfs; trees travel
through the real registry (tests/registry.py). The manifests are cheap: a build root made of the host's
python3 and four pipelines of bundled stages on it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import FAST_TMP, Aosbuild, Run, check_jsonseq, manifest, pipeline, stage
from .daskcluster import WAIT_STAGE, Cluster, run_cluster, start_scheduler
from .leftovers import loops_backed_by, processes_mentioning, stray_mounts
from .registry import run_registry
from .treedigest import digest

IMAGES = ("alpha", "beta", "gamma", "delta")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(dir=FAST_TMP, prefix="aosbuild-dask-") as d, \
            run_registry(Path(d) / "registry") as registry, run_cluster(Path(d) / "cluster", registry) as running:
        yield running


def images_manifest(nonce: str) -> dict[str, Any]:
    """A build root and four pipelines built on it; `nonce` gives the manifest ids of its own."""
    return manifest(
        pipeline("build", stage("org.aosbuild.test.buildroot"), stage("org.osbuild.mkdir", paths=[{"path": f"/{nonce}"}])),
        *(pipeline(name, stage("org.osbuild.mkdir", paths=[{"path": "/etc"}, {"path": f"/{name}"}]),
                   stage("org.osbuild.hostname", hostname=f"{name}-{nonce[:8]}"), build="name:build")
          for name in IMAGES))


def exports(*names: str, output: Path) -> list[str]:
    return [*(a for n in names for a in ("--export", n)), "--output-directory", str(output)]


def dispatch(aosbuild: Aosbuild, cluster: Cluster, m: dict[str, Any] | Path, *args: str, timeout: float = 120) -> Run:
    command = [*aosbuild.command(m, "--dispatch", cluster.address, "--cache-remote", cluster.remote, *args)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=aosbuild.workdir,
                          env=cluster.env)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def workers_named(stream: list[dict[str, Any]]) -> set[str]:
    """The workers the stream's log origins name (`aosbuild.worker/NAME`)."""
    origins = {r["context"].get("origin", "") for r in stream}
    return {o.removeprefix("aosbuild.worker/") for o in origins if o.startswith("aosbuild.worker/")}


def test_a_dispatched_build_gives_the_local_build_s_trees_and_stream(aosbuild: Aosbuild, cluster: Cluster) -> None:
    m = images_manifest(uuid.uuid4().hex)
    path = aosbuild.write_manifest(m)
    local = aosbuild(path, *exports(*IMAGES, output=aosbuild.workdir / "local"), "--monitor", "jsonseq")
    assert local.returncode == 0, local.stderr
    run = dispatch(aosbuild, cluster, path, *exports(*IMAGES, output=aosbuild.output), "--monitor", "jsonseq",
                   "--store", str(aosbuild.workdir / "client-store"))
    assert run.returncode == 0, run.stderr
    for name in IMAGES:
        assert digest(str(aosbuild.output / name)) == digest(str(aosbuild.workdir / "local" / name))
    summary, local_summary = check_jsonseq(run.stdout), check_jsonseq(local.stdout)
    assert summary.split()[1:] == local_summary.split()[1:]  # pipelines, stages, failures, progress: all alike
    assert results(run.jsonseq()) == results(local.jsonseq())
    named = workers_named(run.jsonseq())
    assert len(named) > 1 and named <= set(cluster.workers), f"the pipelines ran on {named}"


def results(stream: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """Each stage's result as the Go clients keep it: stage type, id, success."""
    return sorted((r["result"]["name"], r["result"]["id"], r["result"]["success"]) for r in stream
                  if r.get("result", {}).get("id"))


def test_a_stage_failing_on_a_worker_fails_the_build_as_locally(aosbuild: Aosbuild, cluster: Cluster) -> None:
    nonce = uuid.uuid4().hex
    m = manifest(pipeline("ok", stage("org.osbuild.mkdir", paths=[{"path": f"/{nonce}"}])),
                 pipeline("broken", stage("org.osbuild.mkdir", paths=[{"path": f"/{nonce}"}]),
                          stage("org.aosbuild.test.fail", lines=30, exit=3)))
    path = aosbuild.write_manifest(m)
    local = aosbuild(path, "--monitor", "jsonseq")
    run = dispatch(aosbuild, cluster, path, "--monitor", "jsonseq", "--store", str(aosbuild.workdir / "client"))
    assert (run.returncode, local.returncode) == (1, 1), run.stderr
    failed_id = m_stage_id(local, "org.aosbuild.test.fail")
    assert f"stage org.aosbuild.test.fail ({failed_id}) of pipeline 'broken' exited with status 3" in run.stderr
    tail = run.stderr.split("Last output of the stage:\n", 1)[1].split("What to do:", 1)[0]
    assert tail == local.stderr.split("Last output of the stage:\n", 1)[1].split("What to do:", 1)[0]
    assert "line 29" in tail
    summary = check_jsonseq(run.stdout)
    assert "failed_stages=1" in summary


def m_stage_id(run: Run, stage_type: str) -> str:
    return next(r["result"]["id"] for r in run.jsonseq() if r.get("result", {}).get("name") == stage_type)


def test_a_pipeline_no_worker_can_run_fails_at_submission(aosbuild: Aosbuild, cluster: Cluster) -> None:
    m = manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/riscv"}])))
    started = time.monotonic()
    run = dispatch(aosbuild, cluster, m, "--dispatch-arch", "riscv64")
    assert run.returncode == 1, run.stderr
    assert "no worker of the Dask scheduler" in run.stderr and "builds riscv64 pipelines" in run.stderr
    assert "worker1 (arch-" in run.stderr  # what the workers offer, to compare
    assert time.monotonic() - started < 30  # an error, not a wait for a worker that never comes


def test_dispatch_needs_a_remote_cache_and_tls_beyond_loopback(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/x"}])))
    run = aosbuild(m, "--dispatch", "tcp://127.0.0.1:8786")
    assert run.returncode == 2
    assert "--dispatch: needs --cache-remote REF" in run.stderr
    run = aosbuild(m, "--dispatch", "tcp://192.0.2.1:8786", "--cache-remote", "127.0.0.1:5000/cache")
    assert run.returncode == 2
    assert "plain TCP is only for a scheduler on this machine" in run.stderr and "tls://" in run.stderr
