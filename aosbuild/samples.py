"""`aosbuild sample debian`: write the manifest of a minimal bootable Debian image, depsolved now.

The manifest has four pipelines: `build` (a Debian build root with the image tools, installed on the
host), `os` (the system: packages, configuration, initramfs, GRUB configuration), `image` (a partitioned
raw disk with an ext4 root made straight from the `os` tree, and GRUB in its boot area) and `qcow2`. The
package sets are resolved by apt against the mirror of the host's apt configuration (or `--mirror`), so
the manifest pins every byte that goes into the image; no mirror address lives in this repository.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from .depsolve import DepsolveError, DepsolveRequest, DepsolveResult, depsolve
from .sizes import size_argument

# what the stages run from the build root: stages are python3; install (mmdebstrap, apt-utils); users
# (passwd, minbase); timezone (tzdata); systemd and keymap (systemd); disks (e2fsprogs, fdisk, grub, qemu-img)
BUILD_PACKAGES = ("python3", "mmdebstrap", "apt-utils", "e2fsprogs", "fdisk", "dosfstools", "mtools",
                  "grub-pc-bin", "grub-common", "qemu-utils", "zstd", "xz-utils", "mount", "tzdata", "systemd")
# libnss-myhostname: the hostname resolves without an /etc/hosts entry (sudo asks for it)
OS_PACKAGES = ("linux-image-amd64", "systemd-sysv", "udev", "initramfs-tools", "zstd", "sudo", "libnss-myhostname")
SECTOR = 512
PARTITION_START = 2048  # sectors: 1 MiB, room for GRUB's core.img


def password_hash(password: str) -> str:
    """A SHA-512 crypt(3) hash, as /etc/shadow wants it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt as crypt_module

        return crypt_module.crypt(password, crypt_module.mksalt(crypt_module.METHOD_SHA512))


def curl_items(*results: DepsolveResult) -> dict[str, str]:
    return {p.checksum: p.url for result in results for p in result.packages}


def files_input(result: DepsolveResult) -> dict[str, Any]:
    return {"type": "org.osbuild.files", "origin": "org.osbuild.source",
            "references": [p.checksum for p in result.packages]}


def install_stage(result: DepsolveResult, names: Sequence[str], variant: str, suite: str) -> dict[str, Any]:
    return {"type": "org.aosbuild.debian.install", "inputs": {"packages": files_input(result)},
            "options": {"packages": list(names), "variant": variant, "suite": suite,
                        "architecture": result.architecture}}


def disk_size(text: str) -> int:
    size = size_argument(text)
    if size is None:
        raise argparse.ArgumentTypeError("a disk cannot be 'unlimited': give its size")
    return size


def manifest(*, build: DepsolveResult, system: DepsolveResult, args: argparse.Namespace) -> dict[str, Any]:
    root_uuid = str(uuid.uuid4())
    disk_bytes = args.size
    partition_sectors = disk_bytes // SECTOR - PARTITION_START
    build_ref = "name:build"
    tree_input = {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": ["name:os"]}
    os_stages = [
        install_stage(system, OS_PACKAGES, "minbase", args.suite),
        {"type": "org.osbuild.hostname", "options": {"hostname": args.hostname}},
        {"type": "org.osbuild.timezone", "options": {"zone": "UTC"}},
        {"type": "org.osbuild.locale", "options": {"language": "C.UTF-8"}},
        {"type": "org.osbuild.users", "options": {"users": {args.user: {
            "password": password_hash(args.password), "groups": ["sudo"], "shell": "/bin/bash"}}}},
        {"type": "org.osbuild.fstab", "options": {"filesystems": [
            {"uuid": root_uuid, "vfs_type": "ext4", "path": "/", "options": "errors=remount-ro", "passno": 1}]}},
        {"type": "org.osbuild.systemd", "options": {"default_target": "multi-user.target"}},
        {"type": "org.aosbuild.debian.initramfs", "options": {"compression": "zstd"}},
        # after the initramfs: the menu entry names the initrd only if it exists
        {"type": "org.aosbuild.debian.grub2",
         "options": {"rootfs": {"uuid": root_uuid}, "serial_console": "ttyS0,115200"}},
    ]
    image_stages = image_stage_list(root_uuid=root_uuid, disk_bytes=disk_bytes,
                                    partition_sectors=partition_sectors, tree_input=tree_input)
    return {
        "version": "2",
        "metadata": {"generators": [{"name": "aosbuild sample debian", "version": "1"}]},
        "sources": {"org.osbuild.curl": {"items": curl_items(build, system)}},
        "pipelines": [
            {"name": "build", "runner": f"org.osbuild.debian{args.suite_version}",
             "stages": [install_stage(build, BUILD_PACKAGES, "minbase", args.suite)]},
            {"name": "os", "build": build_ref, "stages": os_stages},
            {"name": "image", "build": build_ref, "stages": image_stages},
            {"name": "qcow2", "build": build_ref, "stages": [{
                "type": "org.osbuild.qemu",
                "inputs": {"image": {"type": "org.osbuild.files", "origin": "org.osbuild.pipeline",
                                     "references": {"name:image": {"file": "disk.img"}}}},
                # zstd: about as small as osbuild's default zlib, five times faster to write
                "options": {"filename": "disk.qcow2",
                            "format": {"type": "qcow2", "compat": "1.1", "compression_type": "zstd"}}}]},
        ],
    }


def image_stage_list(*, root_uuid: str, disk_bytes: int, partition_sectors: int,
                     tree_input: dict[str, Any]) -> list[dict[str, Any]]:
    disk = {"type": "org.osbuild.loopback", "options": {"filename": "disk.img"}}
    disk_id = f"0x{secrets.randbits(32):08x}"
    return [
        {"type": "org.osbuild.truncate", "options": {"filename": "disk.img", "size": str(disk_bytes)}},
        {"type": "org.osbuild.sfdisk", "devices": {"device": disk},
         "options": {"label": "dos", "uuid": disk_id, "partitions": [
             {"start": PARTITION_START, "size": partition_sectors, "type": "83", "bootable": True}]}},
        {"type": "org.aosbuild.mkfs.ext4.tree", "inputs": {"tree": tree_input},
         "options": {"filename": "disk.img", "start": PARTITION_START, "size": partition_sectors,
                     "uuid": root_uuid, "label": "root"}},
        {"type": "org.osbuild.grub2.inst", "options": {
            "filename": "disk.img", "platform": "i386-pc",  # the core goes to sector 1, the MBR gap
            "core": {"type": "mkimage", "partlabel": "dos", "filesystem": "ext4"},
            "prefix": {"type": "partition", "partlabel": "dos", "number": 0, "path": "/boot/grub"}}},
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aosbuild sample debian",
                                description="Write the manifest of a minimal bootable Debian image.")
    p.add_argument("--output", "-o", type=Path, help="where to write the manifest (default: stdout)")
    p.add_argument("--suite", default="bookworm", help="Debian suite (default: bookworm)")
    p.add_argument("--suite-version", default="12", help="its version number, for the runner (default: 12)")
    p.add_argument("--mirror", help="a Debian mirror instead of the one in the host's apt configuration")
    p.add_argument("--hostname", default="debian", help="the image's hostname")
    p.add_argument("--user", default="admin", help="a user who may use sudo (default: admin)")
    p.add_argument("--password", default=None, help="that user's password (default: a random one, printed)")
    p.add_argument("--size", type=disk_size, default="2G",
                   help="the disk size: bytes, 2G, 4GiB, ... (default: 2G, which is 2 GiB)")
    p.add_argument("--cache", type=Path, help="depsolve's cache of package indices")
    return p


async def resolve(args: argparse.Namespace) -> tuple[DepsolveResult, DepsolveResult]:
    common = {"suite": args.suite, "mirror": args.mirror, "cache": args.cache}
    build = await depsolve(DepsolveRequest(packages=BUILD_PACKAGES, variant="minbase", **common))
    system = await depsolve(DepsolveRequest(packages=OS_PACKAGES, variant="minbase", **common))
    return build, system


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "debian":
        sys.stderr.write("usage: aosbuild sample debian [--output FILE] [options]; see --help\n")
        return 2
    args = parser().parse_args(argv[1:])
    if args.password is None:
        args.password = secrets.token_urlsafe(9)
        sys.stderr.write(f"password of {args.user}: {args.password}\n")
    try:
        build, system = anyio.run(resolve, args, backend="trio")
    except DepsolveError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 1
    text = json.dumps(manifest(build=build, system=system, args=args), indent=2) + "\n"
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0
