"""`aosbuild sample debian`'s manifest, from a package set given here (the slow build is tests/test_boot.py)."""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from aosbuild import samples
from aosbuild.depsolve import DepsolveResult, Package
from aosbuild.formats import load
from aosbuild.library import Library

from .test_depsolve import Deb, Repo, write_repository

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG3w8Kpz9Jxvx3g8Hq1yq9b4T2nUuWcFvX7mV2k1r0aB someone@laptop"
# the stages a user edits; each must come after the initramfs, so that changing it does not build that again
EDITED = ("org.osbuild.hostname", "org.osbuild.users", "org.osbuild.locale", "org.osbuild.timezone",
          "org.osbuild.systemd", "org.osbuild.sshd.config", "org.osbuild.fstab", "org.osbuild.copy",
          "org.osbuild.systemd.unit.create",
          "org.aosbuild.debian.sshd-keygen")


def packages(*names: str) -> DepsolveResult:
    return DepsolveResult(packages=tuple(
        Package(name=name, version="1", architecture="amd64", size=1, url=f"http://mirror.invalid/{name}.deb",
                checksum=f"sha256:{hashlib.sha256(name.encode()).hexdigest()}") for name in names),
        repositories=(), architecture="amd64")


def sample(**overrides: Any) -> dict[str, Any]:
    args = samples.parser().parse_args([])
    values = {**vars(args), "password": "secret", "suite_version": "12", "ssh_key_text": KEY, **overrides}
    return samples.manifest(build=packages("python3"), system=packages("linux-image-amd64"),
                            args=argparse.Namespace(**values))


def os_stages(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    stages: list[dict[str, Any]] = next(p for p in manifest["pipelines"] if p["name"] == "os")["stages"]
    return stages


def test_the_sample_validates_against_the_bundled_stages() -> None:
    load(sample(), Library())


def test_edited_stages_come_after_the_initramfs_and_grub() -> None:
    types = [s["type"] for s in os_stages(sample())]
    assert types[:3] == ["org.aosbuild.debian.install", "org.aosbuild.debian.initramfs", "org.aosbuild.debian.grub2"]
    assert sorted(types[3:]) == sorted(EDITED)
    # the most edited last: a change of hostname or password reruns one or two 0.1 s stages
    assert types[-2:] == ["org.osbuild.hostname", "org.osbuild.users"]


def test_a_hostname_edit_keeps_the_ids_of_every_stage_before_it() -> None:
    """The edit loop: change the hostname in the manifest and build again."""
    original = sample()
    edited = copy.deepcopy(original)
    types = [s["type"] for s in os_stages(edited)]
    at = types.index("org.osbuild.hostname")
    os_stages(edited)[at]["options"]["hostname"] = "edited"
    first, second = ([s.id for s in m.by_name("os").stages]  # type: ignore[union-attr]
                     for m in (load(original, Library()), load(edited, Library())))
    assert first[:at] == second[:at]
    assert first[at] != second[at]
    assert types.index("org.aosbuild.debian.initramfs") < at


def test_the_ssh_key_and_no_password_login_over_ssh() -> None:
    stages = {s["type"]: s for s in os_stages(sample())}
    assert stages["org.osbuild.users"]["options"]["users"]["admin"]["keys"] == [KEY]
    assert stages["org.osbuild.sshd.config"]["options"]["config"] == {"PasswordAuthentication": False}
    assert "keys" not in {s["type"]: s for s in os_stages(sample(ssh_key_text=None))}[
        "org.osbuild.users"]["options"]["users"]["admin"]


def test_the_network_file_is_an_inline_item_named_by_its_checksum() -> None:
    manifest = sample()
    items = manifest["sources"]["org.osbuild.inline"]["items"]
    (checksum, item), = items.items()
    data = base64.b64decode(item["data"])
    assert checksum == f"sha256:{hashlib.sha256(data).hexdigest()}"
    assert b"[Match]\nType=ether\nName=en* eth*\n" in data
    assert b"DHCP=yes" in data
    copy = next(s for s in os_stages(manifest) if s["type"] == "org.osbuild.copy")
    assert copy["options"]["paths"] == [{"from": f"input://file/{checksum}",
                                         "to": "tree:///etc/systemd/network/20-ethernet.network"}]


@pytest.mark.parametrize("text", ["", "not a key\n", f"{KEY}\n{KEY}\n", "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n"])
def test_a_file_that_is_not_one_public_key_is_refused(tmp_path: Path, text: str) -> None:
    key = tmp_path / "key.pub"
    key.write_text(text)
    run = subprocess.run([sys.executable, "-m", "aosbuild", "sample", "debian", "--ssh-key", str(key)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert f"Error: --ssh-key {key}: not an OpenSSH public key" in run.stderr
    assert run.stdout == ""


def test_a_public_key_file_is_read_as_one_line(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519.pub"
    key.write_text(f"\n{KEY}\n\n")
    assert samples.read_public_key(key) == KEY


def test_mkfs_is_the_image_pipelines_last_stage() -> None:
    """The only stage that reads the `os` tree: after an edit of the system it reruns alone."""
    image = next(p for p in sample()["pipelines"] if p["name"] == "image")
    assert [s["type"] for s in image["stages"]] == ["org.osbuild.truncate", "org.osbuild.sfdisk",
                                                    "org.osbuild.grub2.inst", "org.aosbuild.mkfs.ext4.tree"]


# A local repository with every package the sample asks for (`base` is minbase's Essential: yes one), a
# second one with a package for --repo and --packages; unsigned, as a repository one makes oneself is
LOCAL_DEBS = (Deb("base", "1.0", fields={"Essential": "yes", "Priority": "required"}),
              *(Deb(name, "1.0") for name in sorted({*samples.BUILD_PACKAGES, *samples.OS_PACKAGES})))
EXTRA_DEBS = (Deb("vim", "2:9.0.1378-2"),)


@pytest.fixture
def local_repo(workdir: Path) -> Iterator[Repo]:
    www = workdir / "www"
    for suite in ("bookworm", "trixie"):
        write_repository(www / "debian", suite, LOCAL_DEBS)
    write_repository(www / "extra", "stable", EXTRA_DEBS)
    with Repo(www) as repo:
        yield repo


def sample_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aosbuild", "sample", "debian", *args],
                          capture_output=True, text=True, timeout=120)


def urls(manifest: dict[str, Any]) -> list[str]:
    return [unquote(url) for url in manifest["sources"]["org.osbuild.curl"]["items"].values()]


def test_the_sample_against_the_hosts_apt_sources_and_an_extra_repository(workdir: Path, local_repo: Repo) -> None:
    """The sample's flags from the command line, depsolved against a local repository (no network); the
    manifest it writes validates (`--inspect`)."""
    base = local_repo.url.removesuffix("/debian")
    etc = workdir / "etc-apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(f"deb [trusted=yes] {local_repo.url} bookworm main\n")
    key = workdir / "id_ed25519.pub"
    key.write_text(KEY + "\n")
    output = workdir / "debian.json"
    run = sample_command("--apt-sources", str(etc), "--cache", str(workdir / "cache"), "--no-updates",
                         "--repo", f"[trusted=yes] {base}/extra stable main", "--packages", "vim",
                         "--hostname", "vm", "--user", "bob", "--password", "pw", "--ssh-key", str(key),
                         "--size", "3G", "-o", str(output))
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # no password to print: it was given
    manifest = json.loads(output.read_text())
    pipelines = {p["name"]: p for p in manifest["pipelines"]}
    build_install, os_install = pipelines["build"]["stages"][0], pipelines["os"]["stages"][0]
    assert build_install["options"]["packages"] == list(samples.BUILD_PACKAGES)
    assert os_install["options"]["packages"] == [*samples.OS_PACKAGES, "vim"]
    assert os_install["options"]["architecture"] == "amd64"
    # every package is pinned to the local repositories; vim from the extra one
    assert all(url.startswith(f"{local_repo.url}/pool/") for url in urls(manifest) if "/vim_" not in url)
    vim = f"{base}/extra/pool/main/v/vim/vim_9.0.1378-2_amd64.deb"
    assert [url for url in urls(manifest) if "/vim_" in url] == [vim]
    assert len(urls(manifest)) == len(LOCAL_DEBS) + 1
    options = {s["type"]: s["options"] for s in pipelines["os"]["stages"]}
    assert options["org.osbuild.hostname"] == {"hostname": "vm"}
    (user,) = options["org.osbuild.users"]["users"].items()
    assert user[0] == "bob"
    assert user[1]["keys"] == [KEY]
    assert user[1]["password"].startswith("$6$")
    assert pipelines["image"]["stages"][0]["options"]["size"] == str(3 << 30)
    inspect = subprocess.run([sys.executable, "-m", "aosbuild", "--inspect", str(output)],
                             capture_output=True, text=True, timeout=60)
    assert inspect.returncode == 0, inspect.stdout + inspect.stderr
    assert [p["name"] for p in json.loads(inspect.stdout)["pipelines"]] == ["build", "os", "image", "qcow2"]


def test_the_sample_against_an_unsigned_mirror(workdir: Path, local_repo: Repo) -> None:
    """`--mirror` of an unsigned repository: refused by apt with what to do, taken with `--mirror-trusted`."""
    cache = str(workdir / "cache")
    refused = sample_command("--mirror", local_repo.url, "--cache", cache, "--password", "pw")
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert "is not signed" in refused.stderr
    assert "--mirror-trusted" in refused.stderr
    run = sample_command("--mirror", local_repo.url, "--mirror-trusted", "--suite", "trixie", "--suite-version", "13",
                         "--cache", cache, "--refresh")
    assert run.returncode == 0, run.stderr
    assert run.stderr.startswith("password of admin: ")  # a random one, printed
    manifest = json.loads(run.stdout)  # no --output: on standard output
    assert all(url.startswith(f"{local_repo.url}/pool/") for url in urls(manifest))
    assert manifest["pipelines"][0]["runner"] == "org.osbuild.debian13"
    assert {p["stages"][0]["options"]["suite"] for p in manifest["pipelines"][:2]} == {"trixie"}
    assert any(path.startswith("/debian/dists/trixie/") for path in local_repo.requests)


@pytest.mark.parametrize(("args", "message"), [
    (["--mirror-trusted"], "--mirror-trusted needs --mirror URL"),
    (["--mirror", "mirror.invalid/debian"], "--mirror: 'mirror.invalid/debian' is not a URL; give the mirror's base"),
    (["--repo", "[trusted=yes] http://127.0.0.1:9/debian"], "--repo: expected 'URI SUITE [COMPONENT ...]'"),
    (["--packages", ","], "argument --packages: ',' is not a list of package names: write them comma-separated"),
])
def test_repository_flags_that_cannot_be_right_exit_2(args: list[str], message: str) -> None:
    run = sample_command(*args)
    assert run.returncode == 2
    assert message in run.stderr
    assert run.stdout == ""
