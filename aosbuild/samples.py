"""`aosbuild sample debian`: write the manifest of a minimal bootable Debian image, depsolved now.

The manifest has four pipelines: `build` (a Debian build root with the image tools, installed on the
host), `os` (the system: packages, initramfs, GRUB configuration, then the configuration people edit),
`image` (a partitioned raw disk with an ext4 root made straight from the `os` tree, and GRUB in its boot
area) and `qcow2`. The system is a VM image one can reach: D-Bus and logind, DHCP on every Ethernet NIC
(systemd-networkd) with systemd-resolved, and an SSH server that takes keys only, its host keys made at
first boot. The package sets are resolved by apt against the mirror of the host's apt configuration (or
`--mirror`, `--apt-sources`, `--repo`: depsolve's flags, so a repository of one's own serves too), so the
manifest pins every byte that goes into the image; no mirror address lives in this repository.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import json
import re
import secrets
import sys
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .depsolve import (
    DepsolveRequest,
    DepsolveResult,
    add_repository_arguments,
    depsolve,
    parse_checked,
    repository_request,
    run_command,
)
from .sizes import size_argument

# what the stages run from the build root: stages are python3; install (mmdebstrap, apt-utils); users
# (passwd, minbase); timezone (tzdata); systemd and keymap (systemd); disks (e2fsprogs, fdisk, grub, qemu-img)
BUILD_PACKAGES = ("python3", "mmdebstrap", "apt-utils", "e2fsprogs", "fdisk", "dosfstools", "mtools",
                  "grub-pc-bin", "grub-common", "qemu-utils", "zstd", "xz-utils", "mount", "tzdata", "systemd")
# libnss-myhostname: the hostname resolves without an /etc/hosts entry (sudo asks for it); dbus and
# libpam-systemd: systemctl, hostnamectl, loginctl work for users, and logins are sessions; networkd
# (in systemd) with systemd-resolved: DHCP and DNS; iproute2: `ip`; fdisk: sfdisk, for growing the root
OS_PACKAGES = ("linux-image-amd64", "systemd-sysv", "udev", "initramfs-tools", "zstd", "sudo", "libnss-myhostname",
               "dbus", "libpam-systemd", "systemd-resolved", "iproute2", "openssh-server", "fdisk")
# DHCP on every Ethernet interface, whatever the kernel or udev named it
ETHERNET_NETWORK = "[Match]\nType=ether\nName=en* eth*\n\n[Network]\nDHCP=yes\n"
NETWORK_FILE = "/etc/systemd/network/20-ethernet.network"
SSH_KEY_TYPES = ("ssh-", "ecdsa-", "sk-")
# At boot, the root partition takes the rest of its disk (a dos label: systemd-repart does GPT only) and
# the file system follows it, online; on a disk that has not grown, both are no-ops. `$$` is systemd's `$`.
GROW_ROOT = ("root=$$(findmnt -no SOURCE /); part=$${root#/dev/}; "
             "disk=/dev/$$(basename $$(readlink -f /sys/class/block/$$part/..)); "
             "n=$$(cat /sys/class/block/$$part/partition); "
             "echo ', +' | sfdisk --quiet --no-reread --no-tell-kernel -N $$n $$disk && "
             "partx --update --nr $$n $$disk && resize2fs $$root")
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


def inline_item(text: str) -> tuple[str, dict[str, str]]:
    """An org.osbuild.inline source item holding `text`: its checksum and its description."""
    data = text.encode()
    return (f"sha256:{hashlib.sha256(data).hexdigest()}",
            {"encoding": "base64", "data": base64.b64encode(data).decode()})


def copy_file_stage(checksum: str, target: str) -> dict[str, Any]:
    """org.osbuild.copy of one inline item to `target` in the tree, as osbuild-composer writes files."""
    return {"type": "org.osbuild.copy",
            "inputs": {"file": {"type": "org.osbuild.files", "origin": "org.osbuild.source",
                                "references": [checksum]}},
            "options": {"paths": [{"from": f"input://file/{checksum}", "to": f"tree://{target}"}]}}


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
    network_checksum, network_item = inline_item(ETHERNET_NETWORK)
    user: dict[str, Any] = {"password": password_hash(args.password), "groups": ["sudo"], "shell": "/bin/bash"}
    if args.ssh_key_text:
        user["keys"] = [args.ssh_key_text]
    # The slow stages first, then what people change. Nothing after the initramfs goes into it
    # (initramfs-tools reads /etc/initramfs-tools, modprobe.d, udev, *.link files, crypttab, and fstab
    # only for /usr, or for / without `fstype`): an edit of any of it reruns only the stages after it.
    os_stages = [
        install_stage(system, os_packages(args), "minbase", args.suite),
        {"type": "org.aosbuild.debian.initramfs", "options": {"compression": "zstd", "fstype": "ext4"}},
        # after the initramfs: the menu entry names the initrd only if it exists
        {"type": "org.aosbuild.debian.grub2",
         "options": {"rootfs": {"uuid": root_uuid}, "serial_console": "ttyS0,115200"}},
        {"type": "org.osbuild.fstab", "options": {"filesystems": [
            {"uuid": root_uuid, "vfs_type": "ext4", "path": "/", "options": "errors=remount-ro", "passno": 1}]}},
        {"type": "org.aosbuild.debian.sshd-keygen", "options": {}},
        {"type": "org.osbuild.systemd.unit.create", "options": {"filename": "grow-root.service", "config": {
            "Unit": {"Description": "Grow the root partition and file system to the end of the disk"},
            "Service": {"Type": "oneshot", "ExecStart": [f"/bin/sh -c \"{GROW_ROOT}\""]},
            "Install": {"WantedBy": ["multi-user.target"]}}}},
        copy_file_stage(network_checksum, NETWORK_FILE),
        {"type": "org.osbuild.systemd", "options": {
            "enabled_services": ["systemd-networkd.service", "systemd-resolved.service", "ssh.service",
                                 "grow-root.service"],
            "default_target": "multi-user.target"}},
        {"type": "org.osbuild.sshd.config", "options": {"config": {"PasswordAuthentication": False}}},
        {"type": "org.osbuild.locale", "options": {"language": "C.UTF-8"}},
        {"type": "org.osbuild.timezone", "options": {"zone": "UTC"}},
        {"type": "org.osbuild.hostname", "options": {"hostname": args.hostname}},
        {"type": "org.osbuild.users", "options": {"users": {args.user: user}}},
    ]
    image_stages = image_stage_list(root_uuid=root_uuid, disk_bytes=disk_bytes,
                                    partition_sectors=partition_sectors, tree_input=tree_input)
    return {
        "version": "2",
        "metadata": {"generators": [{"name": "aosbuild sample debian", "version": "1"}]},
        "sources": {"org.osbuild.curl": {"items": curl_items(build, system)},
                    "org.osbuild.inline": {"items": {network_checksum: network_item}}},
        "pipelines": [
            {"name": "build", "runner": f"org.osbuild.debian{args.suite_version}",
             "stages": [install_stage(build, BUILD_PACKAGES, "minbase", args.suite)]},
            {"name": "os", "build": build_ref, "stages": os_stages},
            {"name": "image", "build": build_ref, "stages": image_stages},
            {"name": "qcow2", "build": build_ref, "stages": [{
                "type": "org.aosbuild.qemu",
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
        {"type": "org.osbuild.grub2.inst", "options": {
            "filename": "disk.img", "platform": "i386-pc",  # the core goes to sector 1, the MBR gap
            "core": {"type": "mkimage", "partlabel": "dos", "filesystem": "ext4"},
            "prefix": {"type": "partition", "partlabel": "dos", "number": 0, "path": "/boot/grub"}}},
        # last, as the only stage that reads the `os` tree: an edit of the system reruns it alone, from
        # the stored disk with its partition table and GRUB (mkfs at an offset leaves the first MiB alone)
        {"type": "org.aosbuild.mkfs.ext4.tree", "inputs": {"tree": tree_input},
         "options": {"filename": "disk.img", "start": PARTITION_START, "size": partition_sectors,
                     "uuid": root_uuid, "label": "root"}},
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aosbuild sample debian",
                                description="Write the manifest of a minimal Debian VM image (SSH, DHCP, D-Bus).")
    p.add_argument("--output", "-o", type=Path, help="where to write the manifest (default: stdout)")
    p.add_argument("--suite", default="bookworm", help="Debian suite (default: bookworm)")
    p.add_argument("--suite-version", default="12", help="its version number, for the runner (default: 12)")
    p.add_argument("--packages", type=package_list, default=(), metavar="LIST",
                   help="more packages for the image, comma-separated (e.g. vim,curl)")
    add_repository_arguments(p)
    p.add_argument("--hostname", default="debian", help="the image's hostname")
    p.add_argument("--user", default="admin", help="a user who may use sudo (default: admin)")
    p.add_argument("--password", default=None, help="that user's password (default: a random one, printed)")
    p.add_argument("--ssh-key", type=Path, metavar="FILE",
                   help="a public key (e.g. ~/.ssh/id_ed25519.pub) that may log in as the user over SSH")
    p.add_argument("--size", type=disk_size, default="2G",
                   help="the disk size: bytes, 2G, 4GiB, ... (default: 2G, which is 2 GiB)")
    return p


def package_list(text: str) -> tuple[str, ...]:
    names = tuple(name for name in re.split(r"[,\s]+", text) if name)
    if not names or any(name.startswith("-") for name in names):
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of package names: write them "
                                         "comma-separated, as in vim,curl")
    return names


def read_public_key(path: Path) -> str:
    """The one public key in `path` (an OpenSSH .pub file), without its newline."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != 1 or not lines[0].startswith(SSH_KEY_TYPES) or len(lines[0].split()) < 2:
        raise ValueError("not an OpenSSH public key (one line, `ssh-ed25519 AAAA... comment`): "
                         "give the .pub file that ssh-keygen wrote")
    return lines[0]


def requests(args: argparse.Namespace) -> tuple[DepsolveRequest, DepsolveRequest]:
    """What to depsolve: the build root's packages and the image's; ValueError for flags that cannot be right."""
    build = repository_request(args, packages=BUILD_PACKAGES, variant="minbase", suite=args.suite)
    return build, replace(build, packages=os_packages(args))


def os_packages(args: argparse.Namespace) -> tuple[str, ...]:
    return (*OS_PACKAGES, *(name for name in args.packages if name not in OS_PACKAGES))


async def resolve(build: DepsolveRequest, system: DepsolveRequest) -> tuple[DepsolveResult, DepsolveResult]:
    # one after the other: the second finds the package indices the first fetched
    return await depsolve(build), await depsolve(system)


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "debian":
        sys.stderr.write("usage: aosbuild sample debian [--output FILE] [options]; see --help\n")
        return 2
    parsed = parse_checked(parser(), argv[1:], requests)
    if parsed is None:
        return 2
    args, wanted = parsed
    args.ssh_key_text = None
    if args.ssh_key is not None:
        try:
            args.ssh_key_text = read_public_key(args.ssh_key)
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"Error: --ssh-key {args.ssh_key}: {exc}\n")
            return 2
    if args.password is None:
        args.password = secrets.token_urlsafe(9)
        sys.stderr.write(f"password of {args.user}: {args.password}\n")
    resolved = run_command(functools.partial(resolve, *wanted))
    if isinstance(resolved, int):
        return resolved
    build, system = resolved
    for warning in {*build.warnings, *system.warnings}:
        sys.stderr.write(f"Warning: {warning}\n")
    text = json.dumps(manifest(build=build, system=system, args=args), indent=2) + "\n"
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0
