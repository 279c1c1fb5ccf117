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
from .daskcluster import WAIT_STAGE, Cluster, run_cluster, start_scheduler, write_auth
from .leftovers import loops_backed_by, processes_mentioning, processes_using, stray_mounts
from .registry import Registry, run_registry
from .treedigest import digest

IMAGES = ("alpha", "beta", "gamma", "delta")
EPOCH = 1_700_000_000  # the images' mtimes, so that trees built at different times are equal


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(dir=FAST_TMP, prefix="aosbuild-dask-") as d, \
            run_registry(Path(d) / "registry") as registry, run_cluster(Path(d) / "cluster", registry) as running:
        yield running


def images_manifest(nonce: str) -> dict[str, Any]:
    """A build root and four pipelines built on it; `nonce` gives the manifest ids of its own. The images
    are reproducible (`source-epoch`): built twice, they are the same trees to the mtime."""
    return manifest(
        pipeline("build", stage("org.osbuild.mkdir", paths=[{"path": f"/{nonce}"}]),
                 stage("org.aosbuild.test.buildroot")),
        *(pipeline(name, stage("org.osbuild.mkdir", paths=[{"path": "/etc"}, {"path": f"/{name}"}]),
                   stage("org.osbuild.hostname", hostname=f"{name}-{nonce[:8]}"), build="name:build",
                   **{"source-epoch": EPOCH})
          for name in IMAGES))


def exports(*names: str, output: Path) -> list[str]:
    return [*(a for n in names for a in ("--export", n)), "--output-directory", str(output)]


def dispatch(aosbuild: Aosbuild, cluster: Cluster, m: dict[str, Any] | Path, *args: str, timeout: float = 120) -> Run:
    command = [*aosbuild.command(m, "--dispatch", cluster.address, "--cache-remote", cluster.remote, *args)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=aosbuild.workdir,
                          env=cluster.env)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def origin(stream: list[dict[str, Any]], record: dict[str, Any]) -> str:
    """A record's origin, from its context's first full definition in the stream."""
    cid = record["context"]["id"]
    return str(next(r["context"]["origin"] for r in stream if r["context"]["id"] == cid and "origin" in r["context"]))


def origins_of(stream: list[dict[str, Any]], prefix: str) -> set[str]:
    return {origin(stream, r) for r in stream if str(r.get("message", "")).startswith(prefix)}


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
    assert len(named) > 1, f"the pipelines ran on {named} alone"
    assert named <= set(cluster.workers)

    # built once, in the remote cache: another client with an empty store submits nothing
    before = cluster.stage_runs()
    again = dispatch(aosbuild, cluster, path, *exports(*IMAGES, output=aosbuild.workdir / "again"), "--monitor",
                     "jsonseq", "--store", str(aosbuild.workdir / "client-store-2"))
    assert again.returncode == 0, again.stderr
    assert cluster.stage_runs() == before
    assert workers_named(again.jsonseq()) == set()
    for name in IMAGES:
        assert digest(str(aosbuild.workdir / "again" / name)) == digest(str(aosbuild.output / name))
    check_jsonseq(again.stdout)


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
    # osbuild's --json document of the failure, the same from a worker as from here
    local_json = aosbuild(path, "--json", "--store", str(aosbuild.workdir / "local-json"))
    dispatched_json = dispatch(aosbuild, cluster, path, "--json", "--store", str(aosbuild.workdir / "client-json"))
    assert (local_json.returncode, dispatched_json.returncode) == (1, 1)
    assert json.loads(dispatched_json.stdout) == json.loads(local_json.stdout)


def m_stage_id(run: Run, stage_type: str) -> str:
    return str(next(r["result"]["id"] for r in run.jsonseq() if r.get("result", {}).get("name") == stage_type))


def test_a_pipeline_no_worker_can_run_fails_at_submission(aosbuild: Aosbuild, cluster: Cluster) -> None:
    m = manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/riscv"}])))
    started = time.monotonic()
    run = dispatch(aosbuild, cluster, m, "--dispatch-arch", "riscv64")
    assert run.returncode == 1, run.stderr
    assert "no worker of the Dask scheduler" in run.stderr
    assert "builds riscv64 pipelines" in run.stderr
    assert "worker1 (arch-" in run.stderr  # what the workers offer, to compare
    assert time.monotonic() - started < 30  # an error, not a wait for a worker that never comes


def test_dispatch_needs_a_remote_cache_and_tls_beyond_loopback(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/x"}])))
    run = aosbuild(m, "--dispatch", "tcp://127.0.0.1:8786", "--no-cache-remote")
    assert run.returncode == 2
    assert "--dispatch: needs --cache-remote REF" in run.stderr
    run = aosbuild(m, "--dispatch", "tcp://192.0.2.1:8786", "--cache-remote", "127.0.0.1:5000/cache")
    assert run.returncode == 2
    assert "plain TCP is only for a scheduler on this machine" in run.stderr
    assert "tls://" in run.stderr


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def inside_sandbox(pid: int) -> bool:
    """A process of the stage itself (its runner), not the bwrap that starts it: by then bwrap has asked
    to die with its parent (a parent killed before bwrap asks leaves bwrap running: not the drill)."""
    try:
        return not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"bwrap")
    except OSError:
        return False


def worker_running_wait_stage(cluster: Cluster, timeout: float = 60) -> str:
    """The worker whose process runs the wait stage, once one does."""
    by_pid = {w.process.pid: name for name, w in cluster.workers.items() if w.process.poll() is None}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(inside_sandbox, processes_mentioning(WAIT_STAGE)):
            ancestor = pid
            while ancestor > 1 and ancestor not in by_pid:
                ancestor = parent(ancestor)
            if ancestor in by_pid:
                return str(by_pid[ancestor])
        time.sleep(0.05)  # a stage on another process's sandbox: /proc is the only sign
    raise AssertionError("no worker ran the wait stage")


def end_with_the_killed_worker(directory: Path, grace: float = 10) -> None:
    """Wait for the killed worker's processes (its sandboxes) to end by themselves: none may outlive it
    (`aosbuild.pidns`), so nothing here kills them as systemd's `KillMode=control-group` would."""
    deadline = time.monotonic() + grace
    while left := processes_using(directory):
        assert time.monotonic() < deadline, f"processes of the killed worker outlived it: {left}"
        time.sleep(0.05)  # processes of a killed parent: /proc is the only sign of their end


def start_dispatch(aosbuild: Aosbuild, cluster: Cluster, m: dict[str, Any] | Path, *args: str) -> subprocess.Popen[str]:
    command = aosbuild.command(m, "--dispatch", cluster.address, "--cache-remote", cluster.remote, *args)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=aosbuild.workdir, env=cluster.env)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> Run:
    stdout, stderr = proc.communicate(timeout=timeout)
    return Run(proc.returncode, stdout, stderr)


def wait_stage_manifest(nonce: str) -> dict[str, Any]:
    return manifest(pipeline("slow", stage("org.osbuild.mkdir", paths=[{"path": f"/{nonce}"}]),
                             stage(WAIT_STAGE, nonce=nonce, marker="released")))


def test_a_worker_killed_mid_pipeline_has_it_built_on_another(aosbuild: Aosbuild, cluster: Cluster) -> None:
    cluster.reset_wait_stage()
    client = start_dispatch(aosbuild, cluster, wait_stage_manifest(uuid.uuid4().hex), "--monitor", "jsonseq",
                            "--store", str(aosbuild.workdir / "client"))
    try:
        victim = worker_running_wait_stage(cluster)
        cluster.kill(victim)
        assert worker_running_wait_stage(cluster) != victim  # rescheduled, and waiting there
        cluster.release_wait_stage()
        run = finish(client)
    finally:
        client.kill()
        client.wait()
    assert run.returncode == 0, run.stderr
    check_jsonseq(run.stdout)
    stream = run.jsonseq()
    # the stream is the surviving worker's build; what the victim said came live, while it ran
    assert f"aosbuild.worker/{victim}" not in origins_of(stream, "Starting module")
    heard = [n for n, r in enumerate(stream) if r.get("message") == f"pipeline slow: stage {WAIT_STAGE} (2/2) started\n"
             and origin(stream, r) == f"aosbuild.worker/{victim}"]
    started = [n for n, r in enumerate(stream) if r.get("message") == "Starting pipeline slow"]
    assert heard, "the victim's stage start was not heard"
    assert started
    assert heard[0] < started[0], "the victim's stage start was heard only at the end"
    directory = cluster.workers[victim].directory
    end_with_the_killed_worker(directory)
    cluster.start_worker(victim)  # restarted on its store: nothing of the killed build is left
    assert [str(m) for m in stray_mounts(directory)] == []
    assert loops_backed_by(directory) == []


def test_ctrl_c_on_the_client_cancels_its_pipeline_on_the_worker(aosbuild: Aosbuild, cluster: Cluster) -> None:
    cluster.reset_wait_stage()
    client = start_dispatch(aosbuild, cluster, wait_stage_manifest(uuid.uuid4().hex),
                            "--store", str(aosbuild.workdir / "client"))
    try:
        runner = worker_running_wait_stage(cluster)
        client.send_signal(signal.SIGINT)
        run = finish(client, timeout=60)
    finally:
        client.kill()
        client.wait()
    assert run.returncode == 130, run.stderr
    assert "Aborted" in run.stderr
    deadline = time.monotonic() + 30
    while processes_mentioning(WAIT_STAGE):  # the worker tears the stage's sandbox down
        assert time.monotonic() < deadline, "the cancelled stage still runs on its worker"
        time.sleep(0.05)
    directory = cluster.workers[runner].directory
    assert [str(m) for m in stray_mounts(directory)] == []
    assert loops_backed_by(directory) == []
    assert "cancelled" in cluster.workers[runner].log.read_text()
    assert cluster.workers[runner].process.poll() is None  # and takes the next pipeline


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA of the test's own and certificates it signed for the scheduler and a client, with openssl;
    and a client certificate from another CA, which the scheduler must refuse too."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    paths: dict[str, Path] = {}
    for ca in ("ca", "other-ca"):
        subprocess.run(["openssl", "req", "-x509", *key, "-keyout", str(directory / f"{ca}.key"), "-out",
                        str(directory / f"{ca}.pem"), "-days", "2", "-subj", f"/CN=aosbuild test {ca}"],
                       check=True, capture_output=True)
    extensions = directory / "san.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ca in (("scheduler", "ca"), ("worker", "ca"), ("client", "ca"), ("stranger", "other-ca")):
        subprocess.run(["openssl", "req", *key, "-keyout", str(directory / f"{name}.key"), "-out",
                        str(directory / f"{name}.csr"), "-subj", f"/CN={name}"], check=True, capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", str(directory / f"{name}.csr"), "-CA",
                        str(directory / f"{ca}.pem"), "-CAkey", str(directory / f"{ca}.key"), "-CAcreateserial",
                        "-out", str(directory / f"{name}.pem"), "-days", "2", "-extfile", str(extensions)],
                       check=True, capture_output=True)
        paths[name] = directory / name
    paths["ca"] = directory / "ca"
    return paths


def tls_env(ca: Path, cert: Path | None) -> dict[str, str]:
    """Dask's own configuration of a client's TLS, as an operator sets it (README)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"] = f"{ca}.pem"
    env["DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT"] = "3s"  # a refused handshake is retried until then
    if cert is not None:
        env["DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT"] = f"{cert}.pem"
        env["DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"] = f"{cert}.key"
    return env


def test_a_tls_cluster_builds_for_its_clients_and_refuses_others(aosbuild: Aosbuild, served: Registry) -> None:
    """Mutual TLS: the scheduler refuses a client without a certificate of its CA; a worker and a client
    with one build."""
    certs = make_certificates(aosbuild.workdir / "certs")
    scheduler, address = start_scheduler(
        aosbuild.workdir / "scheduler", "--protocol", "tls", "--tls-ca-file", f"{certs['ca']}.pem",
        "--tls-cert", f"{certs['scheduler']}.pem", "--tls-key", f"{certs['scheduler']}.key")
    cluster = Cluster(aosbuild.workdir / "cluster", address, served, scheduler)
    try:
        assert address.startswith("tls://127.0.0.1:")
        write_auth(cluster.directory, served)
        m = aosbuild.write_manifest(manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/t"}]))))
        outcomes = {}
        for who, cert in (("nobody", None), ("stranger", certs["stranger"]), ("client", certs["client"])):
            proc = subprocess.run([*aosbuild.command(m, "--dispatch", address, "--cache-remote", cluster.remote)],
                                  capture_output=True, text=True, timeout=120, env=tls_env(certs["ca"], cert),
                                  cwd=aosbuild.workdir)
            outcomes[who] = (proc.returncode, proc.stderr)
        for who in ("nobody", "stranger"):
            assert outcomes[who][0] == 1, outcomes[who]
            assert "cannot reach the Dask scheduler" in outcomes[who][1], outcomes[who]
        # the scheduler's own client got in: it has no workers to offer
        assert "no worker of the Dask scheduler" in outcomes["client"][1], outcomes["client"]

        cluster.start_worker("secure", "--tls-ca-file", f"{certs['ca']}.pem", "--tls-cert", f"{certs['worker']}.pem",
                             "--tls-key", f"{certs['worker']}.key", "--slots", "2", "--host", "127.0.0.1")
        proc = subprocess.run(
            [*aosbuild.command(m, "--dispatch", address, "--cache-remote", cluster.remote, "--export", "tree",
                               "--output-directory", str(aosbuild.output))],
            capture_output=True, text=True, timeout=120, env={**tls_env(certs["ca"], certs["client"]),
                                                               "REGISTRY_AUTH_FILE": cluster.env["REGISTRY_AUTH_FILE"]},
            cwd=aosbuild.workdir)
        assert proc.returncode == 0, proc.stderr
        assert (aosbuild.output / "tree" / "t").is_dir()
        assert "tls://127.0.0.1:" in cluster.workers["secure"].log.read_text()  # its own listener is TLS too
    finally:
        cluster.stop()


def test_two_clients_asking_for_the_same_pipelines_share_one_execution(aosbuild: Aosbuild, cluster: Cluster) -> None:
    m = images_manifest(uuid.uuid4().hex)
    path = aosbuild.write_manifest(m)
    clients = [start_dispatch(aosbuild, cluster, path, *exports(*IMAGES, output=aosbuild.workdir / f"out{n}"),
                              "--json", "--store", str(aosbuild.workdir / f"client{n}")) for n in (1, 2)]
    try:
        runs = [finish(client) for client in clients]
    finally:
        for client in clients:
            client.kill()
            client.wait()
    for run in runs:
        assert run.returncode == 0, run.stderr
    documents = [json.loads(run.stdout) for run in runs]
    assert documents[0] == documents[1]  # the same results, stage by stage
    for name in IMAGES:
        assert digest(str(aosbuild.workdir / "out1" / name)) == digest(str(aosbuild.workdir / "out2" / name))
    inspected = json.loads(aosbuild(path, "--inspect").stdout)
    stages = {p["stages"][-1]["id"]: len(p["stages"]) for p in inspected["pipelines"]}
    runs_by_pipeline = {pid: n for pid, n in cluster.stage_runs().items() if pid in stages}
    assert runs_by_pipeline == stages  # every stage of every pipeline ran once, on one worker or another
