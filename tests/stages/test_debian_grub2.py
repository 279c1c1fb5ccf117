"""org.aosbuild.debian.grub2: grub.cfg for the kernels in /boot, /etc/default/grub, and GRUB's i386-pc modules."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .disks import GRUB_DIR
from .treediff import assert_invalid, build_ab

UUID = "6e4ff95f-f662-45ee-a82a-bdf44a2d0b75"
OS_RELEASE = b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nID=debian\n'
CHECKSUM = "sha256:" + hashlib.sha256(OS_RELEASE).hexdigest()
SOURCES = {"org.osbuild.inline": {"items": {CHECKSUM: {"encoding": "base64",
                                                       "data": base64.b64encode(OS_RELEASE).decode()}}}}
# two kernels, the newer one (by version, not by name) with an initrd; an os-release
BASE = [stage("org.osbuild.mkdir", paths=[{"path": "/boot"}, {"path": "/etc"}, {"path": "/usr/lib", "parents": True}]),
        stage("org.osbuild.truncate", filename="/boot/vmlinuz-6.1.0-9-amd64", size="1K"),
        stage("org.osbuild.truncate", filename="/boot/vmlinuz-6.1.0-10-amd64", size="1K"),
        stage("org.osbuild.truncate", filename="/boot/initrd.img-6.1.0-10-amd64", size="1K"),
        {"type": "org.osbuild.copy",
         "inputs": {"f": {"type": "org.osbuild.files", "origin": "org.osbuild.source", "references": [CHECKSUM]}},
         "options": {"paths": [{"from": f"input://f/{CHECKSUM}", "to": "tree:///usr/lib/os-release"}]}}]
MODULES = sorted(p.name for p in GRUB_DIR.iterdir() if p.suffix in (".mod", ".lst") and p.name != "fdt.lst")


def configure(aosbuild: Aosbuild, base: list[dict[str, Any]] = BASE, **options: Any) -> Path:
    """Run the stage over `base`; check what it adds besides grub.cfg; return the tree."""
    changes = build_ab(aosbuild, base, stage("org.aosbuild.debian.grub2", **options), sources=SOURCES)
    added = set(changes.added)
    expected = {"boot/grub", "boot/grub/grub.cfg", "boot/grub/i386-pc",
                *(f"boot/grub/i386-pc/{name}" for name in MODULES)}
    if options.get("write_defaults", True):
        expected |= {"etc/default", "etc/default/grub"}
    assert added == expected
    assert (changes.removed, changes.changed) == ({}, {})
    tree = aosbuild.output / "b"
    assert (tree / "boot/grub/i386-pc/normal.mod").read_bytes() == (GRUB_DIR / "normal.mod").read_bytes()
    check = subprocess.run(["grub-script-check", str(tree / "boot/grub/grub.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    return tree


def entry(version: str, search: str, cmdline: str, initrd: bool = True, home: str = "/boot/") -> str:
    return "\n".join([
        "", f"menuentry 'Debian GNU/Linux, with Linux {version}' --class debian --class gnu-linux --class gnu "
        f"--class os --id 'gnulinux-{version}' {{", *([f"\t{search}"] if search else []),
        f"\tlinux {home}vmlinuz-{version} {cmdline}", *([f"\tinitrd {home}initrd.img-{version}"] if initrd else []),
        "}"])


HEAD = "# Written by aosbuild (org.aosbuild.debian.grub2)\ninsmod part_msdos\ninsmod part_gpt\ninsmod ext2\n"


def test_kernels_newest_first_with_a_serial_console(aosbuild: Aosbuild) -> None:
    tree = configure(aosbuild, rootfs={"uuid": UUID}, serial_console="ttyS0,115200",
                     config={"timeout": 3, "cmdline": "quiet"})
    search = f"search --no-floppy --fs-uuid --set=root {UUID}"
    cmdline = f"root=UUID={UUID} ro console=tty0 console=ttyS0,115200 quiet"
    assert (tree / "boot/grub/grub.cfg").read_text() == (
        HEAD + "set default=0\nset timeout=3\nserial --unit=0 --speed=115200\n"
        "terminal_input serial console\nterminal_output serial console\n"
        + entry("6.1.0-10-amd64", search, cmdline) + "\n" + entry("6.1.0-9-amd64", search, cmdline, initrd=False)
        + "\n")
    assert (tree / "etc/default/grub").read_text() == (
        'GRUB_DEFAULT=0\nGRUB_TIMEOUT=3\nGRUB_DISTRIBUTOR="Debian GNU/Linux"\n'
        'GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200 quiet"\nGRUB_CMDLINE_LINUX_DEFAULT=""\n'
        'GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"\n'
        'GRUB_TERMINAL_INPUT="serial console"\nGRUB_TERMINAL_OUTPUT="serial console"\n')


def test_osbuilds_config_keys_label_and_separate_boot(aosbuild: Aosbuild) -> None:
    tree = configure(aosbuild, rootfs={"label": "root"}, bootfs={"uuid": "6699-AFB5"}, write_defaults=False,
                     config={"serial": "serial --unit=1 --speed=9600", "terminal_output": ["serial"],
                             "timeout_style": "menu", "distributor": "Example OS"})
    text = (tree / "boot/grub/grub.cfg").read_text()
    assert text.startswith(HEAD + "set default=0\nset timeout=0\nset timeout_style=menu\n"
                           "serial --unit=1 --speed=9600\nterminal_output serial\n\n")
    assert text.endswith(entry("6.1.0-9-amd64", "search --no-floppy --fs-uuid --set=root 6699-AFB5",
                               "root=LABEL=root ro", initrd=False, home="/").replace(
                                   "Debian GNU/Linux", "Example OS") + "\n")


def test_root_device(aosbuild: Aosbuild) -> None:
    tree = configure(aosbuild, rootfs={"device": "/dev/vda1"})
    assert entry("6.1.0-10-amd64", "", "root=/dev/vda1 ro") in (tree / "boot/grub/grub.cfg").read_text()


def test_without_a_kernel_says_what_to_install(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.aosbuild.debian.grub2", rootfs={"uuid": UUID}))))
    assert result.returncode == 1
    assert "no /boot/vmlinuz-* in the tree: install a kernel" in result.stderr


@pytest.mark.parametrize(("options", "location", "message"), [
    ({}, "", "'rootfs' is a required property"),
    ({"rootfs": {"uuid": "nope"}}, ".rootfs.uuid", "'nope' is not valid"),
    ({"rootfs": {"uuid": UUID, "label": "root"}}, ".rootfs", "{'uuid': "),
    ({"rootfs": {"uuid": UUID}, "serial_console": "ttyUSB0"}, ".serial_console", "'ttyUSB0' does not match"),
    ({"rootfs": {"uuid": UUID}, "config": {"cmdline": "a'b"}}, ".config.cmdline", "\"a'b\" does not match"),
    ({"rootfs": {"uuid": UUID}, "config": {"timeout": -1}}, ".config.timeout", "-1 is less than the minimum of 0"),
])
def test_bad_options(aosbuild: Aosbuild, options: dict[str, Any], location: str, message: str) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.aosbuild.debian.grub2", **options))))
    assert_invalid(result, ".pipelines[0].stages[0].options" + location, message)
