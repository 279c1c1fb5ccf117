"""`aosbuild sample debian`'s manifest, from a package set given here (the slow build is tests/test_boot.py)."""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aosbuild import samples
from aosbuild.depsolve import DepsolveResult, Package
from aosbuild.formats import load
from aosbuild.library import Library

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
