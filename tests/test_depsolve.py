"""Depsolving with apt in a private root: against a small repository served on 127.0.0.1, and the real mirror.

The local repository is unsigned (`trusted=yes`) and tiny, so apt's whole path (update, solve, print the
downloads) runs in a second or two without the network. The slow test resolves against the mirror in this
host's apt configuration and checks the result against the downloaded files.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from aosbuild import aptsources, process
from aosbuild.depsolve import AptRoot, DepsolveError, DepsolveRequest, Package, combine, depsolve, open_apt_root

from .conftest import FAST_TMP

ARCH = "amd64"  # the local repository's; apt only simulates, so it need not be the host's


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    architecture: str = ARCH
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        version = self.version.split(":")[-1]
        return f"pool/main/{self.name[0]}/{self.name}/{self.name}_{version}_{self.architecture}.deb"

    @property
    def data(self) -> bytes:
        return f"not really a deb: {self.name} {self.version}\n".encode()


DEBS = (
    Deb("base", "1.0", fields={"Essential": "yes", "Priority": "required"}),
    Deb("req", "3.1-2", fields={"Priority": "required", "Depends": "base"}),
    Deb("lib", "2:1.0-1", fields={"Priority": "optional"}),
    Deb("tool", "0.9+git1", "all", fields={"Priority": "optional", "Depends": "lib (>= 2:1.0)"}),
    Deb("broken", "1", fields={"Priority": "optional", "Depends": "missing"}),
)


def write_repository(top: Path, suite: str = "bookworm", debs: tuple[Deb, ...] = DEBS) -> None:
    """An unsigned repository of `debs` at `top`: their files (not real .debs: apt only simulates), the
    Packages index and a Release file."""
    paragraphs = []
    for deb in debs:
        path = top / deb.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(deb.data)
        lines = [f"Package: {deb.name}", f"Version: {deb.version}", f"Architecture: {deb.architecture}",
                 *(f"{k}: {v}" for k, v in deb.fields.items()), f"Filename: {deb.filename}",
                 f"Size: {len(deb.data)}", f"SHA256: {hashlib.sha256(deb.data).hexdigest()}",
                 f"Description: {deb.name} for tests"]
        paragraphs.append("\n".join(lines) + "\n")
    packages = "\n".join(paragraphs).encode()
    index = top / "dists" / suite / "main" / f"binary-{ARCH}" / "Packages"
    index.parent.mkdir(parents=True)
    index.write_bytes(packages)
    (top / "dists" / suite / "Release").write_text(
        f"Suite: {suite}\nCodename: {suite}\nArchitectures: {ARCH}\nComponents: main\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\nSHA256:\n"
        f" {hashlib.sha256(packages).hexdigest()} {len(packages)} main/binary-{ARCH}/Packages\n")


class Repo:
    """A static HTTP server on 127.0.0.1 for a directory; records the paths asked for and can fail on demand."""

    def __init__(self, top: Path) -> None:
        self.requests: list[str] = []
        self.failing = False
        self.stalling = threading.Event()  # set: requests wait until it is cleared
        self.stalled = threading.Event()  # set by the first request that waits
        repo = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(top), **kwargs)

            def do_GET(self) -> None:
                repo.requests.append(self.path)
                if repo.stalling.is_set():
                    repo.stalled.set()
                    while repo.stalling.is_set():
                        repo.stalling.wait(0.05)
                if repo.failing:
                    self.send_error(404)
                else:
                    super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/debian"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def release_fetches(self) -> int:
        return sum(1 for path in self.requests if path.endswith("/InRelease"))

    def __enter__(self) -> Repo:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stalling.clear()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def repo(workdir: Path) -> Iterator[Repo]:
    write_repository(workdir / "www" / "debian")
    with Repo(workdir / "www") as server:
        yield server


@pytest.fixture
def apt_etc(workdir: Path, repo: Repo) -> Path:
    """A host-like apt configuration directory whose only source is the local repository."""
    etc = workdir / "etc-apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "local.list").write_text(f"deb [trusted=yes] {repo.url} bookworm main\n")
    return etc


@pytest.fixture
def request_(workdir: Path, apt_etc: Path) -> DepsolveRequest:
    return DepsolveRequest(packages=("tool",), variant="custom", architecture=ARCH, apt_etc=apt_etc,
                           cache=workdir / "cache")


def checksum(deb: Deb) -> str:
    return f"sha256:{hashlib.sha256(deb.data).hexdigest()}"


HOST_APT_PATHS = [Path(p) for p in ("/etc/apt", "/etc/apt/sources.list.d", "/var/lib/apt/lists",
                                    "/var/lib/dpkg/status", "/var/cache/apt", "/var/cache/apt/archives",
                                    "/var/lib/apt/extended_states", "/var/cache/apt/pkgcache.bin")]


# shipped by apt itself, so on every Debian host
HOST_HAS_AUTOREMOVE = Path("/etc/apt/apt.conf.d/01autoremove").exists()


def host_apt_mtimes() -> dict[Path, int]:
    found = [p for p in HOST_APT_PATHS if p.exists()]
    found += [p for d in ("/var/lib/apt/lists", "/var/cache/apt") for p in Path(d).glob("*") if Path(d).is_dir()]
    return {p: p.stat().st_mtime_ns for p in found}


async def test_resolves_dependencies_in_order_with_pins(request_: DepsolveRequest, repo: Repo) -> None:
    result = await depsolve(request_)
    lib, tool = DEBS[2], DEBS[3]
    # apt quotes the URL ('+' as %2b); the server does not mind
    urls = [p.url for p in result.packages]
    assert [unquote(url) for url in urls] == [f"{repo.url}/{lib.filename}", f"{repo.url}/{tool.filename}"]
    assert result.packages == (
        Package(name="lib", version="2:1.0-1", architecture=ARCH, checksum=checksum(lib), url=urls[0],
                size=len(lib.data)),
        Package(name="tool", version="0.9+git1", architecture="all", checksum=checksum(tool), url=urls[1],
                size=len(tool.data)),
    )
    assert fetch(urls[1]) == tool.data
    assert result.sources() == {"org.osbuild.curl": {"items": {checksum(lib): urls[0], checksum(tool): urls[1]}}}
    assert [r.uri for r in result.repositories] == [repo.url]
    assert result.architecture == ARCH
    assert result.warnings == ()


@pytest.mark.parametrize(("variant", "names"), [
    ("custom", ["lib", "tool"]),
    ("essential", ["base", "lib", "tool"]),
    ("minbase", ["base", "lib", "req", "tool"]),
])
async def test_variants_add_essential_and_required(request_: DepsolveRequest, variant: str,
                                                   names: list[str]) -> None:
    result = await depsolve(replace(request_, variant=variant))
    assert sorted(p.name for p in result.packages) == names


async def test_unresolvable_packages_give_apts_explanation(request_: DepsolveRequest) -> None:
    with pytest.raises(DepsolveError) as info:
        await depsolve(replace(request_, packages=("broken",)))
    assert "broken : Depends: missing but it is not installable" in info.value.output
    assert "Reading package lists" not in info.value.output
    with pytest.raises(DepsolveError) as info:
        await depsolve(replace(request_, packages=("nonesuch",)))
    assert info.value.output == "E: Unable to locate package nonesuch"


async def test_indices_are_fetched_once_a_day_or_when_asked(request_: DepsolveRequest, repo: Repo,
                                                            workdir: Path) -> None:
    await depsolve(request_)
    assert repo.release_fetches() == 1
    await depsolve(replace(request_, packages=("lib",)))
    assert repo.release_fetches() == 1, "fresh indices were fetched again"
    await depsolve(replace(request_, refresh=True))
    assert repo.release_fetches() == 2
    (root,) = (workdir / "cache").iterdir()
    day_old = time.time() - 25 * 3600
    os.utime(root / "updated", (day_old, day_old))
    await depsolve(request_)
    assert repo.release_fetches() == 3


async def test_a_failed_refresh_falls_back_to_the_cached_indices(request_: DepsolveRequest, repo: Repo,
                                                                 workdir: Path) -> None:
    await depsolve(request_)
    repo.failing = True
    (root,) = (workdir / "cache").iterdir()
    day_old = time.time() - 25 * 3600
    os.utime(root / "updated", (day_old, day_old))
    result = await depsolve(request_)
    assert [p.name for p in result.packages] == ["lib", "tool"]
    assert "could not refresh the package indices" in result.warnings[0]
    with pytest.raises(DepsolveError, match="apt-get update failed") as info:
        await depsolve(replace(request_, refresh=True))
    assert "404" in info.value.output


async def test_roots_are_keyed_by_repositories_and_architecture(workdir: Path) -> None:
    cache = workdir / "cache"
    mirror = aptsources.Repository(uri="http://mirror.invalid/debian", suites=("bookworm",), components=("main",))
    paths = []
    trixie = replace(mirror, suites=("trixie",))
    updates = replace(mirror, suites=("bookworm-updates",))
    for repositories, arch in [([mirror], "amd64"), ([mirror], "arm64"), ([trixie], "amd64"),
                               ([mirror, updates], "amd64"), ([mirror], "amd64")]:
        async with open_apt_root(cache, repositories, arch) as root:
            paths.append(root.path)
    assert len(set(paths)) == 4
    assert paths[0] == paths[-1]
    assert [p.name.rsplit("-", 1)[0] for p in paths[:3]] == ["bookworm-amd64", "bookworm-arm64", "trixie-amd64"]


async def test_the_private_root_is_all_apt_sees(request_: DepsolveRequest, workdir: Path) -> None:
    before = host_apt_mtimes()
    result = await depsolve(request_)
    assert host_apt_mtimes() == before
    async with open_apt_root(workdir / "cache", result.repositories, ARCH) as root:
        dump = await process.run(["apt-config", "dump"], env=root.env())
    config = dict(line.rstrip(";").split(" ", 1) for line in dump.splitlines() if " " in line)
    assert config["Dir"] == f'"{root.root}/"'
    assert config["Dir::State::status"] == f'"{root.root}/var/lib/dpkg/status"'
    assert config["Debug::NoLocking"] == '"true"'
    assert config["APT::Architecture"] == f'"{ARCH}"'
    for key in ("Dir::Etc", "Dir::State", "Dir::Cache", "Dir::Log"):
        assert not config[key].startswith('"/'), f"{key} leaves the private root"
    if HOST_HAS_AUTOREMOVE:  # the host's apt.conf.d is not read
        assert "APT::NeverAutoRemove" not in config
    assert (root.root / "var/lib/dpkg/status").read_text() == ""
    assert list(root.lists.glob("*_Packages"))


def test_combine_matches_order_to_downloads() -> None:
    simulated = """NOTE: This is only a simulation!
Inst libc6 (2.36-9+deb12u4 Debian:12.5/stable [amd64]) []
Inst libfoo:i386 [0.9] (1:2.0~rc1-1 Debian:12.5/stable, Debian-Security:12/stable-security [i386])
Conf libc6 (2.36-9+deb12u4 Debian:12.5/stable [amd64])
"""
    pool = "http://mirror.invalid/debian/pool/main"
    uris = f"""W: some warning
'{pool}/libf/libfoo/libfoo_2.0%7erc1-1_i386.deb' libfoo_1%3a2.0~rc1-1_i386.deb 10 SHA256:bb
'{pool}/g/glibc/libc6_2.36-9%2bdeb12u4_amd64.deb' libc6_2.36-9+deb12u4_amd64.deb 20 SHA256:aa
"""
    assert combine(simulated, uris) == (
        Package(name="libc6", version="2.36-9+deb12u4", architecture="amd64", checksum="sha256:aa", size=20,
                url="http://mirror.invalid/debian/pool/main/g/glibc/libc6_2.36-9%2bdeb12u4_amd64.deb"),
        Package(name="libfoo", version="1:2.0~rc1-1", architecture="i386", checksum="sha256:bb", size=10,
                url="http://mirror.invalid/debian/pool/main/libf/libfoo/libfoo_2.0%7erc1-1_i386.deb"),
    )
    with pytest.raises(DepsolveError, match=r"did not give a download for libc6_2\.36-9"):
        combine(simulated, "")


# the command line, as a user runs it

def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aosbuild", "depsolve", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_prints_sources_and_packages(apt_etc: Path, workdir: Path, repo: Repo) -> None:
    common = ["--apt-sources", str(apt_etc), "--cache", str(workdir / "cache"), "--arch", ARCH]
    both = cli(*common, "--variant", "custom", "tool")
    assert both.returncode == 0, both.stderr
    document = json.loads(both.stdout)
    assert [unquote(url) for url in document["sources"]["org.osbuild.curl"]["items"].values()] == [
        f"{repo.url}/{DEBS[2].filename}", f"{repo.url}/{DEBS[3].filename}"]
    assert [p["name"] for p in document["packages"]] == ["lib", "tool"]
    assert set(document["packages"][0]) == {"name", "version", "architecture", "checksum", "url", "size"}
    items = cli(*common, "--variant", "custom", "--format", "items", "tool")
    assert json.loads(items.stdout) == {"sources": document["sources"]}
    packages = cli(*common, "--variant", "custom", "--format", "packages", "tool")
    assert json.loads(packages.stdout) == {"packages": document["packages"]}


def test_cli_unresolvable_exits_1_with_apts_words(apt_etc: Path, workdir: Path) -> None:
    run = cli("--apt-sources", str(apt_etc), "--cache", str(workdir / "cache"), "--arch", ARCH, "broken")
    assert run.returncode == 1
    assert run.stdout == ""
    assert "broken : Depends: missing but it is not installable" in run.stderr
    assert "Traceback" not in run.stderr


def processes_using(config_dir: Path) -> list[int]:
    """Processes whose APT_CONFIG points into `config_dir`: apt commands of a depsolve."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"APT_CONFIG={config_dir}".encode() in environ:
            found.append(int(proc.name))
    return found


def test_cli_sigterm_stops_apt_and_exits_143(apt_etc: Path, workdir: Path, repo: Repo) -> None:
    repo.stalling.set()
    cache = workdir / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "aosbuild", "depsolve", "--apt-sources", str(apt_etc),
                             "--cache", str(cache), "--arch", ARCH, "tool"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert repo.stalled.wait(60), "apt-get update never asked the repository"
    assert processes_using(cache), "apt-get is not running"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert stdout == ""
    assert stderr == "Aborted\n"
    # apt-get itself has been waited for; its download methods end when their pipe to it closes
    deadline = time.monotonic() + 10
    while processes_using(cache) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_using(cache) == []


@pytest.mark.parametrize("args", [
    ["--no-such-option", "bash"],
    ["--variant", "custom"],
    ["--variant", "tiny", "bash"],
    ["--format", "yaml", "bash"],
    ["--repo", "http://only-a-url.invalid", "bash"],
    ["--mirror", "not a url", "bash"],
    ["--components", ",", "bash"],
    ["--", "-bash"],
])
def test_cli_bad_arguments_exit_2(args: list[str], workdir: Path) -> None:
    run = cli("--cache", str(workdir / "cache"), *args)
    assert run.returncode == 2, run.stderr
    assert "usage: aosbuild depsolve" in run.stderr
    assert not (workdir / "cache").exists()


def test_cli_without_a_source_for_the_suite_exits_1(workdir: Path) -> None:
    etc = workdir / "etc-apt"
    etc.mkdir()
    run = cli("--apt-sources", str(etc), "--cache", str(workdir / "cache"), "bash")
    assert run.returncode == 1
    assert "give one with --mirror URL" in run.stderr
    assert "Traceback" not in run.stderr


# the real thing: the mirror of this host's apt configuration

@pytest.fixture(scope="module")
def mirror_cache() -> Iterator[Path]:
    """One depsolve cache for the tests against the mirror: the indices (~9 MB) are fetched once."""
    with tempfile.TemporaryDirectory(dir=FAST_TMP, prefix="aosbuild-test-depsolve-") as d:
        yield Path(d)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        data: bytes = response.read()
        return data


def read_index(root: AptRoot) -> dict[str, dict[str, str]]:
    """Filename -> fields, for every package in the private root's Packages files."""
    entries: dict[str, dict[str, str]] = {}
    for path in root.lists.glob("*_Packages"):
        for paragraph in path.read_text().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in paragraph.splitlines() if ": " in line and line[0] != " ")
            if "Filename" in fields:
                entries[fields["Filename"]] = fields
    return entries


@pytest.mark.slow
async def test_depsolve_bash_and_coreutils_against_the_configured_mirror(mirror_cache: Path) -> None:
    mirrors = [r.uri.rstrip("/") + "/" for r in aptsources.host_repositories()]
    before = host_apt_mtimes()
    request = DepsolveRequest(packages=("bash", "coreutils"), variant="custom", cache=mirror_cache)
    result = await depsolve(request)
    assert host_apt_mtimes() == before

    names = {p.name for p in result.packages}
    assert {"bash", "coreutils", "libc6"} <= names
    assert "apt" not in names  # custom: only what bash and coreutils need
    for package in result.packages:
        assert package.checksum.startswith("sha256:")
        assert len(package.checksum) == len("sha256:") + 64
        assert any(package.url.startswith(m) for m in mirrors), package.url
    assert len(result.sources()["org.osbuild.curl"]["items"]) == len(result.packages)

    async with open_apt_root(mirror_cache, result.repositories, result.architecture) as root:
        index = read_index(root)
    for package in result.packages:
        base = next(m for m in mirrors if package.url.startswith(m))
        fields = index[unquote(package.url.removeprefix(base))]
        assert (fields["Package"], fields["Version"]) == (package.name, package.version)
        assert (f"sha256:{fields['SHA256']}", int(fields["Size"])) == (package.checksum, package.size)

    for package in sorted(result.packages, key=lambda p: p.size)[:2]:
        data = fetch(package.url)
        assert len(data) == package.size
        assert f"sha256:{hashlib.sha256(data).hexdigest()}" == package.checksum


@pytest.mark.slow
async def test_a_depsolved_set_downloads_with_sources_only(workdir: Path, mirror_cache: Path) -> None:
    """The issue's end to end check: depsolve, `--sources-only`, and the stored files match the indices."""
    result = await depsolve(DepsolveRequest(packages=("bash",), variant="custom", cache=mirror_cache))
    references: dict[str, dict[str, Any]] = {p.checksum: {} for p in result.packages}
    manifest = {"version": "2", "sources": result.sources(), "pipelines": [{"name": "os", "stages": [{
        "type": "org.aosbuild.debian.install",
        "inputs": {"packages": {"type": "org.osbuild.files", "origin": "org.osbuild.source",
                                "references": references}}}]}]}
    path = workdir / "manifest.json"
    path.write_text(json.dumps(manifest))
    store = workdir / "store"
    await process.run([sys.executable, "-m", "aosbuild", "--store", str(store), "--sources-only", "-q", str(path)])

    async with open_apt_root(mirror_cache, result.repositories, result.architecture) as root:
        index = {f"sha256:{fields['SHA256']}": fields for fields in read_index(root).values()}
    items = store / "sources" / "org.osbuild.files"
    assert sorted(p.name for p in items.iterdir()) == sorted(references)
    for package in result.packages:
        data = (items / package.checksum).read_bytes()
        assert f"sha256:{hashlib.sha256(data).hexdigest()}" == package.checksum
        assert index[package.checksum]["Package"] == package.name
        assert int(index[package.checksum]["Size"]) == len(data)
