"""Attacks by planted symlinks: every bundled stage writes inside its tree, whatever symlinks the tree holds.

An earlier stage (here org.osbuild.ln, as any manifest may use it) plants a symlink at each path a stage
writes (`/etc/hostname -> elsewhere`, ...). Each stage must then either replace the link with its own
file (the link is not followed) or refuse the location (`resolves outside its root`), never write
through it. "Elsewhere" is the one place outside the tree a stage can write and a test can read
afterwards: an ext4 file system mounted for the stage at the root of its mounts, whose image is checked
for files after the build.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from aosbuild.sandbox import MOUNTS

from .conftest import REPO, Aosbuild, manifest, pipeline, stage

# the store is a tmpfs mounted nodev, as /dev/shm is on a stock Debian 12: devices must work on it
pytestmark = pytest.mark.usefixtures("nodev_store")

CANARY_IMAGE = "canary.img"
CANARY_DEVICE = {"canary": {"type": "org.osbuild.loopback", "options": {"filename": CANARY_IMAGE}}}
CANARY_MOUNT = [{"name": "canary", "type": "org.osbuild.ext4", "source": "canary", "target": "/"}]
SRC = pipeline("src", stage("org.osbuild.mkdir", paths=[{"path": "/d"}]),
               stage("org.osbuild.truncate", filename="/zeros", size="64K"))
ARCHIVE = pipeline("archive", {**stage("org.osbuild.tar", filename="/a.tar"),
                               "inputs": {"tree": {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline",
                                                   "references": ["name:src"]}}})
ZEROS = {"file": {"type": "org.osbuild.files", "origin": "org.osbuild.pipeline",
                  "references": {"name:src": {"file": "/zeros"}}}}
SRC_TREE = {"tree": {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": ["name:src"]}}
UUID = "6e4ff95f-f662-45ee-a82a-bdf44a2d0b75"


def with_inputs(s: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    return {**s, "inputs": inputs}


# Stages that replace a symlink at what they write with their own file; the paths they write.
REPLACING: list[tuple[dict[str, Any], list[str]]] = [
    (stage("org.osbuild.hostname", hostname="planted"), ["/etc/hostname"]),
    (stage("org.osbuild.machine-id", **{"first-boot": "yes"}), ["/etc/machine-id"]),
    (stage("org.osbuild.fstab", filesystems=[{"uuid": UUID, "path": "/", "vfs_type": "ext4"}]), ["/etc/fstab"]),
    (stage("org.osbuild.locale", language="C.UTF-8"), ["/etc/locale.conf", "/etc/default/locale"]),
    (stage("org.osbuild.timezone", zone="UTC"), ["/etc/localtime"]),
    (stage("org.osbuild.resolv-conf", nameserver=["192.0.2.1"]), ["/etc/resolv.conf"]),
    (stage("org.osbuild.kernel-cmdline", kernel_opts="quiet"), ["/etc/kernel/cmdline"]),
    (stage("org.osbuild.keymap", keymap="us"), ["/etc/vconsole.conf"]),
    (stage("org.osbuild.sysctld", filename="a.conf", config=[{"key": "k", "value": "v"}]),
     ["/usr/lib/sysctl.d/a.conf"]),
    (stage("org.osbuild.modprobe", filename="a.conf", commands=[{"command": "blacklist", "modulename": "m"}]),
     ["/usr/lib/modprobe.d/a.conf"]),
    (stage("org.osbuild.tmpfilesd", filename="a.conf", config=[{"type": "d", "path": "/var/lib/a"}]),
     ["/usr/lib/tmpfiles.d/a.conf"]),
    (stage("org.osbuild.systemd.unit.create", filename="a.service",
           config={"Unit": {"Description": "a"}, "Service": {"Type": "oneshot", "ExecStart": ["/bin/true"]},
                   "Install": {"WantedBy": ["multi-user.target"]}}),
     ["/usr/lib/systemd/system/a.service"]),
    (with_inputs(stage("org.osbuild.gzip", filename="/z.gz"), ZEROS), ["/z.gz"]),
    (with_inputs(stage("org.osbuild.xz", filename="/z.xz"), ZEROS), ["/z.xz"]),
    (with_inputs(stage("org.osbuild.zstd", filename="/z.zst"), ZEROS), ["/z.zst"]),
    (with_inputs(stage("org.osbuild.qemu", filename="/z.qcow2", format={"type": "qcow2"}),
                 {"image": {**ZEROS["file"]}}), ["/z.qcow2"]),
    (with_inputs(stage("org.aosbuild.qemu", filename="/y.qcow2", format={"type": "qcow2"}),
                 {"image": {**ZEROS["file"]}}), ["/y.qcow2"]),
    (with_inputs(stage("org.aosbuild.mkfs.ext4.tree", filename="/fs.img", uuid=UUID, size=4096), SRC_TREE),
     ["/fs.img"]),
    (stage("org.aosbuild.debian.sshd-keygen"), ["/usr/lib/systemd/system/sshd-keygen.service",
                                                "/etc/systemd/system/ssh.service.wants/sshd-keygen.service"]),
]
# what the attacked stages need in the tree before them (sshd-keygen: an installed sshd)
PREPARED = [stage("org.osbuild.mkdir", paths=[{"path": "/usr/sbin", "parents": True}]),
            stage("org.osbuild.truncate", filename="/usr/sbin/sshd", size="0")]
# Stages that follow a symlink at what they write (as their tools do) only inside the tree, and refuse
# one that leads out: (stage, the path planted, what the refusal says).
REFUSING: list[tuple[dict[str, Any], str, str]] = [
    (stage("org.osbuild.truncate", filename="/t", size="1"), "/t", "resolves outside its root"),
    (stage("org.osbuild.chmod", items={"/c": {"mode": "0600"}}), "/c", "resolves outside its root"),
    (with_inputs(stage("org.osbuild.tar", filename="/t.tar"), SRC_TREE), "/t.tar", "resolves outside its root"),
    (with_inputs(stage("org.osbuild.untar", prefix="/x"), {"file": {
        "type": "org.osbuild.files", "origin": "org.osbuild.pipeline",
        "references": {"name:archive": {"file": "/a.tar"}}}}), "/x", "resolves outside its root"),
    (stage("org.osbuild.mkdir", paths=[{"path": "/m"}]), "/m", "File exists"),
    (stage("org.osbuild.copy", paths=[{"from": "tree:///" + CANARY_IMAGE, "to": "tree:///cp"}]), "/cp",
     "resolves outside its root"),
]
# Bundled stages not attacked here, and why each cannot write through a symlink in the tree (read in
# their code): they write through tools that chroot into the tree (`--root`), so an absolute link
# resolves inside it; or they write only devices; or they need a Debian tree or a disk to run at all
# and open what they write with O_NOFOLLOW or replace it first.
NOT_ATTACKED = {
    "org.osbuild.ln": "refuses a link name through a symlink out (test_confinement); os.symlink never follows",
    "org.osbuild.users": "useradd/usermod/passwd --root chroot into the tree; homes are made only where "
                         "nothing is; .ssh must not be a symlink, authorized_keys is opened O_NOFOLLOW",
    "org.osbuild.groups": "groupadd --root chroots into the tree",
    "org.osbuild.systemd": "systemctl --root resolves links inside the root; its own links replace what is there",
    "org.osbuild.sshd.config": "refuses an /etc/ssh/sshd_config that is a symlink (tests/stages/test_sshd_config)",
    "org.osbuild.chown": "lchown: never follows a symlink",
    "org.osbuild.mkfs.ext4": "writes only its device",
    "org.osbuild.mkfs.fat": "writes only its device",
    "org.osbuild.sfdisk": "writes only its device",
    "org.osbuild.grub2.inst": "needs a partitioned image; opens it O_NOFOLLOW",
    "org.aosbuild.debian.install": "mmdebstrap makes the tree; the files it replaces are unlinked first",
    "org.aosbuild.debian.initramfs": "needs a Debian tree; its config files and mount points are confined "
                                     "(resolve_confined, make_mount_point), update-initramfs runs chrooted",
    "org.aosbuild.debian.grub2": "needs a Debian tree; unlinks what it writes before creating it",
    "org.osbuild.noop": "writes nothing",
    "org.osbuild.error": "writes nothing",
}


def flat(path: str) -> str:
    return path.strip("/").replace("/", "_")


def planting(paths: list[str]) -> list[dict[str, Any]]:
    """The canary file system, then a symlink at each path into the root of the stage's mounts."""
    parents = sorted({str(Path(p).parent) for p in paths} - {"/"})
    return [
        stage("org.osbuild.truncate", filename=CANARY_IMAGE, size="8M"),
        {**stage("org.osbuild.mkfs.ext4", uuid=UUID),
         "devices": {"device": CANARY_DEVICE["canary"]}},
        *([stage("org.osbuild.mkdir", paths=[{"path": p, "parents": True} for p in parents])] if parents else []),
        stage("org.osbuild.ln", paths=[{"target": f"{MOUNTS}/{flat(p)}", "link_name": f"tree://{p}",
                                        "symbolic": True} for p in paths]),
    ]


def attacked(s: dict[str, Any]) -> dict[str, Any]:
    return {**s, "devices": CANARY_DEVICE, "mounts": CANARY_MOUNT}


def canary_files(image: Path) -> list[str]:
    """What is in the canary file system besides lost+found."""
    listing = subprocess.run(["debugfs", "-R", "ls -p /", str(image)], capture_output=True, text=True,
                             check=True).stdout
    names = [line.split("/")[5] for line in listing.splitlines() if line.startswith("/")]
    return sorted(set(names) - {".", "..", "lost+found"})


def test_every_bundled_stage_is_attacked_or_explained() -> None:
    attacked_types = {s["type"] for s, _ in REPLACING} | {s["type"] for s, _, _ in REFUSING}
    bundled = {p.name for p in (REPO / "stages").iterdir() if not p.name.endswith(".meta.json")}
    assert attacked_types.isdisjoint(NOT_ATTACKED)
    assert sorted(bundled - attacked_types - NOT_ATTACKED.keys()) == []


def test_stages_replace_a_planted_symlink_instead_of_writing_through_it(aosbuild: Aosbuild) -> None:
    paths = [p for _, written in REPLACING for p in written]
    victim = pipeline("victim", *PREPARED, *planting(paths), *(attacked(s) for s, _ in REPLACING))
    result = aosbuild(manifest(SRC, victim), "--export", "victim", "--output-directory", str(aosbuild.output),
                      timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    tree = aosbuild.output / "victim"
    assert canary_files(tree / CANARY_IMAGE) == []
    for path in paths:
        planted = tree / path.lstrip("/")
        # replaced by the stage's file, removed (locale.conf), or the stage's own link (localtime)
        assert not planted.is_symlink() or not str(planted.readlink()).startswith(MOUNTS), path


@pytest.mark.parametrize(("attack", "path", "refusal"), REFUSING, ids=[s["type"] for s, _, _ in REFUSING])
def test_stages_refuse_a_planted_symlink_out_of_the_tree(aosbuild: Aosbuild, attack: dict[str, Any], path: str,
                                                         refusal: str) -> None:
    victim = pipeline("victim", *planting([path]), attacked(attack))
    result = aosbuild(manifest(SRC, ARCHIVE, victim), timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert refusal in result.stdout + result.stderr
    assert attack["type"] in result.stderr
