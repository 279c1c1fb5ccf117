"""Shared fixtures: a store on tmpfs, a test library of extra stages, and running the real CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .jsonseq_check import check
from .leftovers import NODEV_SOURCE, loops_backed_by, stray_mounts
from .registry import served  # noqa: F401  # the fixture of a real registry, for every test module

TESTS = Path(__file__).resolve().parent
TEST_LIBDIR = TESTS / "lib"
REPO = TESTS.parent
# the tests' own copies: osbuild 191's --inspect output, and good and broken JSON-seq streams
GOLDEN = TESTS / "golden" / "osbuild-191"
SAMPLES = TESTS / "jsonseq-samples"
# the root disk is slow at creating files; trees and stores live on tmpfs when there is one
FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir=FAST_TMP, prefix="aosbuild-test-") as d:
        yield Path(d)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def jsonseq(self) -> list[dict[str, Any]]:
        return [json.loads(line[1:]) for line in self.stdout.split("\n") if line.startswith("\x1e")]


@dataclass
class Aosbuild:
    """Runs `python -m aosbuild` the way a user would, with the test library and a fresh store."""

    workdir: Path

    @property
    def store(self) -> Path:
        return self.workdir / "store"

    @property
    def output(self) -> Path:
        return self.workdir / "output"

    def write_manifest(self, manifest: dict[str, Any], name: str = "manifest.json") -> Path:
        path = self.workdir / name
        path.write_text(json.dumps(manifest))
        return path

    def command(self, manifest: Path | dict[str, Any], *args: str) -> list[str]:
        path = manifest if isinstance(manifest, Path) else self.write_manifest(manifest)
        return [sys.executable, "-m", "aosbuild", "--libdir", str(TEST_LIBDIR), "--store", str(self.store),
                *args, str(path)]

    def __call__(self, manifest: Path | dict[str, Any], *args: str, timeout: float = 300) -> Run:
        proc = subprocess.run(self.command(manifest, *args), capture_output=True, text=True, timeout=timeout,
                              cwd=self.workdir)
        return Run(proc.returncode, proc.stdout, proc.stderr)

    def stored_tree(self, object_id: str) -> Path:
        """A tree in the store, copied out of a mount of its layers made here (not by aosbuild's code):
        what the kernel's overlayfs shows of them, in a mount namespace that ends with the copy."""
        return merged_copy(self.store, object_id, Path(tempfile.mkdtemp(prefix="stored-", dir=self.workdir)))


MERGE_SCRIPT = 'mount -t overlay test -o "ro,redirect_dir=on,lowerdir=$1" "$2" && exec cp -a "$2/." "$3/"'


def merged_copy(store: Path, object_id: str, into: Path) -> Path:
    """The store's tree `object_id`, its layers (object.info's "layers", bottom first) merged, copied into
    `into`."""
    objects = store / "objects"
    info = json.loads((objects / object_id / "object.info").read_text())
    ids = [*info["layers"], object_id]
    into.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into.parent) as scratch:
        empty, point = Path(scratch, "empty"), Path(scratch, "point")
        empty.mkdir()
        point.mkdir()
        lowers = ":".join([*(str(objects / i / "data" / "tree") for i in reversed(ids)), str(empty)])
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", MERGE_SCRIPT, "sh",
                        lowers, str(point), str(into)], check=True)
    return into


@pytest.fixture
def aosbuild(workdir: Path) -> Aosbuild:
    return Aosbuild(workdir)


@pytest.fixture
def nodev_store(aosbuild: Aosbuild) -> Iterator[Aosbuild]:
    """The store is a tmpfs of its own mounted `nodev`, as /dev/shm and /tmp are on a stock Debian 12
    (this machine's /dev/shm is not): device stages must not depend on the store's mount options.
    Afterwards nothing may be mounted below the test's directory in any process, nor a loop device left
    attached to a file in it."""
    aosbuild.store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nodev,nosuid,size=50%", NODEV_SOURCE, str(aosbuild.store)],
                   check=True)
    try:
        yield aosbuild
        # a loop device keeps its file, and with it the store's tmpfs, busy: look before unmounting
        loops = loops_backed_by(aosbuild.workdir)
    finally:
        # a plain umount fails while anything is still mounted below the store; then take it all away
        # (lazily, so the workdir can be removed) and fail the test
        left = subprocess.run(["umount", str(aosbuild.store)], capture_output=True, text=True)
        if left.returncode != 0:
            subprocess.run(["umount", "--recursive", "--lazy", str(aosbuild.store)], check=True)
    assert loops == []
    assert left.returncode == 0, f"the store could not be unmounted: {left.stderr}"
    assert [str(m) for m in stray_mounts(aosbuild.workdir)] == []


def check_jsonseq(stream: str | bytes) -> str:
    """Check a stream with the tests' own strict checker; returns its summary line, fails the test otherwise."""
    checker = check(stream.encode() if isinstance(stream, str) else stream)
    assert not checker.problems, "\n".join(checker.problems)
    return checker.summary


@pytest.fixture(autouse=True)
def structlog_unconfigured() -> Iterator[None]:
    """`run()` called in-process (tests/test_invocation.py) configures structlog for the whole process, with
    its level filter; a later test that captures debug events (structlog.testing) must not inherit it."""
    yield
    import structlog

    structlog.reset_defaults()


def shared_dir() -> Path | None:
    """The reference material beside the checkout (`../shared`, or `$AOSBUILD_SHARED`); no test needs it."""
    path = Path(os.environ.get("AOSBUILD_SHARED") or REPO.parent / "shared")
    return path if path.is_dir() else None


@dataclass(frozen=True, slots=True)
class OsbuildOracle:
    """osbuild 191's own library, the oracle: `python -m osbuild --libdir LIBDIR`."""

    libdir: Path

    def __call__(self, *args: str, timeout: float = 60) -> Run:
        return self.python("-m", "osbuild", "--libdir", str(self.libdir), *args, timeout=timeout)

    def python(self, *args: str, timeout: float = 60) -> Run:
        """Python with osbuild's package importable (`-c CODE` asks its library what it makes of a module)."""
        env = dict(os.environ)
        if (self.libdir / "osbuild" / "__init__.py").exists():  # laid out as installed, package and all
            env["PYTHONPATH"] = str(self.libdir)
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
        return Run(proc.returncode, proc.stdout, proc.stderr)


def find_osbuild_libdir() -> Path | None:
    """`$AOSBUILD_OSBUILD_LIBDIR`, an installed osbuild's `/usr/lib/osbuild`, or `../shared/osbuild-191`."""
    shared = shared_dir()
    candidates = [os.environ.get("AOSBUILD_OSBUILD_LIBDIR"), "/usr/lib/osbuild", shared and shared / "osbuild-191"]
    for candidate in candidates:
        if not candidate or not Path(candidate, "stages").is_dir():
            continue
        path = Path(candidate)
        if (path / "osbuild" / "__init__.py").exists() or importlib.util.find_spec("osbuild") is not None:
            return path
    return None


@pytest.fixture(scope="session")
def osbuild_oracle() -> OsbuildOracle:
    """The osbuild oracle; tests that use it are skipped where there is none."""
    libdir = find_osbuild_libdir()
    if libdir is None:
        pytest.skip("no osbuild library: set AOSBUILD_OSBUILD_LIBDIR, install osbuild "
                    "or put shared/ beside the checkout")
    return OsbuildOracle(libdir=libdir)


def pipeline(name: str, *stages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "stages": list(stages), **extra}


def stage(type_: str, **options: Any) -> dict[str, Any]:
    return {"type": type_, "options": options}


def manifest(*pipelines: dict[str, Any], sources: dict[str, Any] | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {"version": "2", "pipelines": list(pipelines)}
    if sources:
        result["sources"] = sources
    return result


@dataclass(frozen=True)
class DebianSample:
    """`aosbuild sample debian` built once per session, exported: `output/os/` (the tree) and
    `output/qcow2/disk.qcow2`; the user logs in over SSH with `key` (the private half)."""

    workdir: Path
    manifest: Path
    key: Path
    build: Run
    hostname: str = "aosbuild-vm"
    user: str = "admin"
    password: str = "aosbuild-test"

    @property
    def output(self) -> Path:
        return self.workdir / "output"

    @property
    def image(self) -> Path:
        return self.output / "qcow2" / "disk.qcow2"


@pytest.fixture(scope="session")
def debian_sample() -> Iterator[DebianSample]:
    """Depsolves against the host's apt mirror, downloads ~190 MB and builds the sample (slow tests only)."""
    with tempfile.TemporaryDirectory(dir=FAST_TMP, prefix="aosbuild-sample-") as d:
        workdir = Path(d)
        key = workdir / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "aosbuild-test", "-f", str(key)],
                       check=True)
        manifest = workdir / "debian.json"
        generate = subprocess.run([sys.executable, "-m", "aosbuild", "sample", "debian",
                                   "--hostname", DebianSample.hostname, "--user", DebianSample.user,
                                   "--password", DebianSample.password, "--ssh-key", f"{key}.pub",
                                   "--output", str(manifest)], capture_output=True, text=True, timeout=300)
        assert generate.returncode == 0, generate.stderr
        build = Aosbuild(workdir)(manifest, "--export", "os", "--export", "qcow2", "--output-directory",
                                  str(workdir / "output"), "--monitor", "jsonseq", timeout=1800)
        yield DebianSample(workdir=workdir, manifest=manifest, key=key, build=build)
