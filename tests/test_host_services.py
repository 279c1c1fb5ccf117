"""osbuild's host services for the host modules aosbuild has no native version of, against osbuild 191.

One small manifest uses what aosbuild lacks, next to what it has: a `org.osbuild.ostree` source (fetched by
the library's source module, its `fetch_all`), `org.osbuild.containers` and `org.osbuild.ostree` inputs
(mapped by the library's input modules, through osbuild's `store` endpoint) beside a native tree input,
and a `org.osbuild.noop` mount (a service) before a native ext4 mount of the same stage. A test stage of
the library writes down what it sees; osbuild 191 and aosbuild must give it the same. So with osbuild's
`org.osbuild.skopeo` source pulling from a local registry and a containers input of that image. Devices:
the only library devices aosbuild lacks (luks2, lvm2) need device-mapper, which this kernel lacks, so the
device protocol is run with the library's loopback module instead of aosbuild's own, and luks2's failure
is checked to be the stage's error. Sources: the library's inline, over the protocol, beside aosbuild's.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from aosbuild.devices import open_dev_dir, open_devices
from aosbuild.errors import SourceError
from aosbuild.hostservices import split_mounts
from aosbuild.library import Library
from aosbuild.loop import open_loop_server
from aosbuild.manifest import Device, Mount, Source
from aosbuild.monitor import NullMonitor
from aosbuild.sandbox import CAP_BITS, bounding_set, capability_mask, stage_capabilities
from aosbuild.sources import Sources
from aosbuild.store import Store

from . import osbuild_library_manifest as lib
from .conftest import FAST_TMP, Aosbuild, OsbuildOracle
from .leftovers import loops_backed_by, mounts_under
from .registry import PASSWORD as REGISTRY_PASSWORD
from .registry import USER as REGISTRY_USER
from .registry import run_registry, write_auth_file
from .test_drills import assert_clean, finish, start, wait_for_message
from .test_osbuild_library import (
    RAISE_STAGE,
    assert_same,
    assert_services_cleaned_up,
    build_with_both,
    runnable_library,
)

pytestmark = pytest.mark.slow

CONTRACT = "org.aosbuild.test.osbuild-contract"
OSTREE = shutil.which("ostree")
needs_ostree = pytest.mark.skipif(OSTREE is None, reason="ostree is missing: apt-get install -y ostree")


@pytest.fixture(scope="module")
def test_library(osbuild_oracle: OsbuildOracle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return runnable_library(osbuild_oracle.libdir, tmp_path_factory.mktemp("lib", numbered=True) / "lib")


def ostree_repo(directory: Path) -> tuple[Path, str]:
    """A local ostree repository with one commit (two files); its path and the commit id."""
    repo, content = directory / "repo", directory / "content"
    (content / "etc").mkdir(parents=True)
    (content / "etc/probe").write_text("committed\n")
    (content / "usr").mkdir()
    subprocess.run(["ostree", "init", "--mode=archive", f"--repo={repo}"], check=True)
    commit = subprocess.run(["ostree", "commit", f"--repo={repo}", "--branch=probe", f"--tree=dir={content}"],
                            check=True, capture_output=True, text=True).stdout.strip()
    return repo, commit


def foreign_manifest(repo: Path, commit: str, last: dict[str, Any]) -> dict[str, Any]:
    disk = {"disk": lib.loopback("disk.img")}
    inputs = {
        "tree": lib.tree_input("os"),
        "images": {"type": "org.osbuild.containers", "origin": "org.osbuild.pipeline",
                   "references": {"name:archive": {"name": "localhost/probe:latest"}}},
        "commits": {"type": "org.osbuild.ostree", "origin": "org.osbuild.source",
                    "references": {commit: {"ref": "probe/ref"}}}}
    # a service mount first, then a native one beside it: both kinds in one stage
    mounts = [{"name": "srv", "type": "org.osbuild.noop", "source": "disk", "target": "/srv"},
              {"name": "data", "type": "org.osbuild.ext4", "source": "disk", "target": "/data"}]
    return {"version": "2",
            "sources": {"org.osbuild.ostree": {"items": {commit: {"remote": {"url": f"file://{repo}"}}}}},
            "pipelines": [
                {"name": "archive", "stages": [lib.stage("org.osbuild.truncate",
                                                         {"filename": "probe.tar", "size": "4KiB"})]},
                {"name": "os", "stages": [lib.stage("org.osbuild.mkdir", {"paths": [{"path": "/etc"}]})]},
                {"name": "image", "stages": [
                    lib.stage("org.osbuild.truncate", {"filename": "disk.img", "size": "16MiB"}),
                    lib.stage("org.osbuild.mkfs.ext4", {"uuid": lib.ROOT_UUID}, devices={"device": disk["disk"]}),
                    {**last, "inputs": inputs, "devices": disk, "mounts": mounts}]}]}


@needs_ostree
def test_inputs_sources_and_mounts_aosbuild_lacks_match_osbuild(test_library: Path, aosbuild: Aosbuild) -> None:
    repo, commit = ostree_repo(aosbuild.workdir)
    m = foreign_manifest(repo, commit, lib.stage(CONTRACT, {}))
    ours = build_with_both(aosbuild, test_library, m, "image")

    # the source went through the library's module, into the store's directory for its content type
    assert f"\nsource/org.osbuild.ostree (org.osbuild.ostree): pulling {commit}\n" in ours.stdout
    shown = subprocess.run(["ostree", "show", f"--repo={aosbuild.store / 'sources/org.osbuild.ostree/repo'}",
                            commit], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    # the input services' lines come under the header of the stage they serve
    header = ours.stdout.index(f"{CONTRACT}: ")
    assert header < ours.stdout.index("input/images (org.osbuild.containers): target ")
    assert header < ours.stdout.index(f"input/commits (org.osbuild.ostree): exporting {commit}")
    # noop went through its service; ext4 stayed native (no service line for it)
    assert "mount/data (" not in ours.stdout

    our_contract = json.loads((aosbuild.output / "image/contract.json").read_text())
    their_contract = json.loads((aosbuild.workdir / "osbuild/image/contract.json").read_text())
    assert our_contract["arguments"]["inputs"]["images"]["data"] == {
        "archives": {"probe.tar": {"format": "oci-archive", "name": "localhost/probe:latest"}}}
    assert our_contract["arguments"]["inputs"]["commits"] == {
        "path": "/run/osbuild/inputs/commits/repo", "data": {"refs": {commit: {"ref": "probe/ref"}}}}
    assert our_contract["inputs"]["images"] == ["probe.tar"]
    assert "objects" in our_contract["inputs"]["commits"]
    assert our_contract["mounted"] == {"srv": False, "data": True}  # noop makes a directory, no mount
    for contract in (our_contract, their_contract):  # which loop device it got is the kernel's choice
        contract["arguments"]["devices"]["disk"]["node"].pop("minor")
    intended = capability_mask(stage_capabilities(bounding_set(), ("CAP_MAC_ADMIN",)))
    assert [int(mask, 16) for mask in our_contract.pop("caps")][:2] == [intended, intended]
    assert intended >> CAP_BITS["CAP_MAC_ADMIN"] & 1
    their_contract.pop("caps")
    assert_same(our_contract, their_contract)
    # the store endpoint's binds and the services' mounts are gone with the stage
    assert [str(mp) for mp in mounts_under(aosbuild.store) if mp.point != str(aosbuild.store)] == []
    assert loops_backed_by(aosbuild.store) == []


def oci_layout(layout: Path) -> str:
    """A one-layer OCI image (uncompressed layer, one file) in an OCI layout; its image id (the config's
    digest, which osbuild's skopeo source checks)."""
    (layout / "blobs/sha256").mkdir(parents=True)

    def blob(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (layout / "blobs/sha256" / digest).write_bytes(data)
        return f"sha256:{digest}"

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = b"from a registry\n"
        info = tarfile.TarInfo("etc/probe")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    layer = buf.getvalue()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [blob(layer)]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blob(layer),
                    "size": len(layer)}]}).encode()
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": blob(manifest),
         "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return "sha256:" + hashlib.sha256(config).hexdigest()


def test_a_skopeo_source_and_a_containers_input_from_it_match_osbuild(
        test_library: Path, aosbuild: Aosbuild, monkeypatch: pytest.MonkeyPatch) -> None:
    """osbuild's `org.osbuild.skopeo` source (aosbuild has no fetcher for it) pulls an image from a local
    registry (credentials from `REGISTRY_AUTH_FILE`, as skopeo reads them) into `sources/org.osbuild.containers`,
    and the library's containers input binds it for the stage, under osbuild and under aosbuild."""
    image_id = oci_layout(aosbuild.workdir / "layout")
    with run_registry(aosbuild.workdir / "registry") as served:
        creds = f"{REGISTRY_USER}:{REGISTRY_PASSWORD}"
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", creds,
                        f"oci:{aosbuild.workdir / 'layout'}:latest", f"docker://{served.host}/probe:latest"],
                       check=True, capture_output=True)
        digest = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--creds", creds, "--format",
                                 "{{.Digest}}", f"docker://{served.host}/probe:latest"],
                                check=True, capture_output=True, text=True).stdout.strip()
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(write_auth_file(aosbuild.workdir / "auth.json", served.host)))
        m = {"version": "2",
             "sources": {"org.osbuild.skopeo": {"items": {image_id: {"image": {
                 "name": f"{served.host}/probe", "digest": digest, "tls-verify": False}}}}},
             "pipelines": [{"name": "os", "stages": [lib.stage(CONTRACT, {}, inputs={"images": {
                 "type": "org.osbuild.containers", "origin": "org.osbuild.source",
                 "references": {image_id: {"name": "localhost/probe:latest"}}}})]}]}
        build_with_both(aosbuild, test_library, m, "os")
    stored = aosbuild.store / "sources/org.osbuild.containers" / image_id / "image"
    assert (stored / "manifest.json").is_file()
    our_contract = json.loads((aosbuild.output / "os/contract.json").read_text())
    their_contract = json.loads((aosbuild.workdir / "osbuild/os/contract.json").read_text())
    assert our_contract["arguments"]["inputs"]["images"] == {"path": "/run/osbuild/inputs/images", "data": {
        "archives": {image_id: {"format": "dir", "name": "localhost/probe:latest"}}}}
    assert our_contract["inputs"]["images"] == [image_id]
    our_contract.pop("caps")
    their_contract.pop("caps")
    assert_same(our_contract, their_contract)
    assert [str(mp) for mp in mounts_under(aosbuild.store) if mp.point != str(aosbuild.store)] == []

    # the image is an item of the store (a directory): counted, left alone by verify, pruned whole
    def store_command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "aosbuild", "store", *args, "--store", str(aosbuild.store)],
                              capture_output=True, text=True, timeout=60)

    info = json.loads(store_command("info", "--json").stdout)
    assert info["sources"]["items"] == 1
    assert info["sources"]["size"] >= sum(f.stat().st_size for f in stored.iterdir())
    verified = store_command("verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    pruned = store_command("prune", "--to", "0", "--sources-to", "0")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert not stored.exists()


def host_mount_points() -> list[str]:
    """Mount points in this process's (the host's) mount namespace."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


@needs_ostree
@pytest.mark.usefixtures("nodev_store")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
def test_a_signal_while_input_services_serve_a_stage_leaves_nothing(test_library: Path, aosbuild: Aosbuild,
                                                                    signum: int) -> None:
    """The store endpoint's bind of the `archive` tree (for the containers input) leaves the host once the
    sandbox has it; SIGINT: services stop, the sandbox goes, nothing is left; SIGKILL: the services see
    their sockets close and exit, the loop device goes with its last user, nothing stays mounted."""
    repo, commit = ostree_repo(aosbuild.workdir)
    sleeper = {"type": RAISE_STAGE, "options": {"sleep": 60, "message": "never"}}
    proc = start(aosbuild, foreign_manifest(repo, commit, sleeper), "--libdir", str(test_library),
                 "--monitor", "jsonseq", "--export", "image", "--output-directory", str(aosbuild.output))
    try:
        seen = wait_for_message(proc, "sleeping in data")
    except AssertionError:
        ended = finish(proc, timeout=10)
        raise AssertionError(f"the build ended first ({ended.returncode}): {ended.stderr[-3000:]}") from None
    assert b"sleeping in srv at /run/osbuild/mounts/srv, mounted: False" in seen
    assert b"sleeping in data at /run/osbuild/mounts/data, mounted: True" in seen
    # the sandbox has the input's tree bound in its namespace (the first test shows the stage sees it);
    # the host no longer, once the sandbox is set up
    deadline = time.monotonic() + 10
    while any("/host-inputs/" in point for point in host_mount_points()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [point for point in host_mount_points() if "/host-inputs/" in point] == []
    proc.send_signal(signum)
    assert_services_cleaned_up(aosbuild, proc, signum)


def test_the_library_inline_source_fetches_over_the_host_service_protocol(
        osbuild_oracle: OsbuildOracle, tmp_path: Path) -> None:
    """The library's org.osbuild.inline, run as a host service (aosbuild's own fetcher set aside): the
    item lands where aosbuild's fetcher puts it, and the second run finds it cached."""
    data = os.urandom(100_000)  # a large item: the call's arguments go through a memfd
    checksum = "sha256:" + hashlib.sha256(data).hexdigest()
    items = {checksum: {"encoding": "base64", "data": base64.b64encode(data).decode()}}
    library = Library([osbuild_oracle.libdir])
    store = Store(tmp_path / "store")

    async def fetch() -> Sources:
        sources = Sources(store, [Source(type="org.osbuild.inline", items=items)], NullMonitor(),
                          library=lambda name: library.find("Source", name), fetchers={})
        await sources.fetch_all()
        return sources

    first = anyio.run(fetch)
    assert (store.sources / "org.osbuild.files" / checksum).read_bytes() == data
    assert [r.cached for r in first.results["org.osbuild.inline"]] == [False]
    second = anyio.run(fetch)
    assert [r.cached for r in second.results["org.osbuild.inline"]] == [True]

    wrong = {"sha256:" + "0" * 64: items[checksum]}

    async def fetch_wrong() -> None:
        await Sources(store, [Source(type="org.osbuild.inline", items=wrong)], NullMonitor(),
                      library=lambda name: library.find("Source", name), fetchers={}).fetch_all()

    with pytest.raises(ExceptionGroup) as raised:
        anyio.run(fetch_wrong)
    errors = raised.value.exceptions
    assert [type(e) for e in errors] == [SourceError], errors
    error = errors[0]
    assert isinstance(error, SourceError)
    assert error.checksum == next(iter(wrong))
    assert "checksum mismatch" in str(error).lower(), errors
    assert not (store.sources / "org.osbuild.files" / next(iter(wrong))).exists()


def test_a_device_opened_by_its_host_service(osbuild_oracle: OsbuildOracle) -> None:
    """The device protocol (`open` with dev, tree, parent, options; `close` when the service stops) with
    the library's loopback module in place of aosbuild's: the node is made in the stage's /dev, the stage
    is told `/dev/loopN` and its node, and the loop device is gone when the devices are closed."""
    library = Library([osbuild_oracle.libdir])
    lines: list[str] = []
    with tempfile.TemporaryDirectory(dir=FAST_TMP, prefix="aosbuild-hostdev-") as d:
        scratch = Path(d)
        tree = scratch / "tree"
        tree.mkdir()
        with open(tree / "disk.img", "wb") as f:
            f.truncate(4 << 20)
        device = Device(name="disk", type="org.osbuild.loopback", options={"filename": "disk.img"}, parent=None)

        async def run() -> dict[str, Any]:
            async with open_loop_server() as loops, open_dev_dir(scratch / "dev", osbuild_layout=True) as devdir:
                async with open_devices({"disk": device}, tree=tree, devdir=devdir, loops=loops, native={},
                                        find=lambda name: library.find("Device", name),
                                        on_line=lines.append) as devices:
                    node = os.stat(scratch / "dev" / devices["disk"]["path"].removeprefix("/dev/"))
                    assert os.major(node.st_rdev) == devices["disk"]["node"]["major"] == 7
                    assert os.minor(node.st_rdev) == devices["disk"]["node"]["minor"]
                    assert loops_backed_by(scratch) != []
                    return dict(devices)

        devices = anyio.run(run)
        assert devices["disk"]["path"].startswith("/dev/loop")
        assert loops_backed_by(scratch) == []


def test_which_mounts_go_through_services() -> None:
    """Service mounts are made on the host before the sandbox starts, native ones inside it after: mixed
    only when that keeps the manifest's order, else all through services."""
    def mounts(*types: str) -> list[Mount]:
        return [Mount(name=f"m{i}", type=t, target=f"/t{i}") for i, t in enumerate(types)]

    native = {"org.osbuild.ext4", "org.osbuild.fat"}.__contains__
    mixed = mounts("org.osbuild.noop", "org.osbuild.bind", "org.osbuild.ext4", "org.osbuild.fat")
    assert [[m.name for m in part] for part in split_mounts(mixed, native)] == [["m0", "m1"], ["m2", "m3"]]
    after = mounts("org.osbuild.ext4", "org.osbuild.bind")
    assert [[m.name for m in part] for part in split_mounts(after, native)] == [["m0", "m1"], []]
    assert split_mounts(mounts("org.osbuild.ext4"), native) == ([], mounts("org.osbuild.ext4"))


def test_a_device_service_that_fails_fails_its_stage_and_leaves_nothing(osbuild_oracle: OsbuildOracle,
                                                                          aosbuild: Aosbuild) -> None:
    """The library's `org.osbuild.luks2` (which aosbuild lacks) on a loop device that holds no LUKS header:
    its service answers `open` with an exception, which is the stage's error; its loop parent is detached."""
    m = {"version": "2", "pipelines": [{"name": "image", "stages": [
        lib.stage("org.osbuild.truncate", {"filename": "disk.img", "size": "16MiB"}),
        lib.stage("org.osbuild.mkfs.ext4", {"uuid": lib.ROOT_UUID}, devices={
            "disk": lib.loopback("disk.img"),
            "device": {"type": "org.osbuild.luks2", "parent": "disk", "options": {"passphrase": "x"}}})]}]}
    run = aosbuild(m, "--libdir", str(osbuild_oracle.libdir), "--export", "image", "--output-directory",
                   str(aosbuild.output))
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr
    assert "Error: host service device/device failed: RuntimeError: " in run.stdout + run.stderr
    assert "is not a valid LUKS device" in run.stdout + run.stderr
    assert run.stdout.index("org.osbuild.mkfs.ext4: ") < run.stdout.index("device/device (org.osbuild.luks2): ")
    assert_clean(aosbuild)


# -- mount services on the layered store: they see the stage's merged tree -------------------------------------

def tree_bind_manifest(last: dict[str, Any] | None = None) -> dict[str, Any]:
    """Library mounts that read and write the stage's tree, after stages that wrote it: a bind of the
    tree's `/etc` (hostname from an earlier stage) onto its `/mnt` (made by an earlier stage), and, as
    bootc-image-builder does, the mounted disk bound over the whole tree (`tree://` from `mount://`)."""
    disk = {"disk": lib.loopback("disk.img")}
    etc_on_mnt = [{"name": "etc", "type": "org.osbuild.bind", "target": "tree://mnt",
                   "options": {"source": "tree://etc"}}]
    disk_as_tree = [{"name": "root", "type": "org.osbuild.ext4", "source": "disk", "target": "/"},
                    {"name": "bound", "type": "org.osbuild.bind", "target": "tree://",
                     "options": {"source": "mount://"}}]
    return {"version": "2", "pipelines": [
        {"name": "os", "stages": [
            lib.stage("org.osbuild.mkdir", {"paths": [{"path": "/etc"}, {"path": "/mnt"}]}),
            lib.stage("org.osbuild.hostname", {"hostname": "layered"}),
            lib.stage("org.osbuild.copy", {"paths": [{"from": "tree:///mnt/hostname", "to": "tree:///copied"}]},
                      mounts=etc_on_mnt)]},
        {"name": "image", "stages": [
            lib.stage("org.osbuild.truncate", {"filename": "disk.img", "size": "16MiB"}),
            lib.stage("org.osbuild.mkfs.ext4", {"uuid": lib.ROOT_UUID}, devices={"device": disk["disk"]}),
            lib.stage("org.osbuild.mkdir", {"paths": [{"path": "/etc"}]}, devices=disk, mounts=disk_as_tree),
            lib.stage("org.osbuild.copy", {"paths": [{"from": "input://os/etc/hostname", "to": "tree:///etc/"}]},
                      inputs={"os": lib.tree_input("os")}, devices=disk, mounts=disk_as_tree),
            *([{**last, "devices": disk, "mounts": disk_as_tree}] if last else [])]}]}


def test_bind_mounts_of_the_tree_see_what_earlier_stages_wrote(test_library: Path, aosbuild: Aosbuild) -> None:
    """On the layered store the tree of a stage is an overlay of earlier stages' layers: a library mount
    service must be given that merged tree, not the stage's new (empty) layer, as osbuild gives its tree."""
    from .test_osbuild_library import ext4_view, tree_view

    m = tree_bind_manifest()
    build_with_both(aosbuild, test_library, m, "os", "image")
    assert (aosbuild.output / "os/copied").read_text() == "layered\n"
    assert_same(tree_view(aosbuild.output / "os"), tree_view(aosbuild.workdir / "osbuild/os"))
    # the stages wrote into the disk through the bind, not into the image's tree
    assert sorted(p.name for p in (aosbuild.output / "image").iterdir()) == ["disk.img"]
    view = ext4_view(aosbuild.output / "image/disk.img", aosbuild.workdir)
    assert view["etc/hostname"][4] == hashlib.sha256(b"layered\n").hexdigest()
    assert_same(view, ext4_view(aosbuild.workdir / "osbuild/image/disk.img", aosbuild.workdir))
    assert [str(mp) for mp in mounts_under(aosbuild.store) if mp.point != str(aosbuild.store)] == []
    assert loops_backed_by(aosbuild.store) == []


@pytest.mark.usefixtures("nodev_store")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
def test_a_signal_while_a_bind_holds_the_merged_tree_leaves_nothing(test_library: Path, aosbuild: Aosbuild,
                                                                     signum: int) -> None:
    """The merged tree mounted on the host for the mount services goes with them: after SIGINT, and after
    SIGKILL (its holder sees the engine's end of its pipe close)."""
    sleeper = {"type": RAISE_STAGE, "options": {"sleep": 60, "message": "never"}}
    proc = start(aosbuild, tree_bind_manifest(sleeper), "--libdir", str(test_library), "--monitor", "jsonseq",
                 "--export", "image", "--output-directory", str(aosbuild.output))
    wait_for_message(proc, "sleeping in")
    proc.send_signal(signum)
    assert_services_cleaned_up(aosbuild, proc, signum)


# -- containers-storage: the host's container storage, as a source and an input ---------------------------------

# runs the rest of argv with a private /etc/containers (its storage.conf naming a storage of the test's)
PRIVATE_CONTAINERS = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                      'mount --bind "$1" /etc/containers && shift && exec "$@"', "sh"]
# what containers/storage writes anew on every copy (creation times, lock contents)
VOLATILE = ("vfs-images/images.json", "vfs-layers/layers.json", ".lock")


def private_containers_conf(workdir: Path) -> Path:
    """A copy of the host's /etc/containers whose storage.conf puts the storage (vfs) below `workdir`."""
    conf = workdir / "containers"
    if Path("/etc/containers").is_dir():
        shutil.copytree("/etc/containers", conf, symlinks=True)
    conf.mkdir(exist_ok=True)
    (conf / "storage.conf").write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{workdir}/graph"\n'
                                       f'runroot = "{workdir}/runroot"\n')
    return conf


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is missing: apt-get install -y skopeo")
@pytest.mark.skipif(not Path("/etc/containers").is_dir(), reason="osbuild binds /etc/containers: mkdir it")
def test_a_containers_storage_source_and_input_match_osbuild(test_library: Path, aosbuild: Aosbuild) -> None:
    """The library's `org.osbuild.containers-storage` source (it checks the image is in the host's storage,
    as storage.conf names it) and input (it binds that storage for the stage), with osbuild's `skopeo`
    stage copying the image into the tree, as an OCI layout and into the tree's own storage: osbuild and
    aosbuild give the stage the same, and make the same tree. The image is a one-layer image built here,
    copied into a storage of the test's own with skopeo: no network."""
    image_id = oci_layout(aosbuild.workdir / "layout")
    conf = private_containers_conf(aosbuild.workdir)
    private = [*PRIVATE_CONTAINERS, str(conf)]
    subprocess.run([*private, "skopeo", "copy", "--quiet", f"oci:{aosbuild.workdir / 'layout'}:latest",
                    "containers-storage:localhost/probe:latest"], check=True, capture_output=True)
    images = {"images": {"type": "org.osbuild.containers-storage", "origin": "org.osbuild.source",
                         "references": {image_id: {"name": "localhost/probe:latest"}}}}
    m = {"version": "2", "sources": {"org.osbuild.containers-storage": {"items": {image_id: {}}}},
         "pipelines": [{"name": "os", "stages": [
             lib.stage(CONTRACT, {}, inputs=images),
             lib.stage("org.osbuild.skopeo", {"destination": {"type": "oci", "path": "/oci"}}, inputs=images),
             lib.stage("org.osbuild.skopeo", {"destination": {
                 "type": "containers-storage", "storage-path": "/var/lib/containers/storage",
                 "storage-driver": "vfs"}}, inputs=images)]}]}
    path = aosbuild.write_manifest(m)
    env = {**os.environ, "PYTHONPATH": str(test_library)}
    theirs = subprocess.run([*private, sys.executable, "-m", "osbuild", "--libdir", str(test_library), "--store",
                             str(aosbuild.workdir / "osbuild-store"), "--export", "os", "--output-directory",
                             str(aosbuild.workdir / "osbuild"), str(path)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert theirs.returncode == 0, theirs.stdout[-3000:] + theirs.stderr
    ours = subprocess.run([*private, *aosbuild.command(path, "--libdir", str(test_library), "--export", "os",
                                                      "--output-directory", str(aosbuild.output))],
                          capture_output=True, text=True, timeout=300, cwd=aosbuild.workdir)
    assert ours.returncode == 0, ours.stdout[-3000:] + ours.stderr

    our_contract = json.loads((aosbuild.output / "os/contract.json").read_text())
    their_contract = json.loads((aosbuild.workdir / "osbuild/os/contract.json").read_text())
    assert our_contract["arguments"]["inputs"]["images"] == {"path": "/run/osbuild/inputs/images", "data": {
        "archives": {image_id: {"format": "containers-storage", "name": "localhost/probe:latest", "storage": {
            "driver": "vfs", "graphroot": f"{aosbuild.workdir}/graph", "runroot": f"{aosbuild.workdir}/runroot"}}}}}
    assert our_contract["inputs"]["images"] == ["storage"]
    our_contract.pop("caps")  # the one difference on purpose (test_osbuild_library)
    their_contract.pop("caps")
    assert_same(our_contract, their_contract)

    from .test_osbuild_library import tree_view

    def view(root: Path) -> dict[str, Any]:
        return {k: v for k, v in tree_view(root).items() if k != "contract.json" and not k.endswith(VOLATILE)}

    ours_view = view(aosbuild.output / "os")
    assert "oci/index.json" in ours_view
    assert any(k.endswith("/etc/probe") for k in ours_view if k.startswith("var/lib/containers/storage/vfs/dir/"))
    assert_same(ours_view, view(aosbuild.workdir / "osbuild/os"))
    assert [str(mp) for mp in mounts_under(aosbuild.store) if mp.point != str(aosbuild.store)] == []


def oci_index_layout(layout: Path) -> str:
    """`oci_layout`'s image behind a one-entry image index (amd64/linux), which the layout's `latest` names;
    the image id."""
    image_id = oci_layout(layout)
    index = json.loads((layout / "index.json").read_text())
    manifest = index["manifests"][0]
    entry = {k: v for k, v in manifest.items() if k != "annotations"}
    data = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": [{**entry, "platform": {"architecture": "amd64", "os": "linux"}}]}).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest).write_bytes(data)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": f"sha256:{digest}", "size": len(data),
         "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    return image_id


def test_a_skopeo_index_source_and_its_manifest_list_match_osbuild(
        test_library: Path, aosbuild: Aosbuild, monkeypatch: pytest.MonkeyPatch) -> None:
    """osbuild's `org.osbuild.skopeo-index` source fetches an image's manifest list (from a local registry)
    into `sources/org.osbuild.files`; with the image from the `org.osbuild.skopeo` source, osbuild's skopeo
    stage merges the two and copies the image into the tree: the same under both."""
    image_id = oci_index_layout(aosbuild.workdir / "layout")
    with run_registry(aosbuild.workdir / "registry") as served:
        creds = f"{REGISTRY_USER}:{REGISTRY_PASSWORD}"
        subprocess.run(["skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false", "--dest-creds", creds,
                        f"oci:{aosbuild.workdir / 'layout'}:latest", f"docker://{served.host}/probe:latest"],
                       check=True, capture_output=True)
        raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", creds,
                              f"docker://{served.host}/probe:latest"], check=True, capture_output=True).stdout
        list_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        # as pushed: skopeo compressed the layer, so the image's manifest is a new one
        manifest_digest = json.loads(raw)["manifests"][0]["digest"]
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(write_auth_file(aosbuild.workdir / "auth.json", served.host)))
        name = f"{served.host}/probe"
        m = {"version": "2",
             "sources": {
                 "org.osbuild.skopeo": {"items": {image_id: {"image": {
                     "name": name, "digest": manifest_digest, "tls-verify": False}}}},
                 "org.osbuild.skopeo-index": {"items": {list_digest: {"image": {"name": name, "tls-verify": False}}}}},
             "pipelines": [{"name": "os", "stages": [lib.stage("org.osbuild.skopeo", {
                 "destination": {"type": "oci", "path": "/oci"}}, inputs={
                 "images": {"type": "org.osbuild.containers", "origin": "org.osbuild.source",
                            "references": {image_id: {"name": "localhost/probe:latest"}}},
                 "manifest-lists": {"type": "org.osbuild.files", "origin": "org.osbuild.source",
                                    "references": [list_digest]}})]}]}
        build_with_both(aosbuild, test_library, m, "os")
    assert (aosbuild.store / "sources/org.osbuild.files" / list_digest).read_bytes() == raw
    from .test_osbuild_library import tree_view

    ours_view = tree_view(aosbuild.output / "os")
    # the list's one image, copied as its manifest names it (skopeo copies one instance of a list)
    index = json.loads((aosbuild.output / "os/oci/index.json").read_text())
    assert [entry["digest"] for entry in index["manifests"]] == [manifest_digest]
    assert f"oci/blobs/sha256/{image_id.removeprefix('sha256:')}" in ours_view
    assert_same(ours_view, tree_view(aosbuild.workdir / "osbuild/os"))


def librepo_available() -> bool:
    return subprocess.run(["/usr/bin/python3", "-c", "import librepo"], capture_output=True).returncode == 0


@pytest.mark.skipif(not librepo_available(), reason="osbuild's librepo source needs python3-librepo: "
                    "apt-get install -y python3-librepo")
def test_a_librepo_source_from_a_local_mirror_matches_osbuild(test_library: Path, aosbuild: Aosbuild) -> None:
    """osbuild's `org.osbuild.librepo` source (librepo, as Fedora's builds fetch RPMs) from a `baseurl`
    mirror on 127.0.0.1 into `sources/org.osbuild.files`, and osbuild's copy stage putting the file into the
    tree from a files input: the same under osbuild and aosbuild, and the second build finds it cached."""
    from .fileserver import FileServer, sha256
    from .test_osbuild_library import tree_view

    data = b"not really an rpm, but librepo only checks the checksum\n" * 100
    checksum = sha256(data)
    with FileServer().running() as files:
        files.add("/repo/Packages/p/probe-1.0.noarch.rpm", data)
        m = {"version": "2",
             "sources": {"org.osbuild.librepo": {
                 "items": {checksum: {"path": "Packages/p/probe-1.0.noarch.rpm", "mirror": "local"}},
                 "options": {"mirrors": {"local": {"url": files.url("/repo/"), "type": "baseurl"}}}}},
             "pipelines": [{"name": "os", "stages": [
                 lib.stage("org.osbuild.mkdir", {"paths": [{"path": "/pkgs"}]}),
                 lib.stage("org.osbuild.copy", {"paths": [{"from": f"input://rpms/{checksum}",
                                                           "to": "tree:///pkgs/probe.rpm"}]},
                           inputs={"rpms": {"type": "org.osbuild.files", "origin": "org.osbuild.source",
                                            "references": {checksum: {}}}})]}]}
        build_with_both(aosbuild, test_library, m, "os")
        fetched = files.count("/repo/Packages/p/probe-1.0.noarch.rpm")
        again = aosbuild(m, "--libdir", str(test_library), "--export", "os", "--output-directory",
                         str(aosbuild.output))
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr
        assert files.count("/repo/Packages/p/probe-1.0.noarch.rpm") == fetched  # cached: not fetched again
    assert (aosbuild.store / "sources/org.osbuild.files" / checksum).read_bytes() == data
    assert (aosbuild.output / "os/pkgs/probe.rpm").read_bytes() == data
    assert_same(tree_view(aosbuild.output / "os"), tree_view(aosbuild.workdir / "osbuild/os"))


@needs_ostree
def test_an_ostree_checkout_input_matches_osbuild(test_library: Path, aosbuild: Aosbuild) -> None:
    """osbuild's `org.osbuild.ostree.checkout` input checks out a commit of the `org.osbuild.ostree` source
    (a local repository) for the stage: the test stage sees what osbuild gives it, and osbuild's copy stage
    takes a file of the checkout into the tree, as under osbuild."""
    from .test_osbuild_library import tree_view

    repo, commit = ostree_repo(aosbuild.workdir)
    checkout = {"checkout": {"type": "org.osbuild.ostree.checkout", "origin": "org.osbuild.source",
                             "references": [commit]}}
    m = {"version": "2",
         "sources": {"org.osbuild.ostree": {"items": {commit: {"remote": {"url": f"file://{repo}"}}}}},
         "pipelines": [{"name": "os", "stages": [
             lib.stage(CONTRACT, {}, inputs=checkout),
             lib.stage("org.osbuild.copy", {"paths": [{"from": f"input://checkout/{commit}/etc/probe",
                                                       "to": "tree:///probe"}]}, inputs=checkout)]}]}
    build_with_both(aosbuild, test_library, m, "os")
    assert (aosbuild.output / "os/probe").read_text() == "committed\n"
    our_contract = json.loads((aosbuild.output / "os/contract.json").read_text())
    their_contract = json.loads((aosbuild.workdir / "osbuild/os/contract.json").read_text())
    assert our_contract["arguments"]["inputs"]["checkout"] == {
        "path": "/run/osbuild/inputs/checkout", "data": {"refs": {commit: {"path": commit}}}}
    assert our_contract["inputs"]["checkout"] == [commit]
    our_contract.pop("caps")  # the one difference on purpose (test_osbuild_library)
    their_contract.pop("caps")
    assert_same(our_contract, their_contract)

    def view(root: Path) -> dict[str, Any]:
        return {k: v for k, v in tree_view(root).items() if k != "contract.json"}

    assert_same(view(aosbuild.output / "os"), view(aosbuild.workdir / "osbuild/os"))
    assert [str(mp) for mp in mounts_under(aosbuild.store) if mp.point != str(aosbuild.store)] == []
