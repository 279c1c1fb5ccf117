"""aosbuild's bundled `org.osbuild.*` stages make what osbuild 191's own stages make.

One manifest is built twice: by osbuild 191 itself, run from its library as the oracle (it needs root and
bubblewrap), and by aosbuild with its bundled stages. It has 23 file and configuration stages (accounts,
systemd units, fstab, kernel command line, links, modes...) making a tree; a disk image (truncate, sfdisk,
mkfs.ext4 and mkfs.fat on loop devices, the tree copied in through an ext4 mount); a tar archive of the tree,
compressed with xz, gzip and zstd; and the image converted to qcow2. Trees must be identical (paths, types,
modes, owners, contents, symlink targets), and so must the partition table, the ext4 file system's files,
the archive's members and the image formats.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
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
ROOT, ROOT_SIZE, ESP, ESP_SIZE = 2048, 65536, 67584, 63488  # sectors of a 64 MiB dos disk


def loopback(**options: Any) -> dict[str, Any]:
    return {"type": "org.osbuild.loopback", "options": {"filename": "disk.img", **options}}


def file_of(name: str, filename: str) -> dict[str, Any]:
    return {"type": "org.osbuild.files", "origin": "org.osbuild.pipeline",
            "references": {f"name:{name}": {"file": filename}}}


TREE_INPUT = {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": ["name:tree"]}
IMAGE = pipeline(
    "image",
    stage("org.osbuild.truncate", filename="disk.img", size="64M"),
    {**stage("org.osbuild.sfdisk", label="dos", uuid="0x14fc63d2", partitions=[
        {"start": ROOT, "size": ROOT_SIZE, "type": "83", "bootable": True},
        {"start": ESP, "size": ESP_SIZE, "type": "ef"}]),
     "devices": {"device": loopback()}},
    {**stage("org.osbuild.mkfs.ext4", uuid=UUID, label="root"),
     "devices": {"device": loopback(start=ROOT, size=ROOT_SIZE)}},
    {**stage("org.osbuild.copy", paths=[{"from": "input://tree/", "to": "mount://root/"}]),
     "inputs": {"tree": TREE_INPUT}, "devices": {"root": loopback(start=ROOT, size=ROOT_SIZE)},
     "mounts": [{"name": "root", "type": "org.osbuild.ext4", "source": "root", "target": "/"}]},
    {**stage("org.osbuild.mkfs.fat", volid="7B7795E7", label="ESP"),
     "devices": {"device": loopback(start=ESP, size=ESP_SIZE)}})
ARCHIVE = pipeline("archive", {**stage("org.osbuild.tar", filename="tree.tar"), "inputs": {"tree": TREE_INPUT}})
COMPRESSED = pipeline("compressed", *({**stage(f"org.osbuild.{tool}", filename=f"tree.tar.{suffix}"),
                                       "inputs": {"file": file_of("archive", "tree.tar")}}
                                      for tool, suffix in (("xz", "xz"), ("gzip", "gz"), ("zstd", "zst"))))
QCOW2 = pipeline("qcow2", {**stage("org.osbuild.qemu", filename="disk.qcow2", format={"type": "qcow2"}),
                           "inputs": {"image": file_of("image", "disk.img")}})
MANIFEST = manifest(pipeline("tree", *FILE_STAGES), IMAGE, ARCHIVE, COMPRESSED, QCOW2,
                    sources={"org.osbuild.inline": {"items": INLINE}})
EXPORTS = ("tree", "image", "archive", "compressed", "qcow2")


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


def differences(expected: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    return {k: (expected.get(k), got.get(k)) for k in expected.keys() | got.keys() if expected.get(k) != got.get(k)}


def partition_table(image: Path) -> dict[str, Any]:
    out = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True).stdout
    table: dict[str, Any] = json.loads(out)["partitiontable"]
    table.pop("device")
    for part in table["partitions"]:
        part.pop("node")
    return table


def ext4_files(image: Path, start: int, size: int, workdir: Path) -> dict[str, tuple[str, int, int, str]]:
    """The files of the ext4 file system at sector `start`, read out with debugfs (no mount)."""
    fs, out = workdir / "fs.img", workdir / "fs"
    with image.open("rb") as src, fs.open("wb") as dst:
        src.seek(start * 512)
        dst.write(src.read(size * 512))
    out.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {out}", str(fs)], capture_output=True, check=True)
    files = snapshot(out)
    shutil.rmtree(out)
    fs.unlink()
    return files


def archive_members(archive: Path) -> dict[str, tuple[Any, ...]]:
    """Each member's type, mode, owner and group (ids and names), link target and content; not its times.
    The names are those of osbuild's build root, whose accounts systemd-sysusers makes (`aosbuild.accounts`):
    uid 1000 has none there, whatever the host calls it."""
    with tarfile.open(archive) as tf:
        found = {}
        for m in tf.getmembers():
            data = f.read() if m.isfile() and (f := tf.extractfile(m)) else b""
            found[m.name] = (m.type, m.mode, m.uid, m.gid, m.uname, m.gname, m.linkname,
                             hashlib.sha256(data).hexdigest())
        return found


def test_bundled_stages_make_what_osbuilds_make(osbuild_builder: OsbuildOracle, aosbuild: Aosbuild) -> None:
    path = aosbuild.write_manifest(MANIFEST)
    exports = [arg for name in EXPORTS for arg in ("--export", name)]
    theirs, ours = aosbuild.workdir / "osbuild-out", aosbuild.output
    run = osbuild_builder("--store", str(aosbuild.workdir / "osbuild-store"), *exports,
                          "--output-directory", str(theirs), str(path), timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = aosbuild(path, *exports, "--output-directory", str(ours))
    assert result.returncode == 0, result.stderr

    tree = snapshot(theirs / "tree")
    assert len(tree) > 40
    assert differences(tree, snapshot(ours / "tree")) == {}

    disk = Path("image", "disk.img")
    assert partition_table(ours / disk) == partition_table(theirs / disk)
    scratch = aosbuild.workdir / "scratch"
    scratch.mkdir()
    root = ext4_files(theirs / disk, ROOT, ROOT_SIZE, scratch)
    assert "etc/hostname" in root
    assert differences(root, ext4_files(ours / disk, ROOT, ROOT_SIZE, scratch)) == {}
    with (theirs / disk).open("rb") as a, (ours / disk).open("rb") as b:  # FAT boot sector: label, serial
        a.seek(ESP * 512)
        b.seek(ESP * 512)
        assert a.read(62)[3:] == b.read(62)[3:]

    members = archive_members(theirs / "archive" / "tree.tar")
    assert len(members) == len(tree)
    assert differences(members, archive_members(ours / "archive" / "tree.tar")) == {}
    alice = members["./home/alice"]
    assert alice[2:6] == (1000, 100, "", "users")  # osbuild's: no name for uid 1000 (the host has one)
    for suffix, unpack in (("xz", ["xz", "-dc"]), ("gz", ["gzip", "-dc"]), ("zst", ["zstd", "-dcq"])):
        for out in (theirs, ours):
            packed = out / "compressed" / f"tree.tar.{suffix}"
            plain = subprocess.run([*unpack, str(packed)], capture_output=True, check=True).stdout
            assert plain == (out / "archive" / "tree.tar").read_bytes(), packed
    # gzip's header says how hard it compressed (level 1, as osbuild's default)
    gzip_flags = [(out / "compressed" / "tree.tar.gz").read_bytes()[8] for out in (theirs, ours)]
    assert gzip_flags[0] == gzip_flags[1]

    def qcow2_info(out: Path) -> Any:
        info = subprocess.run(["qemu-img", "info", "--output=json", str(out / "qcow2" / "disk.qcow2")],
                              capture_output=True, text=True, check=True).stdout
        document = json.loads(info)
        return document["virtual-size"], document["format-specific"]

    assert qcow2_info(ours) == qcow2_info(theirs)


# -- grub2.inst: the boot area osbuild's stage writes ---------------------------------------------------------

GRUB_PC = Path("/usr/lib/grub/i386-pc")
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"


def grub_install(location: int | None, partlabel: str, filesystem: str, prefix: dict[str, Any],
                 filename: str = "disk.img") -> dict[str, Any]:
    # Debian's grub-mkimage is not osbuild's default name (grub2-mkimage)
    core = {"type": "mkimage", "partlabel": partlabel, "filesystem": filesystem, "binary": "grub-mkimage"}
    return stage("org.osbuild.grub2.inst", filename=filename, platform="i386-pc", core=core, prefix=prefix,
                 **({"location": location} if location is not None else {}))


def grub_disk(label: str, partitions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [stage("org.osbuild.truncate", filename="disk.img", size="8M"),
            {**stage("org.osbuild.sfdisk", label=label, uuid="0x14fc63d2" if label == "dos" else
                     "D209C89E-EA5E-4FBD-B161-B461CCE297E0", partitions=partitions),
             "devices": {"device": loopback()}}]


GRUB_MANIFEST = manifest(
    # the core in the MBR gap of a dos disk
    pipeline("dos", *grub_disk("dos", [{"start": 2048, "type": "83", "bootable": True}]),
             grub_install(1, "dos", "ext4", {"type": "partition", "partlabel": "dos", "number": 0,
                                             "path": "/boot/grub"})),
    # in the BIOS boot partition of a gpt disk (the core's blocklist patched to follow it)
    pipeline("gpt", *grub_disk("gpt", [
        {"start": 2048, "size": 2048, "type": BIOS_BOOT, "uuid": "FAC7F1FB-3E8D-4137-A512-961DE09A5549"},
        {"start": 4096, "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
         "uuid": "6264D520-3FB9-423F-8AB8-7A0A8E3D3562"}]),
             grub_install(2048, "gpt", "ext4", {"type": "partition", "partlabel": "gpt", "number": 1,
                                                "path": "/boot/grub2"})),
    # no location: the core image is the file (an ISO's El Torito image, as osbuild's installer manifests use it)
    pipeline("eltorito", stage("org.osbuild.mkdir", paths=[{"path": "/images"}]),
             grub_install(None, "gpt", "iso9660", {"path": "/boot/grub2"}, filename="images/eltorito.img")))
GRUB_FILES = {"dos": "disk.img", "gpt": "disk.img", "eltorito": "images/eltorito.img"}


@pytest.mark.skipif(not (GRUB_PC / "boot.img").is_file(), reason="no GRUB for i386-pc: apt-get install -y grub-pc-bin")
def test_grub2_inst_writes_what_osbuilds_writes(osbuild_builder: OsbuildOracle, aosbuild: Aosbuild) -> None:
    """osbuild's grub2.inst, aosbuild's bundled one and osbuild's run by aosbuild write the same bytes: the
    MBR's boot code, the core image (in the MBR gap; in a BIOS boot partition, patched; as a file)."""
    path = aosbuild.write_manifest(GRUB_MANIFEST)
    exports = [arg for name in GRUB_FILES for arg in ("--export", name)]
    theirs = aosbuild.workdir / "osbuild-out"
    run = osbuild_builder("--store", str(aosbuild.workdir / "osbuild-store"), *exports,
                          "--output-directory", str(theirs), str(path), timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    bundled = aosbuild(path, *exports, "--output-directory", str(aosbuild.output / "bundled"))
    assert bundled.returncode == 0, bundled.stdout[-3000:] + bundled.stderr
    library = aosbuild(path, "--libdir", str(osbuild_builder.libdir), *exports,
                       "--output-directory", str(aosbuild.output / "library"))
    assert library.returncode == 0, library.stdout[-3000:] + library.stderr
    for name, filename in GRUB_FILES.items():
        expected = (theirs / name / filename).read_bytes()
        assert expected[:2] != b"\0\0", name  # GRUB's code is there
        for ours in ("bundled", "library"):
            got = (aosbuild.output / ours / name / filename).read_bytes()
            first = next((i for i in range(min(len(got), len(expected))) if got[i] != expected[i]), None)
            assert (len(got), first) == (len(expected), None), f"{ours} {name}: {len(got)} bytes, differs at {first}"
            assert stat.S_IMODE((aosbuild.output / ours / name / filename).stat().st_mode) == \
                stat.S_IMODE((theirs / name / filename).stat().st_mode)
    # the El Torito image is another format than a disk's core (osbuild's i386-pc-eltorito)
    eltorito = (theirs / "eltorito/images/eltorito.img").read_bytes()
    assert eltorito[:512] != (theirs / "dos/disk.img").read_bytes()[512:1024]
