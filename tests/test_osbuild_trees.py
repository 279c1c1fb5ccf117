"""aosbuild's bundled `org.osbuild.*` file stages leave the tree osbuild 191's own stages leave.

One manifest of 23 file and configuration stages (accounts, systemd units, fstab, kernel command line,
links, modes...) is built twice: by osbuild 191 itself, run from its library as the oracle (it needs root
and bubblewrap), and by aosbuild with its bundled stages. The exported trees must be identical: the same
paths, types, modes, owners, contents and symlink targets.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import FAST_TMP, Aosbuild, OsbuildOracle, manifest, pipeline, stage

ACCOUNTS = {"passwd": "root:x:0:0:root:/root:/bin/bash\n", "group": "root:x:0:\nusers:x:100:\n",
            "shadow": "root:*:19000:0:99999:7:::\n", "gshadow": "root:*::\nusers:*::\n"}
ALICE = {"uid": 1000, "groups": ["wheel"], "home": "/home/alice", "shell": "/bin/sh", "password": "$6$x$y",
         "key": "ssh-ed25519 AAAA a"}
UUID = "9c6ae55b-cf88-45b8-84e8-64990759f39d"


def checksum(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def copy_in(name: str, text: str) -> dict[str, Any]:
    """Copy an inline source item to /etc/NAME: the accounts files useradd and groupadd start from."""
    files = {"type": "org.osbuild.files", "origin": "org.osbuild.source", "references": [checksum(text)]}
    copy = stage("org.osbuild.copy", paths=[{"from": f"input://f/{checksum(text)}", "to": f"tree:///etc/{name}"}])
    return {**copy, "inputs": {"f": files}}


FILE_STAGES = [
    stage("org.osbuild.mkdir", paths=[
        {"path": "/etc"}, {"path": "/var/d", "parents": True, "mode": 0o700},
        *({"path": p, "parents": True} for p in ("/usr/lib/sysctl.d", "/usr/lib/tmpfiles.d", "/usr/lib/systemd/system",
                                                 "/etc/systemd/system"))]),
    *(copy_in(name, text) for name, text in ACCOUNTS.items()),
    stage("org.osbuild.hostname", hostname="example"),
    stage("org.osbuild.locale", language="C.UTF-8"),
    stage("org.osbuild.timezone", zone="UTC"),
    stage("org.osbuild.machine-id", **{"first-boot": "yes"}),
    stage("org.osbuild.kernel-cmdline", root_fs_uuid=UUID, kernel_opts="ro quiet"),
    stage("org.osbuild.fstab", filesystems=[
        {"uuid": UUID, "path": "/", "vfs_type": "ext4", "options": "defaults", "passno": 1},
        {"label": "EFI", "path": "/boot/efi", "vfs_type": "vfat"}]),
    stage("org.osbuild.modprobe", filename="disallow.conf",
          commands=[{"command": "blacklist", "modulename": "nouveau"}]),
    stage("org.osbuild.sysctld", filename="50-x.conf", config=[{"key": "net.ipv4.ip_forward", "value": "1"}]),
    stage("org.osbuild.tmpfilesd", filename="x.conf", config=[{"type": "d", "path": "/run/x", "mode": "0755"}]),
    stage("org.osbuild.ln", paths=[{"target": "/etc/hostname", "link_name": "tree:///etc/hn", "symbolic": True}]),
    stage("org.osbuild.truncate", filename="/var/d/f", size="1K"),
    stage("org.osbuild.chmod", items={"/var/d/f": {"mode": "0600"}}),
    stage("org.osbuild.resolv-conf", nameserver=["1.1.1.1"]),
    stage("org.osbuild.groups", groups={"wheel": {"gid": 10}, "dev": {}}),
    stage("org.osbuild.users", users={"alice": ALICE}),
    stage("org.osbuild.systemd.unit.create", filename="hello.service", config={
        "Unit": {"Description": "hi"}, "Service": {"Type": "oneshot", "ExecStart": ["/bin/true"]},
        "Install": {"WantedBy": ["multi-user.target"]}}),
    stage("org.osbuild.systemd", enabled_services=["hello.service"]),
    stage("org.osbuild.keymap", keymap="de-latin1", font="eurlatgr", **{"x11-keymap": {"layouts": ["de", "us"]}}),
]
INLINE = {checksum(text): {"encoding": "base64", "data": base64.b64encode(text.encode()).decode()}
          for text in ACCOUNTS.values()}
MANIFEST = manifest(pipeline("tree", *FILE_STAGES), sources={"org.osbuild.inline": {"items": INLINE}})


@pytest.fixture(scope="session")
def osbuild_builder(osbuild_oracle: OsbuildOracle) -> Iterator[OsbuildOracle]:
    """osbuild's library, copied so that its runners are links again.

    A library copied without its symbolic links (as `../shared/osbuild-191` is) holds a runner such as
    `org.osbuild.debian` as a text file naming its target; osbuild cannot exec that, so it is made a link.
    """
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("building with osbuild needs root and bubblewrap")
    if not Path("/etc/containers").is_dir():
        pytest.skip("osbuild binds /etc/containers into every host build root: create it (mkdir /etc/containers)")
    root = Path(os.environ.get("TMPDIR", FAST_TMP or "/tmp")) / f"aosbuild-osbuild-lib-{os.getpid()}"
    shutil.copytree(osbuild_oracle.libdir, root, symlinks=True)
    try:
        for runner in (root / "runners").iterdir():
            runner.chmod(runner.lstat().st_mode | stat.S_IWUSR)
            if not runner.is_symlink() and not os.access(runner, os.X_OK):
                target = runner.read_text().strip()
                if (root / "runners" / target).exists():
                    runner.unlink()
                    runner.symlink_to(target)
        yield OsbuildOracle(libdir=root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def snapshot(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """Every path below `root`: its type and mode, owner, group, and content digest or link target."""
    found = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            what = "-> " + os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = ""
        found[str(path.relative_to(root))] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, what)
    return found


def test_file_stages_leave_osbuilds_tree(osbuild_builder: OsbuildOracle, aosbuild: Aosbuild) -> None:
    path = aosbuild.write_manifest(MANIFEST)
    theirs = aosbuild.workdir / "osbuild-out"
    run = osbuild_builder("--store", str(aosbuild.workdir / "osbuild-store"), "--export", "tree",
                          "--output-directory", str(theirs), str(path), timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = aosbuild(path, "--export", "tree", "--output-directory", str(aosbuild.output))
    assert result.returncode == 0, result.stderr
    expected, got = snapshot(theirs / "tree"), snapshot(aosbuild.output / "tree")
    assert len(expected) > 40
    differences = {p: (expected.get(p), got.get(p)) for p in expected.keys() | got.keys()
                   if expected.get(p) != got.get(p)}
    assert differences == {}
