"""osbuild's own module library, unchanged, on aosbuild's engine, against osbuild 191 building the same.

One session fixture builds `osbuild_library_manifest` (38 stages of osbuild's library: config stages,
users, systemd units, a GPT disk on loop devices with mkfs.fat/ext4, the tree copied into the mounted
root, qcow2, tar, xz, zstd, gzip) three times: with osbuild itself (`python -m osbuild --libdir`), with
`aosbuild --libdir` (every stage osbuild's), and with aosbuild's bundled `org.osbuild.*` stages first (32
of the 38; osbuild's library for the other 6), the host as build root for all. The exports must be identical
in content, mode, owner and symlink targets; the partition table and the filesystems inside the images too.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from aosbuild.library import BUNDLED_ROOT
from aosbuild.sandbox import CAP_BITS, bounding_set, capability_mask, stage_capabilities

from . import osbuild_library_manifest as library_manifest
from .conftest import (
    FAST_TMP,
    TESTS,
    Aosbuild,
    OsbuildOracle,
    Run,
    check_jsonseq,
)
from .leftovers import loops_backed_by, mounts_under
from .test_drills import assert_clean, finish, start, wait_for_message

pytestmark = pytest.mark.slow

# stages written against osbuild's API, added to a copy of osbuild's library for the failure tests
OSBUILD_TEST_STAGES = TESTS / "lib-osbuild" / "stages"
RAISE_STAGE = "org.aosbuild.test.osbuild-raise"


def runnable_library(libdir: Path, target: Path) -> Path:
    """A copy of an osbuild library that osbuild itself can run, with the tests' osbuild-API stages in it.

    osbuild runs the runner file it picks; a checkout without symlinks (as ../shared's) leaves its runner
    aliases (`org.osbuild.debian` -> `org.osbuild.ubuntu1804`) as one-line files, which osbuild cannot
    execute: here they become symlinks again. aosbuild runs the original as it is.
    """
    shutil.copytree(libdir, target, symlinks=True)
    for runner in (target / "runners").iterdir():
        runner.chmod(runner.stat().st_mode | stat.S_IWUSR)
        name = runner.read_text(errors="replace").strip() if runner.stat().st_size < 256 else ""
        if not os.access(runner, os.X_OK) and (runner.parent / name).is_file():
            runner.unlink()
            runner.symlink_to(name)
    stages = target / "stages"
    stages.chmod(stages.stat().st_mode | stat.S_IWUSR)
    for path in OSBUILD_TEST_STAGES.iterdir():
        shutil.copy(path, stages / path.name)
    return target


@dataclass(frozen=True, slots=True)
class Builds:
    osbuild: Path      # osbuild's exports
    aosbuild: Path     # aosbuild's exports, every stage from osbuild's library
    bundled: Path      # aosbuild's exports, its bundled stages where it has them, osbuild's library for the rest
    osbuild_run: Run
    aosbuild_run: Run
    bundled_run: Run
    scratch: Path

    def ours(self, which: str) -> Path:
        return self.bundled if which == "bundled" else self.aosbuild


def aosbuild_command(libdir: Path, store: Path, *args: str, first: tuple[str, ...] = ()) -> list[str]:
    """aosbuild with `libdir` (after the libraries `first`, if any) and `store`."""
    libdirs = [arg for root in (*first, str(libdir)) for arg in ("--libdir", root)]
    return [sys.executable, "-m", "aosbuild", *libdirs, "--store", str(store), *args]


@pytest.fixture(scope="session")
def builds(osbuild_oracle: OsbuildOracle) -> Iterator[Builds]:
    """The manifest built by osbuild and twice by aosbuild (all stages from osbuild's library; its own
    bundled `org.osbuild.*` stages first, a stage coming from the first library that has it), at once:
    each build is mostly its runner setting up sandboxes, stage after stage. One session fixture, so every
    comparison shares osbuild's build."""
    with tempfile.TemporaryDirectory(dir=FAST_TMP, prefix="aosbuild-osbuild-lib-") as d:
        scratch = Path(d)
        oracle = OsbuildOracle(libdir=runnable_library(osbuild_oracle.libdir, scratch / "osbuild-lib"))
        path = scratch / "manifest.json"
        path.write_text(json.dumps(library_manifest.manifest()))
        exports = [arg for name in library_manifest.EXPORTS for arg in ("--export", name)]

        def ours(name: str, first: tuple[str, ...] = ()) -> Run:
            # aosbuild runs the library as it was found, not the copy made runnable for osbuild
            proc = subprocess.run(aosbuild_command(osbuild_oracle.libdir, scratch / f"{name}-store",
                                                   "--output-directory", str(scratch / name), *exports, str(path),
                                                   first=first),
                                  capture_output=True, text=True, timeout=600)
            return Run(proc.returncode, proc.stdout, proc.stderr)

        with ThreadPoolExecutor(max_workers=2) as pool:
            theirs = pool.submit(oracle, "--store", str(scratch / "osbuild-store"), "--output-directory",
                                 str(scratch / "osbuild"), *exports, str(path), timeout=600)
            bundled = pool.submit(ours, "bundled", (str(BUNDLED_ROOT),))
            aosbuild_run = ours("aosbuild")
            osbuild_run, bundled_run = theirs.result(), bundled.result()
        yield Builds(scratch / "osbuild", scratch / "aosbuild", scratch / "bundled", osbuild_run, aosbuild_run,
                     bundled_run, scratch)


# -- what is compared -------------------------------------------------------------------------------------

def tree_view(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below `root`: its kind, mode, owner and content (a digest) or symlink target."""
    view: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                what: Any = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                what = st.st_rdev
            else:
                what = None
            view[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                                 st.st_uid, st.st_gid, what)
    return view


def tar_view(fileobj: IO[bytes] | gzip.GzipFile | lzma.LZMAFile) -> list[tuple[Any, ...]]:
    members = []
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        for member in tar:
            data = tar.extractfile(member) if member.isfile() else None
            digest = hashlib.sha256(data.read()).hexdigest() if data else None
            members.append((member.name, member.type, member.mode, member.uid, member.gid, member.uname,
                            member.gname, member.linkname, digest))
    return members


def disk_view(image: Path, scratch: Path) -> dict[str, Any]:
    """The partition table, the ext4 root's tree (dumped with debugfs: no mount) and the ESP's FAT header."""
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    table.pop("device")
    for partition in table["partitions"]:
        partition.pop("node")
    esp, root = table["partitions"]
    fat = subprocess.run(["minfo", "-i", f"{image}@@{esp['start'] * 512}", "::"], capture_output=True,
                         text=True, check=True).stdout.replace(str(image), "IMAGE")
    dump = Path(tempfile.mkdtemp(dir=scratch, prefix="rdump-"))
    subprocess.run(["debugfs", "-R", f"rdump / {dump}", f"{image}?offset={root['start'] * 512}"],
                   capture_output=True, check=True)
    return {"table": table, "fat": fat, "root": tree_view(dump)}


def assert_same(ours: Any, theirs: Any) -> None:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        differing = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        assert not differing, "\n".join(f"{k}: aosbuild {ours.get(k)} osbuild {theirs.get(k)}" for k in differing)
    assert ours == theirs


def build_with_both(aosbuild: Aosbuild, library: Path, manifest: dict[str, Any], *exports: str) -> Run:
    """The manifest built with `library` by osbuild (its own store, into `workdir/osbuild`) and by aosbuild
    (into its output directory), exporting `exports`; both must succeed. aosbuild's run."""
    path = aosbuild.write_manifest(manifest)
    export_args = [arg for name in exports for arg in ("--export", name)]
    theirs = OsbuildOracle(libdir=library)("--store", str(aosbuild.workdir / "osbuild-store"), *export_args,
                                           "--output-directory", str(aosbuild.workdir / "osbuild"), str(path),
                                           timeout=300)
    assert theirs.returncode == 0, theirs.stdout[-3000:] + theirs.stderr
    ours = aosbuild(path, "--libdir", str(library), *export_args, "--output-directory", str(aosbuild.output))
    assert ours.returncode == 0, ours.stdout[-3000:] + ours.stderr
    return ours


# -- the build ----------------------------------------------------------------------------------------------

def test_the_manifest_is_made_of_30_stages_of_osbuilds_library(osbuild_oracle: OsbuildOracle) -> None:
    stages = [s["type"] for p in library_manifest.manifest()["pipelines"] for s in p["stages"]]
    assert len(stages) >= 30
    assert all((osbuild_oracle.libdir / "stages" / name).is_file() for name in stages)


def test_both_build_it(builds: Builds) -> None:
    assert builds.osbuild_run.returncode == 0, builds.osbuild_run.stdout[-3000:] + builds.osbuild_run.stderr
    assert builds.aosbuild_run.returncode == 0, builds.aosbuild_run.stdout[-3000:] + builds.aosbuild_run.stderr
    assert builds.bundled_run.returncode == 0, builds.bundled_run.stdout[-3000:] + builds.bundled_run.stderr
    # every pipeline's first stage is bundled: the bundled build names aosbuild's runner for each, the other
    # osbuild's (org.osbuild.debian12 and org.osbuild.debian, here)
    def runners(run: Run) -> set[str]:
        return {line.split()[1] for line in run.stdout.splitlines() if line.startswith("  runner: ")}

    assert runners(builds.bundled_run)
    assert runners(builds.bundled_run).isdisjoint(runners(builds.aosbuild_run))
    bundled = [s["type"] for p in library_manifest.manifest()["pipelines"] for s in p["stages"]
               if (BUNDLED_ROOT / "stages" / s["type"]).is_file()]
    assert len(bundled) >= 30  # stages (32 now) that the bundled build ran as aosbuild's
    # the same ids: both computed them from the same manifest
    pipelines = [line.split() for line in builds.osbuild_run.stdout.split("Pipelines")[-1].splitlines()
                 if line.strip().endswith(tuple("0123456789abcdef")) and ":" in line]
    assert pipelines
    for name, pipeline_id in pipelines:
        assert f"{name}" in builds.aosbuild_run.stdout
        assert pipeline_id in builds.aosbuild_run.stdout


# each comparison twice: aosbuild running osbuild's stages, and aosbuild running its bundled ones
BOTH = pytest.mark.parametrize("which", ["library", "bundled"])


@BOTH
def test_the_trees_are_identical(builds: Builds, which: str) -> None:
    ours, theirs = tree_view(builds.ours(which) / "os"), tree_view(builds.osbuild / "os")
    assert len(theirs) > 40
    assert_same(ours, theirs)
    # what the stages did is there, as osbuild did it (a few spot checks of the comparison's material)
    assert (builds.ours(which) / "os/etc/hostname").read_text() == "oracle-host\n"
    assert ours["home/alice"][2:4] == (1001, 1100)
    assert ours["usr/bin/oracle-true"][4] == "/usr/bin/true"
    assert (builds.ours(which) / "os/etc/systemd/system/multi-user.target.wants/oracle.service").is_symlink()


@BOTH
@pytest.mark.parametrize(("pipeline", "filename"), [
    ("archive", "os.tar"), ("xz", "os.tar.xz"), ("zstd", "os.tar.zst"), ("gzip", "os.tar.gz")])
def test_the_archives_are_identical(builds: Builds, pipeline: str, filename: str, which: str) -> None:
    def view(root: Path) -> list[tuple[Any, ...]]:
        path = root / pipeline / filename
        if filename.endswith(".xz"):
            with lzma.open(path) as f:
                return tar_view(f)
        if filename.endswith(".gz"):
            with gzip.open(path) as f:
                return tar_view(f)
        if filename.endswith(".zst"):
            raw = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
            plain = builds.scratch / f"{root.name}-{filename}.tar"
            plain.write_bytes(raw)
            with plain.open("rb") as f:
                return tar_view(f)
        with path.open("rb") as f:
            return tar_view(f)

    # the members, not their order: tar writes a directory in readdir order, which is the filesystem's
    # own (an overlay of layers lists a directory otherwise than one plain tmpfs directory does)
    ours, theirs = sorted(view(builds.ours(which))), sorted(view(builds.osbuild))
    assert len(theirs) > 40
    assert ours == theirs
    assert tree_view(builds.ours(which) / pipeline).keys() == tree_view(builds.osbuild / pipeline).keys()


@BOTH
def test_the_disk_and_its_filesystems_are_identical(builds: Builds, which: str) -> None:
    ours = disk_view(builds.ours(which) / "image/disk.img", builds.scratch)
    theirs = disk_view(builds.osbuild / "image/disk.img", builds.scratch)
    assert theirs["table"]["id"] == library_manifest.DISK_UUID.upper()
    assert "lost+found" in theirs["root"]
    assert "etc/hostname" in theirs["root"]
    assert_same(ours, theirs)


@BOTH
def test_the_qcow2_is_identical(builds: Builds, which: str) -> None:
    def view(root: Path) -> dict[str, Any]:
        qcow2 = root / "qcow2/disk.qcow2"
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(qcow2)], capture_output=True,
                                         text=True, check=True).stdout)
        raw = builds.scratch / f"{root.name}-disk.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(raw)], check=True)
        return {"format": info["format"], "virtual-size": info["virtual-size"],
                "disk": disk_view(raw, builds.scratch)}

    theirs = view(builds.osbuild)
    assert theirs["format"] == "qcow2"
    assert_same(view(builds.ours(which)), theirs)


# -- one build, both kinds of stages ------------------------------------------------------------------------

def test_osbuild_and_aosbuild_stages_in_one_pipeline(test_library: Path, aosbuild: Aosbuild) -> None:
    """osbuild's mkdir and hostname, a stage using osbuild's API for metadata, aosbuild's own test stage
    (its JSON-RPC channel, its runner), in one pipeline; osbuild's metadata comes out as osbuild reports it."""
    api_stage: dict[str, Any] = {"type": RAISE_STAGE, "options": {"metadata": {"answer": 42, "from": "osbuild.api"}}}
    m: dict[str, Any] = {"version": "2", "pipelines": [{"name": "os", "stages": [
        {"type": "org.osbuild.mkdir", "options": {"paths": [{"path": "/etc"}]}},
        {"type": "org.aosbuild.test.files", "options": {"seed": "mixed", "count": 1, "size": 64}},
        {"type": "org.osbuild.hostname", "options": {"hostname": "mixed"}},
        api_stage]}]}
    ours = aosbuild(m, "--libdir", str(test_library), "--json", "--export", "os", "--output-directory",
                    str(aosbuild.output))
    assert ours.returncode == 0, ours.stdout[-3000:] + ours.stderr
    tree = aosbuild.output / "os"
    assert (tree / "etc/hostname").read_text() == "mixed\n"
    assert (tree / "mixed-0").stat().st_size == 64
    assert json.loads((tree / "osbuild-api-options.json").read_text()) == api_stage["options"]
    metadata = json.loads(ours.stdout)["metadata"]["os"]
    assert {"seed": "mixed", "files": 1} in metadata.values()

    # osbuild (which cannot run aosbuild's stage) reports the metadata as aosbuild does, without that stage
    del m["pipelines"][0]["stages"][1]
    path = aosbuild.write_manifest(m, "osbuild.json")
    theirs = OsbuildOracle(libdir=test_library)("--store", str(aosbuild.workdir / "osbuild-store"), "--json",
                                                "--export", "os", "--output-directory",
                                                str(aosbuild.workdir / "osbuild-out"), str(path))
    assert theirs.returncode == 0, theirs.stdout + theirs.stderr
    their_metadata = json.loads(theirs.stdout)["metadata"]["os"]
    assert list(their_metadata.values()) == [api_stage["options"]["metadata"]]
    again = aosbuild(m, "--libdir", str(test_library), "--json", "--export", "os", "--output-directory",
                     str(aosbuild.output))
    assert json.loads(again.stdout)["metadata"]["os"] == their_metadata


def test_a_stage_sees_what_osbuild_gives_it(test_library: Path, aosbuild: Aosbuild) -> None:
    """Arguments, environment, capabilities (with the metadata's CAP_MAC_ADMIN), /run/osbuild, /etc, /var,
    /dev, /proc/cmdline and argv of a stage with a tree input, a loop device and an ext4 mount: a test stage
    of the library writes them down, under osbuild and under aosbuild (loop device numbers aside)."""
    lib = library_manifest
    disk = {"disk": lib.loopback("disk.img")}
    m = {"version": "2", "pipelines": [
        {"name": "os", "stages": [lib.stage("org.osbuild.mkdir", {"paths": [{"path": "/etc"}]})]},
        {"name": "image", "stages": [
            lib.stage("org.osbuild.truncate", {"filename": "disk.img", "size": "16MiB"}),
            lib.stage("org.osbuild.mkfs.ext4", {"uuid": lib.ROOT_UUID}, devices={"device": disk["disk"]}),
            lib.stage("org.aosbuild.test.osbuild-contract", {}, inputs={"tree": lib.tree_input("os")},
                      devices=disk,
                      mounts=[{"name": "root", "type": "org.osbuild.ext4", "source": "disk", "target": "/"}])]}]}
    build_with_both(aosbuild, test_library, m, "image")
    their_contract = json.loads((aosbuild.workdir / "osbuild/image/contract.json").read_text())
    our_contract = json.loads((aosbuild.output / "image/contract.json").read_text())
    assert their_contract["mounted"] == {"root": True}
    # the one difference on purpose: where the host's bounding set lacks a capability osbuild asks for,
    # bwrap gives osbuild's stages every capability; aosbuild asks for what the host can give, and the
    # stage gets exactly that (CapEff, CapPrm), the metadata's CAP_MAC_ADMIN included
    intended = capability_mask(stage_capabilities(bounding_set(), ("CAP_MAC_ADMIN",)))
    assert [int(mask, 16) for mask in our_contract.pop("caps")][:2] == [intended, intended]
    assert intended >> CAP_BITS["CAP_MAC_ADMIN"] & 1
    their_contract.pop("caps")
    assert_same(our_contract, their_contract)


# -- failures -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def test_library(osbuild_oracle: OsbuildOracle) -> Iterator[Path]:
    """osbuild's library with the tests' stages that use its API (both osbuild and aosbuild run this one)."""
    with tempfile.TemporaryDirectory(dir=FAST_TMP, prefix="aosbuild-osbuild-lib-") as d:
        yield runnable_library(osbuild_oracle.libdir, Path(d) / "lib")


def raising_manifest(**options: Any) -> dict[str, Any]:
    return {"version": "2", "pipelines": [{"name": "os", "stages": [
        {"type": "org.osbuild.mkdir", "options": {"paths": [{"path": "/etc"}]}},
        {"type": RAISE_STAGE, "options": options}]}]}


def test_an_exception_of_an_osbuild_stage_is_reported_as_osbuild_reports_it(
        test_library: Path, aosbuild: Aosbuild) -> None:
    m = raising_manifest(message="the disk is on fire")
    path = aosbuild.write_manifest(m)
    theirs = OsbuildOracle(libdir=test_library)("--store", str(aosbuild.workdir / "osbuild-store"), "--json",
                                                "--export", "os", "--output-directory",
                                                str(aosbuild.workdir / "osbuild-out"), str(path))
    assert theirs.returncode == 1, theirs.stdout + theirs.stderr
    their_error = json.loads(theirs.stdout)["error"]["details"]["stage"]["error"]
    assert their_error["data"]["type"] == "ValueError"

    out = aosbuild.output
    human = aosbuild(m, "--libdir", str(test_library), "--export", "os", "--output-directory", str(out))
    as_json = aosbuild(m, "--libdir", str(test_library), "--json", "--export", "os", "--output-directory",
                       str(out))
    stream = aosbuild(m, "--libdir", str(test_library), "--monitor", "jsonseq", "--export", "os",
                      "--output-directory", str(out))
    assert human.returncode == as_json.returncode == stream.returncode == 1
    assert "ValueError: the disk is on fire" in human.stderr, human.stderr
    assert not any(line.startswith("Traceback") for line in human.stderr.splitlines())
    our_error = json.loads(as_json.stdout)["error"]["details"]["stage"]["error"]
    assert {k: our_error["data"][k] for k in ("type", "value")} == \
        {k: their_error["data"][k] for k in ("type", "value")} == {"type": "ValueError", "value": "the disk is on fire"}
    assert our_error["type"] == their_error["type"] == "exception"
    check_jsonseq(stream.stdout)
    results = [r["result"] for r in stream.jsonseq() if r.get("result", {}).get("name") == RAISE_STAGE]
    assert results
    assert results[-1]["success"] is False
    assert {k: results[-1]["error"]["data"][k] for k in ("type", "value")} == \
        {"type": "ValueError", "value": "the disk is on fire"}


def test_a_failing_stage_of_osbuilds_library_shows_its_exception(osbuild_oracle: OsbuildOracle,
                                                                 aosbuild: Aosbuild) -> None:
    # osbuild's sshd.config edits the tree's sshd_config, which this tree lacks: the stage's own traceback
    m = {"version": "2", "pipelines": [{"name": "os", "stages": [
        {"type": "org.osbuild.mkdir", "options": {"paths": [{"path": "/etc/ssh", "parents": True}]}},
        {"type": "org.osbuild.sshd.config", "options": {"config": {"PasswordAuthentication": False}}}]}]}
    run = aosbuild(m, "--libdir", str(osbuild_oracle.libdir), "--export", "os", "--output-directory",
                   str(aosbuild.output))
    assert run.returncode == 1
    assert "org.osbuild.sshd.config" in run.stderr
    assert "FileNotFoundError: [Errno 2] No such file or directory: '/run/osbuild/tree/etc/ssh/sshd_config'" \
        in run.stderr, run.stderr


@pytest.mark.usefixtures("nodev_store")
def test_ctrl_c_during_an_osbuild_stage_with_a_mount_leaves_nothing(test_library: Path,
                                                                    aosbuild: Aosbuild) -> None:
    """An osbuild-library stage sleeps with a loop device attached and its ext4 filesystem mounted (by the
    runner, in the sandbox); SIGINT then leaves no process, mount, loop device or staging entry."""
    device = {"disk": library_manifest.loopback("disk.img")}
    m: dict[str, object] = {"version": "2", "pipelines": [{"name": "os", "stages": [
        {"type": "org.osbuild.truncate", "options": {"filename": "disk.img", "size": "16MiB"}},
        {"type": "org.osbuild.mkfs.ext4", "options": {"uuid": library_manifest.ROOT_UUID},
         "devices": {"device": device["disk"]}},
        {"type": RAISE_STAGE, "options": {"sleep": 60, "message": "never"}, "devices": device,
         "mounts": [{"name": "root", "type": "org.osbuild.ext4", "source": "disk", "target": "/"}]}]}]}
    proc = start(aosbuild, m, "--libdir", str(test_library), "--monitor", "jsonseq", "--export", "os",
                 "--output-directory", str(aosbuild.output))
    seen = wait_for_message(proc, "sleeping in")
    assert b"sleeping in root at /run/osbuild/mounts/., mounted: True" in seen
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    run = finish(proc, timeout=60)
    assert run.returncode == 130, run.stderr
    assert time.monotonic() - started < 30
    assert "Traceback" not in run.stderr
    assert_clean(aosbuild)


# -- host services: mounts aosbuild has no native version of ----------------------------------------------

def host_mounts_manifest(last: dict[str, Any] | None = None) -> dict[str, Any]:
    """A stage with an ext4 mount and a `org.osbuild.noop` one, which aosbuild runs as osbuild's host
    services (all of the stage's mounts, so they are made in order), mounted on the host as osbuild does."""
    lib = library_manifest
    disk = {"disk": lib.loopback("disk.img")}
    mounts = [{"name": "root", "type": "org.osbuild.ext4", "source": "disk", "target": "/"},
              {"name": "srv", "type": "org.osbuild.noop", "source": "disk", "target": "/srv"}]
    copy = lib.stage("org.osbuild.copy", {"paths": [
        {"from": "input://tree/etc", "to": "mount://root/"},
        {"from": "input://tree/etc/hostname", "to": "mount://srv/hostname"}]},
        inputs={"tree": lib.tree_input("os")}, devices=disk, mounts=mounts)
    small_os = {"name": "os", "stages": [lib.stage("org.osbuild.mkdir", {"paths": [{"path": "/etc"}]}),
                                         lib.stage("org.osbuild.hostname", {"hostname": "oracle-host"})]}
    m: dict[str, Any] = {"version": "2", "pipelines": [small_os, {"name": "image", "stages": [
        lib.stage("org.osbuild.truncate", {"filename": "disk.img", "size": "16MiB"}),
        lib.stage("org.osbuild.mkfs.ext4", {"uuid": lib.ROOT_UUID}, devices={"device": disk["disk"]}),
        copy, *([{**last, "devices": disk, "mounts": mounts}] if last else [])]}]}
    return m


def ext4_view(image: Path, scratch: Path) -> dict[str, tuple[Any, ...]]:
    dump = Path(tempfile.mkdtemp(dir=scratch, prefix="rdump-"))
    subprocess.run(["debugfs", "-R", f"rdump / {dump}", str(image)], capture_output=True, check=True)
    return tree_view(dump)


def test_mounts_through_osbuilds_host_services_match_osbuild(osbuild_oracle: OsbuildOracle,
                                                             test_library: Path, aosbuild: Aosbuild) -> None:
    m = host_mounts_manifest()
    path = aosbuild.write_manifest(m)
    theirs = OsbuildOracle(libdir=test_library)("--store", str(aosbuild.workdir / "osbuild-store"), "--export",
                                                "image", "--output-directory", str(aosbuild.workdir / "osbuild"),
                                                str(path), timeout=300)
    assert theirs.returncode == 0, theirs.stdout[-2000:] + theirs.stderr
    ours = aosbuild(m, "--libdir", str(osbuild_oracle.libdir), "--export", "image", "--output-directory",
                    str(aosbuild.output))
    assert ours.returncode == 0, ours.stdout[-2000:] + ours.stderr
    # the service's own lines, as osbuild logs them
    assert "mount/root (org.osbuild.ext4): mounting /dev/loop" in ours.stdout
    view = ext4_view(aosbuild.output / "image/disk.img", aosbuild.workdir)
    assert view["etc/hostname"][4] == view["srv/hostname"][4] == hashlib.sha256(b"oracle-host\n").hexdigest()
    assert_same(view, ext4_view(aosbuild.workdir / "osbuild/image/disk.img", aosbuild.workdir))


@pytest.mark.usefixtures("nodev_store")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
def test_a_signal_while_host_services_hold_mounts_leaves_nothing(test_library: Path, aosbuild: Aosbuild,
                                                                 signum: int) -> None:
    """SIGINT: the engine closes the services' sockets and waits for them to unmount. SIGKILL: the
    socket closes with the engine, and the services unmount and exit on their own."""
    sleeper = {"type": RAISE_STAGE, "options": {"sleep": 60, "message": "never"}}
    proc = start(aosbuild, host_mounts_manifest(sleeper), "--libdir", str(test_library), "--monitor", "jsonseq",
                 "--export", "image", "--output-directory", str(aosbuild.output))
    seen = wait_for_message(proc, "sleeping in")
    assert b"sleeping in root at /run/osbuild/mounts/., mounted: True" in seen
    proc.send_signal(signum)
    assert_services_cleaned_up(aosbuild, proc, signum)


def assert_services_cleaned_up(aosbuild: Aosbuild, proc: subprocess.Popen[bytes], signum: int) -> None:
    """After `signum` to a build whose stage holds host services: SIGINT ends it with 130 and nothing
    left; after SIGKILL nothing waits for the services: they unmount and exit by themselves, and the loop
    device (autoclear) goes with its last user; the staging entries are for the next build to remove."""
    run = finish(proc, timeout=60)
    assert run.returncode == (130 if signum == signal.SIGINT else -signal.SIGKILL), run.stderr
    if signum == signal.SIGKILL:
        def below_store() -> list[str]:
            return [str(m) for m in mounts_under(aosbuild.store) if m.point != str(aosbuild.store)]

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (below_store() or loops_backed_by(aosbuild.store)):
            time.sleep(0.2)
        assert below_store() == []
        assert loops_backed_by(aosbuild.store) == []
        return
    assert "Traceback" not in run.stderr
    assert_clean(aosbuild)
