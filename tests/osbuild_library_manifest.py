"""A manifest of osbuild's own library stages that runs on a Debian host without RPM repositories.

It builds a small configured tree (files and config stages, users, systemd units), an image of it
(partitioned on a loop device, mkfs.fat and mkfs.ext4, the tree copied into the mounted root), a qcow2
of that image, and a tarball compressed three ways. Both osbuild and aosbuild build it from the same
library, with the host as build root, so the tests can compare their exports.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

# files the users/groups stages need in the tree (useradd --root edits them, it does not create them)
PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
GROUP = "root:x:0:\n"
SHADOW = "root:*:19000:0:99999:7:::\n"
GSHADOW = "root:*::\n"
SSHD_CONFIG = "Include /etc/ssh/sshd_config.d/*.conf\nPasswordAuthentication yes\n"
DISK_UUID = "2d4b5c1e-7a53-4b5e-9f02-6a5b1c3d9e10"
ROOT_UUID = "6e9b1a3c-0d2f-4b7e-8c51-3f2a9d8e7b64"
ESP_UUID = "7B77-95E7"


def inline(text: str) -> tuple[str, dict[str, Any]]:
    data = text.encode()
    return "sha256:" + hashlib.sha256(data).hexdigest(), {"encoding": "base64",
                                                          "data": base64.b64encode(data).decode()}


def stage(type_: str, options: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": type_, **({"options": options} if options is not None else {}), **extra}


def tree_input(pipeline: str) -> dict[str, Any]:
    return {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": [f"name:{pipeline}"]}


def file_input(pipeline: str, filename: str) -> dict[str, Any]:
    return {"type": "org.osbuild.files", "origin": "org.osbuild.pipeline",
            "references": {f"name:{pipeline}": {"file": filename}}}


def loopback(filename: str, **options: Any) -> dict[str, Any]:
    return {"type": "org.osbuild.loopback", "options": {"filename": filename, **options}}


def os_stages(files: dict[str, str]) -> list[dict[str, Any]]:
    """The configured tree: every stage here comes from osbuild's library."""
    copy_files = stage("org.osbuild.copy", {"paths": [
        {"from": f"input://etcfiles/{checksum}", "to": f"tree:///etc/{name}"} for name, checksum in files.items()]},
        inputs={"etcfiles": {"type": "org.osbuild.files", "origin": "org.osbuild.source",
                             "references": {checksum: {} for checksum in files.values()}}})
    return [
        stage("org.osbuild.mkdir", {"paths": [
            {"path": p, "parents": True} for p in (
                "/etc/systemd/system", "/usr/lib/systemd/system", "/usr/lib/sysctl.d", "/usr/lib/tmpfiles.d",
                "/usr/lib/modprobe.d", "/etc/ssh/sshd_config.d", "/etc/udev/rules.d", "/etc/security/limits.d",
                "/etc/profile.d", "/etc/cron.daily", "/etc/systemd/journald.conf.d", "/boot/efi", "/root",
                "/home", "/var/lib", "/usr/bin")] + [{"path": "/srv/data", "mode": 0o750, "parents": True}]}),
        copy_files,
        stage("org.osbuild.chmod", {"items": {"/etc/shadow": {"mode": "0640"}, "/etc/gshadow": {"mode": "0640"}}}),
        stage("org.osbuild.hostname", {"hostname": "oracle-host"}),
        stage("org.osbuild.locale", {"language": "en_US.UTF-8"}),
        stage("org.osbuild.timezone", {"zone": "Europe/Berlin"}),
        stage("org.osbuild.keymap", {"keymap": "us"}),
        stage("org.osbuild.groups", {"groups": {"admins": {"gid": 1100}, "builders": {"gid": 1200}}}),
        stage("org.osbuild.users", {"users": {"alice": {"uid": 1001, "gid": 1100, "groups": ["builders"],
                                                        "description": "Alice", "home": "/home/alice",
                                                        "shell": "/bin/sh"}}}),
        stage("org.osbuild.fstab", {"filesystems": [
            {"uuid": ROOT_UUID, "vfs_type": "ext4", "path": "/", "options": "defaults"},
            {"uuid": ESP_UUID, "vfs_type": "vfat", "path": "/boot/efi", "options": "umask=0077", "passno": 2}]}),
        stage("org.osbuild.machine-id", {"first-boot": "yes"}),
        stage("org.osbuild.kernel-cmdline", {"root_fs_uuid": ROOT_UUID, "kernel_opts": "console=ttyS0 quiet"}),
        stage("org.osbuild.sysctld", {"filename": "50-oracle.conf", "config": [
            {"key": "net.ipv4.ip_forward", "value": "1"}, {"key": "-kernel.yama.ptrace_scope", "value": "1"}]}),
        stage("org.osbuild.tmpfilesd", {"filename": "oracle.conf", "config": [
            {"type": "d", "path": "/run/oracle", "mode": "0755", "user": "root", "group": "root"}]}),
        stage("org.osbuild.modprobe", {"filename": "disallow-floppy.conf", "commands": [
            {"command": "blacklist", "modulename": "floppy"}]}),
        stage("org.osbuild.systemd.unit.create", {"filename": "oracle.service", "unit-type": "system",
                                                  "unit-path": "usr", "config": {
            "Unit": {"Description": "Oracle service", "Wants": ["network.target"]},
            "Service": {"Type": "oneshot", "ExecStart": ["/usr/bin/true"]},
            "Install": {"WantedBy": ["multi-user.target"]}}}),
        stage("org.osbuild.systemd.unit", {"unit": "oracle.service", "dropin": "10-env.conf", "unit-type": "system",
                                           "config": {"Service": {"Environment": [
                                               {"key": "ORACLE", "value": "1"}]}}}),
        stage("org.osbuild.systemd", {"enabled_services": ["oracle.service"], "masked_services": ["foo.service"]}),
        stage("org.osbuild.resolv-conf", {"nameserver": ["192.0.2.53"], "search": ["example.test"]}),
        stage("org.osbuild.ln", {"paths": [{"target": "/usr/bin/true", "link_name": "tree:///usr/bin/oracle-true",
                                            "symbolic": True}]}),
        stage("org.osbuild.truncate", {"filename": "/var/lib/sparse.img", "size": "1MiB"}),
        stage("org.osbuild.sshd.config", {"config": {"PasswordAuthentication": False, "PermitRootLogin": False}}),
        stage("org.osbuild.systemd-journald", {"filename": "10-oracle.conf", "config": {
            "Journal": {"Storage": "persistent", "Compress": "yes"}}}),
        stage("org.osbuild.udev.rules", {"filename": "/etc/udev/rules.d/60-oracle.rules", "rules": [
            {"comment": ["oracle disks"]},
            [{"op": "==", "key": "SUBSYSTEM", "val": "block"},
             {"op": "=", "key": "MODE", "val": "0660"}]]}),
        stage("org.osbuild.pam.limits.conf", {"filename": "90-oracle.conf", "config": [
            {"domain": "*", "type": "soft", "item": "nofile", "value": 4096}]}),
        stage("org.osbuild.shell.init", {"files": {"oracle.sh": {"env": [{"key": "EDITOR", "value": "vi"}]}}}),
        stage("org.osbuild.cron.script", {"interval": "daily", "filename": "oracle",
                                          "simple": {"summary": "oracle cleanup", "command": "true"}}),
        stage("org.osbuild.noop", {"zero": 0}),
    ]


def image_stages() -> list[dict[str, Any]]:
    """A GPT disk with an ESP (mkfs.fat) and an ext4 root holding the tree (copied into its mount)."""
    disk = {"device": loopback("disk.img")}
    esp = {"esp": loopback("disk.img", start=2048, size=20480)}
    root = {"root": loopback("disk.img", start=22528, size=40926)}
    return [
        stage("org.osbuild.truncate", {"filename": "disk.img", "size": "32MiB"}),
        stage("org.osbuild.sfdisk", {"label": "gpt", "uuid": DISK_UUID, "partitions": [
            {"start": 2048, "size": 20480, "type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
             "uuid": "68b2905b-df3e-4fb3-80fa-49d1e773aa33", "name": "EFI System Partition"},
            {"start": 22528, "size": 40926, "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
             "uuid": "6264d520-3fb9-423f-8ab8-7a0a8e3d3562", "name": "root"}]}, devices=disk),
        stage("org.osbuild.mkfs.fat", {"volid": ESP_UUID.replace("-", ""), "label": "ESP", "fat-size": 16},
              devices={"device": esp["esp"]}),
        stage("org.osbuild.mkfs.ext4", {"uuid": ROOT_UUID, "label": "root"}, devices={"device": root["root"]}),
        stage("org.osbuild.copy", {"paths": [{"from": "input://tree/", "to": "mount://root/"}]},
              inputs={"tree": tree_input("os")}, devices=root,
              mounts=[{"name": "root", "type": "org.osbuild.ext4", "source": "root", "target": "/"}]),
    ]


def manifest() -> dict[str, Any]:
    files = {name: inline(text) for name, text in
             {"passwd": PASSWD, "group": GROUP, "shadow": SHADOW, "gshadow": GSHADOW,
              "ssh/sshd_config": SSHD_CONFIG}.items()}
    return {"version": "2", "sources": {"org.osbuild.inline": {"items": dict(files.values())}}, "pipelines": [
        {"name": "os", "stages": os_stages({name: checksum for name, (checksum, _) in files.items()})},
        {"name": "image", "stages": image_stages()},
        {"name": "qcow2", "stages": [stage("org.osbuild.qemu", {"filename": "disk.qcow2", "format": {"type": "qcow2"}},
                                           inputs={"image": file_input("image", "disk.img")})]},
        {"name": "archive", "stages": [stage("org.osbuild.tar", {"filename": "os.tar"},
                                             inputs={"tree": tree_input("os")})]},
        {"name": "xz", "stages": [stage("org.osbuild.xz", {"filename": "os.tar.xz"},
                                        inputs={"file": file_input("archive", "os.tar")})]},
        {"name": "zstd", "stages": [stage("org.osbuild.zstd", {"filename": "os.tar.zst"},
                                          inputs={"file": file_input("archive", "os.tar")})]},
        {"name": "gzip", "stages": [stage("org.osbuild.gzip", {"filename": "os.tar.gz"},
                                          inputs={"file": file_input("archive", "os.tar")})]},
    ]}


EXPORTS = ("os", "image", "qcow2", "archive", "xz", "zstd", "gzip")

if __name__ == "__main__":
    print(json.dumps(manifest(), indent=2))
