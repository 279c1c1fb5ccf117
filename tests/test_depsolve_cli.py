"""`aosbuild depsolve`'s flags on the command line, against a real apt repository the test makes.

The repository is built once per module with dpkg-deb and apt-ftparchive (apt-utils) and served on
127.0.0.1: bookworm with its -updates and -security suites (newer versions of two packages), trixie, and
two extra repositories for `--repo`. It is unsigned, so every source says `trusted=yes`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from .conftest import FAST_TMP
from .test_depsolve import Repo

ARCH = "amd64"


@dataclass(frozen=True)
class Pkg:
    name: str
    version: str
    fields: dict[str, str] = field(default_factory=dict)
    architecture: str = ARCH


# (archive directory, suite, component) -> its packages
ARCHIVES: dict[tuple[str, str, str], tuple[Pkg, ...]] = {
    ("debian", "bookworm", "main"): (
        Pkg("base", "1.0", {"Essential": "yes", "Priority": "required"}),
        Pkg("lib", "1.0"),
        Pkg("helper", "1.0"),
        Pkg("tool", "1.0", {"Depends": "lib (>= 1.0)", "Recommends": "helper"}),
    ),
    ("debian", "bookworm", "contrib"): (Pkg("contrib-tool", "1.0", {"Depends": "lib"}),),
    ("debian", "bookworm-updates", "main"): (Pkg("lib", "1.1"),),
    ("debian-security", "bookworm-security", "main"): (
        Pkg("tool", "1.0+deb12u1", {"Depends": "lib (>= 1.0)", "Recommends": "helper"}),),
    ("debian", "trixie", "main"): (
        Pkg("base", "2.0", {"Essential": "yes", "Priority": "required"}),
        Pkg("tool", "2.0", {"Depends": "libnew"}),
        Pkg("libnew", "2.0"),
    ),
    ("extra", "stable", "main"): (Pkg("extra-tool", "3.0", {"Depends": "lib"}),),
    ("other", "stable", "contrib"): (Pkg("other-tool", "4.0", {"Depends": "extra-tool"}),),
}


def build_deb(pkg: Pkg, pool: Path, scratch: Path) -> None:
    root = scratch / f"{pkg.name}-{pkg.version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr" / "share" / "doc" / pkg.name).mkdir(parents=True)
    (root / "usr" / "share" / "doc" / pkg.name / "README").write_text(f"{pkg.name} {pkg.version}\n")
    control = {"Package": pkg.name, "Version": pkg.version, "Architecture": pkg.architecture,
               "Maintainer": "aosbuild tests <tests@example.invalid>", "Priority": "optional",
               "Description": f"{pkg.name} for aosbuild's depsolve tests", **pkg.fields}
    (root / "DEBIAN" / "control").write_text("".join(f"{k}: {v}\n" for k, v in control.items()))
    pool.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(root),
                    str(pool / f"{pkg.name}_{pkg.version}_{pkg.architecture}.deb")],
                   check=True, capture_output=True)


def write_archives(www: Path) -> None:
    scratch = www.parent / "debs"
    for (archive, suite, component), pkgs in ARCHIVES.items():
        top = www / archive
        pool = Path("pool") / suite / component
        for pkg in pkgs:
            build_deb(pkg, top / pool, scratch)
        binary = top / "dists" / suite / component / f"binary-{ARCH}"
        binary.mkdir(parents=True)
        index = subprocess.run(["apt-ftparchive", "packages", str(pool)], cwd=top, check=True,
                               capture_output=True, text=True).stdout
        (binary / "Packages").write_text(index)
    for archive, suite in {(a, s) for a, s, _ in ARCHIVES}:
        components = sorted(c for a, s, c in ARCHIVES if (a, s) == (archive, suite))
        dists = www / archive / "dists" / suite
        release = subprocess.run(
            ["apt-ftparchive", "release", "-o", f"APT::FTPArchive::Release::Suite={suite}",
             "-o", f"APT::FTPArchive::Release::Codename={suite}",
             "-o", f"APT::FTPArchive::Release::Architectures={ARCH}",
             "-o", f"APT::FTPArchive::Release::Components={' '.join(components)}", "."],
            cwd=dists, check=True, capture_output=True, text=True).stdout
        (dists / "Release").write_text(release)


@pytest.fixture(scope="module")
def archives() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir=FAST_TMP, prefix="aosbuild-test-apt-") as d:
        write_archives(Path(d) / "www")
        yield Path(d) / "www"


@pytest.fixture
def server(archives: Path, workdir: Path) -> Iterator[Repo]:
    www = workdir / "www"
    shutil.copytree(archives, www)
    with Repo(www) as repo:
        yield repo


def base_url(repo: Repo) -> str:
    return repo.url.removesuffix("/debian")


@pytest.fixture
def apt_etc(workdir: Path, server: Repo) -> Path:
    """A host-like apt configuration: bookworm, its -updates and its -security entries."""
    url = base_url(server)
    etc = workdir / "etc-apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(f"deb [trusted=yes] {url}/debian bookworm main\n"
                                      f"deb [trusted=yes] {url}/debian bookworm-updates main\n")
    (etc / "sources.list.d" / "security.sources").write_text(
        f"Types: deb\nURIs: {url}/debian-security\nSuites: bookworm-security\nComponents: main\n"
        "Trusted: yes\n")
    return etc


@dataclass
class Depsolve:
    apt_etc: Path
    cache: Path

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "aosbuild", "depsolve", "--apt-sources", str(self.apt_etc),
                               "--cache", str(self.cache), "--arch", ARCH, "--variant", "custom", *args],
                              capture_output=True, text=True, timeout=120)

    def packages(self, *args: str) -> list[tuple[str, str, str]]:
        """(name, version, URL path) of the resolved packages, in installation order."""
        run = self(*args)
        assert run.returncode == 0, run.stderr
        document: dict[str, Any] = json.loads(run.stdout)
        items = document["sources"]["org.osbuild.curl"]["items"]
        assert list(items) == [p["checksum"] for p in document["packages"]]
        return [(p["name"], p["version"], "/" + unquote(p["url"]).split("/", 3)[3]) for p in document["packages"]]


@pytest.fixture
def depsolve(apt_etc: Path, workdir: Path) -> Depsolve:
    return Depsolve(apt_etc, workdir / "cache")


def test_the_debs_are_real(archives: Path) -> None:
    deb = next((archives / "debian" / "pool" / "bookworm" / "main").glob("tool_*.deb"))
    fields = subprocess.run(["dpkg-deb", "--field", str(deb), "Package", "Depends", "Recommends"],
                            capture_output=True, text=True, check=True).stdout
    assert fields == "Package: tool\nDepends: lib (>= 1.0)\nRecommends: helper\n"


def test_updates_and_security_by_default_and_no_updates(depsolve: Depsolve) -> None:
    assert depsolve.packages("tool") == [
        ("lib", "1.1", "/debian/pool/bookworm-updates/main/lib_1.1_amd64.deb"),
        ("tool", "1.0+deb12u1", "/debian-security/pool/bookworm-security/main/tool_1.0+deb12u1_amd64.deb")]
    assert depsolve.packages("--no-updates", "tool") == [
        ("lib", "1.0", "/debian/pool/bookworm/main/lib_1.0_amd64.deb"),
        ("tool", "1.0", "/debian/pool/bookworm/main/tool_1.0_amd64.deb")]


def test_recommends(depsolve: Depsolve) -> None:
    assert [name for name, _, _ in depsolve.packages("--no-updates", "tool")] == ["lib", "tool"]
    assert sorted(name for name, _, _ in depsolve.packages("--no-updates", "--recommends", "tool")) == \
        ["helper", "lib", "tool"]


def test_repo_is_repeatable(depsolve: Depsolve, server: Repo) -> None:
    url = base_url(server)
    resolved = depsolve.packages("--no-updates", "--repo", f"[trusted=yes] {url}/extra stable main",
                                 "--repo", f"[trusted=yes] {url}/other stable contrib", "other-tool")
    assert resolved == [("lib", "1.0", "/debian/pool/bookworm/main/lib_1.0_amd64.deb"),
                        ("extra-tool", "3.0", "/extra/pool/stable/main/extra-tool_3.0_amd64.deb"),
                        ("other-tool", "4.0", "/other/pool/stable/contrib/other-tool_4.0_amd64.deb")]
    # without the second repository its package does not exist
    missing = depsolve("--no-updates", "--repo", f"[trusted=yes] {url}/extra stable main", "other-tool")
    assert missing.returncode == 1
    assert "other-tool" in missing.stderr


def test_suite_and_components(depsolve: Depsolve) -> None:
    run = depsolve("--suite", "trixie", "--variant", "minbase", "tool")
    assert run.returncode == 0, run.stderr
    # the host has no trixie entry: its bookworm mirror carries trixie too, and it says so
    assert "no apt source for trixie on this host; using the mirror of its bookworm entry" in run.stderr
    assert [(p["name"], p["version"]) for p in json.loads(run.stdout)["packages"]] == [
        ("base", "2.0"), ("libnew", "2.0"), ("tool", "2.0")]
    assert depsolve("--no-updates", "contrib-tool").returncode == 1
    assert depsolve.packages("--no-updates", "--components", "main,contrib", "contrib-tool") == [
        ("lib", "1.0", "/debian/pool/bookworm/main/lib_1.0_amd64.deb"),
        ("contrib-tool", "1.0", "/debian/pool/bookworm/contrib/contrib-tool_1.0_amd64.deb")]


def test_refresh_and_its_fallback(depsolve: Depsolve, server: Repo) -> None:
    depsolve.packages("--no-updates", "tool")
    fetched = server.release_fetches()
    depsolve.packages("--no-updates", "lib")
    assert server.release_fetches() == fetched, "fresh indices were fetched again"
    depsolve.packages("--no-updates", "--refresh", "lib")
    assert server.release_fetches() > fetched
    # a day-old cache whose mirror fails: the old indices, with a warning
    server.failing = True
    (root,) = [p for p in depsolve.cache.iterdir() if p.is_dir()]
    day_old = time.time() - 25 * 3600
    os.utime(root / "updated", (day_old, day_old))
    stale = depsolve("--no-updates", "tool")
    assert stale.returncode == 0, stale.stderr
    assert "Warning: could not refresh the package indices" in stale.stderr
    assert [p["name"] for p in json.loads(stale.stdout)["packages"]] == ["lib", "tool"]
    # --refresh asks for new indices: failing to get them is an error
    refused = depsolve("--no-updates", "--refresh", "tool")
    assert refused.returncode == 1
    assert "apt-get update failed" in refused.stderr
    assert refused.stdout == ""


def test_an_unsigned_mirror_needs_mirror_trusted(depsolve: Depsolve, server: Repo) -> None:
    mirror = f"{base_url(server)}/debian"
    refused = depsolve("--mirror", mirror, "tool")
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert ("Error: apt-get update failed (apt's messages below): a repository's signature could not be checked: "
            "give its key with [signed-by=KEYRING] in its entry or, for an unsigned repository of your own, trust "
            "it with --mirror-trusted") in refused.stderr
    assert f"The repository '{mirror} bookworm Release' is not signed." in refused.stderr
    # the mirror alone: no -updates or -security from the host's sources
    assert depsolve.packages("--mirror", mirror, "--mirror-trusted", "tool") == [
        ("lib", "1.0", "/debian/pool/bookworm/main/lib_1.0_amd64.deb"),
        ("tool", "1.0", "/debian/pool/bookworm/main/tool_1.0_amd64.deb")]
