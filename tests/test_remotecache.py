"""The remote cache (`--cache-remote`) between "machines" that share nothing but a real registry.

Each machine is a store and an output directory of its own (tmpfs, under the test's directory); the
registry is Debian's docker-registry with htpasswd auth (tests/registry.py), its credentials in an auth
file, as a user's would be. The manifest is cheap but not trivial: the layers of its tree have whiteouts,
opaque directories, hard links across layers, xattrs, ACLs, device nodes, a renamed directory (a
redirect, flattened for the push), 2 MiB of data and stage metadata; a second pipeline tars the tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from aosbuild import ocilayer, registry
from aosbuild.registry import RegistryOptions
from aosbuild.registryauth import Credentials
from aosbuild.store import entries

from .conftest import Aosbuild, Run, check_jsonseq, manifest, pipeline, stage
from .fileserver import FileServer
from .registry import PASSWORD, USER, Registry, basic_auth, write_auth_file
from .registryproxy import Fault, FaultyProxy
from .test_layers import BASE, CHANGES
from .treedigest import digest

OPS = "org.aosbuild.test.tree-ops"
REPOSITORY = "aosbuild/cache"
EPOCH = 1_500_000_000
RENAME = ["rename", "olddir", "newdir"]


def tree_stages(last: list[Any]) -> list[dict[str, Any]]:
    return [
        stage(OPS, ops=[op for op in BASE if op != ["socket", "sock"]]),  # a socket is no content of an OCI layer
        stage(OPS, ops=[RENAME]),                                   # a redirect: flattened for the push
        stage("org.aosbuild.test.fill", megabytes=2, filename="data", seed=16),
        stage(OPS, ops=[op for op in CHANGES if op != RENAME]),     # whiteouts, opaque dirs, links, xattrs
        stage("org.aosbuild.test.report", answer=42),               # metadata
        stage(OPS, ops=last),
    ]


def the_manifest(last: list[Any] | None = None) -> dict[str, Any]:
    tree_input = {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": ["name:tree"]}
    return manifest(
        pipeline("tree", *tree_stages(last or [["chmod", "meta", 0o600]]), **{"source-epoch": EPOCH}),
        pipeline("archive", {"type": "org.osbuild.tar", "inputs": {"tree": tree_input},
                             "options": {"filename": "tree.tar"}}))


def auth_file(workdir: Path, *hosts: str) -> Path:
    """The registry's credentials for `hosts` in `workdir/auth.json`."""
    return write_auth_file(workdir / "auth.json", *hosts)


def log_in(monkeypatch: pytest.MonkeyPatch, workdir: Path, *hosts: str) -> None:
    """Every machine of the test reads the registry's credentials from one auth file, as a user's tools do."""
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file(workdir, *hosts)))


def machine(workdir: Path, name: str) -> Aosbuild:
    (workdir / name).mkdir()
    return Aosbuild(workdir / name)


def build(on: Aosbuild, host: str, *extra: str, the: dict[str, Any] | None = None) -> Run:
    run = on(the or the_manifest(), "--cache-remote", f"{host}/{REPOSITORY}", "--export", "tree", "--export",
             "archive", "--output-directory", str(on.output), "--monitor", "jsonseq", *extra, timeout=120)
    assert run.returncode == 0, run.stderr
    check_jsonseq(run.stdout)
    assert PASSWORD not in run.stdout + run.stderr
    assert basic_auth() not in run.stdout + run.stderr
    return run


def messages(run: Run) -> list[str]:
    return [str(record.get("message", "")) for record in run.jsonseq()]


def stages_run(run: Run) -> list[str]:
    return [m.removeprefix("Starting module ") for m in messages(run) if m.startswith("Starting module ")]


def warnings(run: Run) -> list[str]:
    return [m for m in messages(run) if m.startswith("warning: remote cache")]


def exported(on: Aosbuild) -> tuple[dict[str, Any], list[tuple[str, int, int]]]:
    """The tree's full digest, and the archive's members (GNU tar writes the times of the moment it ran
    into PAX headers: two runs of the stage differ in those)."""
    with tarfile.open(on.output / "archive" / "tree.tar") as tar:
        members = [(m.name, m.size, m.mode) for m in tar.getmembers()]
    return digest(str(on.output / "tree")), members


def assert_nothing_partial(on: Aosbuild) -> None:
    """No staging or scratch entry left, and every committed entry whole."""
    assert os.listdir(on.store / "stage") == []
    assert os.listdir(on.store / "tmp") == []
    for name in os.listdir(on.store / "objects"):
        assert entries.damage(on.store / "objects" / name) is None, name


def metadata_of(run: Run, stage_type: str) -> list[Any]:
    return [r.get("metadata") for r in run.jsonseq()
            if r.get("message") == f"Finished module {stage_type}"]


@pytest.fixture
def pushed(served: Registry, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Aosbuild, Run]:
    """Machine A has built the manifest and pushed it."""
    log_in(monkeypatch, workdir, served.host)
    a = machine(workdir, "a")
    run = build(a, served.host)
    assert len(stages_run(run)) == 7
    assert any(m.startswith("remote cache: pushed 3 stage images") for m in messages(run)), messages(run)
    return a, run


def test_an_empty_machine_pulls_everything_and_runs_no_stage(pushed: tuple[Aosbuild, Run], served: Registry,
                                                            workdir: Path) -> None:
    a, a_run = pushed
    b = machine(workdir, "b")
    run = build(b, served.host)
    assert stages_run(run) == []
    hits = [m for m in messages(run) if m.startswith("remote cache hit")]
    assert len(hits) == 2, messages(run)  # both pipelines, whole
    assert warnings(run) == []
    assert exported(b) == exported(a)
    assert (b.output / "archive/tree.tar").read_bytes() == (a.output / "archive/tree.tar").read_bytes()
    # the stages are reported as A's build reported them: cached, with their metadata
    assert metadata_of(run, "org.aosbuild.test.report") == metadata_of(a_run, "org.aosbuild.test.report")
    assert metadata_of(run, "org.aosbuild.test.report")[0]["answer"] == 42
    assert all(r["result"].get("cached") for r in run.jsonseq() if r.get("result") and "id" in r["result"])
    assert_nothing_partial(b)
    # B's store now serves a build of its own, remote or not
    again = b(the_manifest(), "--no-cache-remote", "--monitor", "jsonseq")
    assert again.returncode == 0
    assert stages_run(again) == []


def test_a_machine_that_edits_the_last_stage_pulls_the_rest(pushed: tuple[Aosbuild, Run], served: Registry,
                                                           workdir: Path) -> None:
    c = machine(workdir, "c")
    edited = the_manifest([["chmod", "meta", 0o640]])
    run = build(c, served.host, the=edited)
    # the tree up to the stage before its last comes from the remote; the edited stage and the
    # archive of the changed tree run
    assert stages_run(run) == [OPS, "org.osbuild.tar"]
    assert len([m for m in messages(run) if m.startswith("remote cache hit: pipeline tree")]) == 1
    # A's tree with the edit
    a_tree, c_tree = digest(str(pushed[0].output / "tree")), digest(str(c.output / "tree"))
    assert c_tree["meta"]["mode"] == 0o640
    assert a_tree["meta"]["mode"] == 0o600
    assert {k: v for k, v in c_tree.items() if k != "meta"} == {k: v for k, v in a_tree.items() if k != "meta"}
    assert {**c_tree["meta"], "mode": 0} == {**a_tree["meta"], "mode": 0}
    assert_nothing_partial(c)


def largest_blob(served: Registry) -> Path:
    blobs = list((served.storage / "docker/registry/v2/blobs/sha256").glob("*/*/data"))
    return max(blobs, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["corrupt", "delete"])
def test_a_damaged_blob_is_one_warning_and_a_local_build(pushed: tuple[Aosbuild, Run], served: Registry,
                                                         workdir: Path, damage: str) -> None:
    a, _ = pushed
    blob = largest_blob(served)
    if damage == "corrupt":
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    else:
        shutil.rmtree(blob.parent)
    b = machine(workdir, "b")
    run = build(b, served.host)
    assert len(warnings(run)) == 1, messages(run)
    assert len(stages_run(run)) >= 1
    assert run.stderr.count("remote cache") == 1, run.stderr
    assert exported(b) == exported(a)
    assert_nothing_partial(b)


@pytest.mark.parametrize("fault", ["stop", "stall"])
def test_a_registry_that_stops_or_stalls_mid_pull_is_one_warning(pushed: tuple[Aosbuild, Run], served: Registry,
                                                                 workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 fault: Fault) -> None:
    a, _ = pushed
    with FaultyProxy(("127.0.0.1", served.port), after=256 << 10, fault=fault, on_stop=served.stop) as proxy:
        log_in(monkeypatch, workdir, served.host, proxy.host)
        b = machine(workdir, "b")
        run = build(b, proxy.host, "--cache-remote-timeout", "2")
        assert proxy.triggered.is_set()
    assert len(warnings(run)) == 1, messages(run)
    assert ("did not answer in time" in warnings(run)[0] or "stalled" in warnings(run)[0]) if fault == "stall" \
        else "cut short" in warnings(run)[0] or "cannot be reached" in warnings(run)[0]
    assert len(stages_run(run)) == 7
    assert exported(b) == exported(a)
    assert_nothing_partial(b)


def test_an_unreachable_remote_is_said_once(workdir: Path) -> None:
    b = machine(workdir, "b")
    with socketless_port() as port:
        run = b(the_manifest(), "--cache-remote", f"127.0.0.1:{port}/{REPOSITORY}", "--cache-push", "all",
                "--json")
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("remote cache") == 1, run.stderr
    assert "cannot be reached" in run.stderr
    assert json.loads(run.stdout)["success"] is True


@contextmanager
def socketless_port() -> Iterator[int]:
    """A port of 127.0.0.1 that nothing listens on while the block runs (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_two_machines_pushing_at_once_both_succeed(served: Registry, workdir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    log_in(monkeypatch, workdir, served.host)
    a1, a2 = machine(workdir, "a1"), machine(workdir, "a2")
    ref = f"{served.host}/{REPOSITORY}"
    # one of them with --debug: the engine's events on stderr name registries and digests, never secrets
    procs = [subprocess.Popen(m.command(m.write_manifest(the_manifest()), "--cache-remote", ref, "--export",
                                        "tree", "--export", "archive", "--output-directory", str(m.output), "--json",
                                        *debug),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=m.workdir)
             for m, debug in ((a1, ()), (a2, ("--debug",)))]
    outcomes = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outcomes
    assert "remote.pushed" in outcomes[1][1]
    for out, err in outcomes:
        assert "warning" not in err
        assert PASSWORD not in out + err
        assert basic_auth() not in out + err
        assert json.loads(out)["success"] is True
    b = machine(workdir, "b")
    run = build(b, served.host)
    assert stages_run(run) == []
    assert digest(str(b.output / "tree")) in (digest(str(a1.output / "tree")), digest(str(a2.output / "tree")))


def test_skopeo_fetches_a_pushed_pipeline_as_an_image_of_its_tree(pushed: tuple[Aosbuild, Run], served: Registry,
                                                                 workdir: Path) -> None:
    a, _ = pushed
    inspect = subprocess.run([sys.executable, "-m", "aosbuild", "--libdir", str(Path(__file__).parent / "lib"),
                              "--inspect", str(a.write_manifest(the_manifest(), "inspect.json"))],
                             capture_output=True, text=True, check=True)
    described = json.loads(inspect.stdout)
    tree_id = next(p["stages"][-1]["id"] for p in described["pipelines"] if p["name"] == "tree")
    layout = workdir / "oci"
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--src-creds", f"{USER}:{PASSWORD}",
                    f"docker://{served.host}/{REPOSITORY}:stage-{tree_id}", f"oci:{layout}:tree"],
                   check=True, capture_output=True, timeout=60)
    index = json.loads((layout / "index.json").read_text())
    image = json.loads(blob_of(layout, index["manifests"][0]["digest"]).read_text())
    rootfs = workdir / "rootfs"
    rootfs.mkdir()
    for layer in image["layers"]:
        with open(blob_of(layout, layer["digest"]), "rb") as f:
            ocilayer.unpack_layer(f, rootfs, into="tree")
    unpacked, tree = digest(str(rootfs)), digest(str(a.output / "tree"))
    assert unpacked == tree
    config = json.loads(blob_of(layout, image["config"]["digest"]).read_text())
    assert config["os"] == "linux"
    assert len(config["rootfs"]["diff_ids"]) == len(image["layers"]) == 5


def blob_of(layout: Path, digest_text: str) -> Path:
    return layout / "blobs" / "sha256" / digest_text.removeprefix("sha256:")


def store_command(on: Aosbuild, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aosbuild", "store", *args, "--store", str(on.store)],
                          capture_output=True, text=True, timeout=60)


def test_a_store_remembers_its_remote_and_a_flag_overrides_it(served: Registry, workdir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    log_in(monkeypatch, workdir, served.host)
    ref = f"{served.host}/{REPOSITORY}"
    a = machine(workdir, "a")
    setting = store_command(a, "remote", ref, "--push", "all", "--insecure")
    assert setting.returncode == 0, setting.stderr
    assert setting.stdout == f"remote: {ref} (pushed to)\npush:   all\ninsecure: yes\n"
    info = store_command(a, "info", "--json")
    assert json.loads(info.stdout)["remote"] == {"refs": [ref], "push": "all", "insecure": True}
    assert f"remote:      {ref} (the first pushed to; push all)" in store_command(a, "info").stdout
    run = a(the_manifest(), "--monitor", "jsonseq")
    assert run.returncode == 0, run.stderr
    assert any(m.startswith("remote cache: pushed 7 stage images") for m in messages(run)), messages(run)
    b = machine(workdir, "b")
    assert store_command(b, "remote", ref).returncode == 0
    pulled = b(the_manifest(), "--cache-push", "none", "--cache-remote-insecure", "--monitor", "jsonseq")
    assert pulled.returncode == 0, pulled.stderr
    assert stages_run(pulled) == []
    assert not any(m.startswith("remote cache: pushed") for m in messages(pulled))
    cleared = store_command(b, "remote", "--clear")
    assert cleared.stdout == "remote: none\n"
    refused = store_command(b, "remote", f"user:pw@{served.host}/{REPOSITORY}")
    assert refused.returncode == 2
    assert "pw" not in refused.stderr.replace(REPOSITORY, "")


def test_an_offline_machine_needs_no_source_of_what_it_pulls_and_gets_the_others_from_the_remote(
        served: Registry, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log_in(monkeypatch, workdir, served.host)
    body = b"a package\n" * 1000
    checksum = "sha256:" + hashlib.sha256(body).hexdigest()
    inputs = {"files": {"type": "org.osbuild.files", "origin": "org.osbuild.source",
                        "references": {checksum: {}}}}
    def the(url: str, to: str = "package") -> dict[str, Any]:
        return manifest(pipeline("tree", {**stage("org.osbuild.copy", paths=[
            {"from": f"input://files/{checksum}", "to": f"tree:///{to}"}]), "inputs": inputs},
            stage(OPS, ops=[["chmod", to, 0o600]])), sources={"org.osbuild.curl": {"items": {checksum: url}}})

    with FileServer().running() as files:
        url = files.add("/package", body)
        a = machine(workdir, "a")
        pushing = a(the(url), "--cache-remote", f"{served.host}/{REPOSITORY}", "--monitor", "jsonseq")
        assert pushing.returncode == 0, pushing.stderr
        assert files.count("/package") == 1
    assert any(m.startswith("remote cache: pushed 2 stage images and 1 source items") for m in messages(pushing))
    # the file server is gone: B could not download the item, and need not
    b = machine(workdir, "b")
    run = b(the(url), "--cache-remote", f"{served.host}/{REPOSITORY}", "--export", "tree", "--output-directory",
            str(b.output), "--monitor", "jsonseq")
    assert run.returncode == 0, run.stderr
    check_jsonseq(run.stdout)
    assert stages_run(run) == []
    assert not any(m.startswith("Starting pipeline source") for m in messages(run))
    assert (b.output / "tree" / "package").read_bytes() == body
    # a stage that uses the item changed: the item comes from the remote cache, as from a mirror
    c = machine(workdir, "c")
    edited = c(the(url, "elsewhere"), "--cache-remote", f"{served.host}/{REPOSITORY}", "--export", "tree",
               "--output-directory", str(c.output), "--monitor", "jsonseq")
    assert edited.returncode == 0, edited.stderr
    check_jsonseq(edited.stdout)
    assert stages_run(edited) == ["org.osbuild.copy", OPS]
    assert any("from the remote cache" in m for m in messages(edited)), messages(edited)
    assert (c.output / "tree" / "elsewhere").read_bytes() == body


def test_a_push_that_fails_is_one_warning_and_the_exit_code_of_the_build(served: Registry, workdir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with FaultyProxy(("127.0.0.1", served.port), after=256 << 10, fault="stop", on_stop=served.stop,
                     uploads=True) as proxy:
        log_in(monkeypatch, workdir, proxy.host)
        a = machine(workdir, "a")
        run = build(a, proxy.host, "--cache-remote-timeout", "5")
        assert proxy.triggered.is_set()
    assert len(warnings(run)) == 1, messages(run)
    assert "cannot push" in warnings(run)[0]
    assert run.stderr.count("remote cache") == 1, run.stderr
    assert len(stages_run(run)) == 7


def test_a_failed_build_pushes_nothing(served: Registry, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log_in(monkeypatch, workdir, served.host)
    failing = the_manifest()
    # built after the tree (its build root), which succeeds and is stored: still nothing is pushed
    failing["pipelines"].append(pipeline("broken", stage("org.aosbuild.test.fail", exit=3), build="name:tree"))
    a = machine(workdir, "a")
    run = a(failing, "--cache-remote", f"{served.host}/{REPOSITORY}", "--cache-push", "all", "--monitor", "jsonseq")
    assert run.returncode == 1, run.stderr
    assert stages_run(run)[:6] == [OPS, OPS, "org.aosbuild.test.fill", OPS, "org.aosbuild.test.report", OPS]
    assert not any("remote cache" in m for m in messages(run))
    assert "remote cache" not in run.stderr

    async def tags() -> list[str]:
        async with registry.open_registry(f"{served.host}/{REPOSITORY}", RegistryOptions(timeout=10),
                                          credentials=Credentials(USER, PASSWORD), environ={}) as client:
            return await client.tags()

    assert anyio.run(tags) == []
