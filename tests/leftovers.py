"""What a test's build may have left behind, looked for machine-wide but counted only when it is the test's.

Other tests (and other people's builds) run on the machine at the same time, so nothing here compares
machine-wide counts: a mount counts when its mount point is under the test's directory in the mount
namespace of any process (a stage's namespace too, not only the test's own), a loop device when its
backing file is under the test's directory or on a filesystem mounted there (a stage's own `loop.attach`
request names its file by its sandbox path, but the file's device is the store's), or when it is backed
by such a loop device (a partition on a disk).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

NODEV_SOURCE = "aosbuild-nodev"  # the source of the `nodev_store` fixture's tmpfs


@dataclass(frozen=True, slots=True, kw_only=True)
class Mount:
    pid: int
    command: str
    point: str
    fstype: str
    source: str
    device: str  # major:minor

    def __str__(self) -> str:
        return f"{self.point} ({self.fstype} {self.source}) in the mount namespace of {self.pid} {self.command}"


def _under(point: str, path: Path) -> bool:
    return point == str(path) or point.startswith(f"{path}/")


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounts_under(path: Path) -> list[Mount]:
    """Mounts at or below `path` in the mount namespace of any process, one per namespace and point."""
    found: dict[tuple[str, str], Mount] = {}
    for info in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            namespace = os.readlink(info.parent / "ns" / "mnt")
            lines = info.read_text().splitlines()
            command = (info.parent / "cmdline").read_bytes().replace(b"\0", b" ")[:120].decode(errors="replace")
        except OSError:
            continue  # the process is gone
        for line in lines:
            fields = line.split()
            point = _unescape(fields[4])
            if not _under(point, path):
                continue
            after = fields.index("-")
            found.setdefault((namespace, point), Mount(
                pid=int(info.parent.name), command=command.strip(), point=point, fstype=fields[after + 1],
                source=_unescape(fields[after + 2]), device=fields[2]))
    return list(found.values())


def stray_mounts(workdir: Path) -> list[Mount]:
    """Mounts under the test's directory, except the `nodev_store` fixture's own tmpfs for the store."""
    store = str(workdir / "store")
    return [m for m in mounts_under(workdir)
            if not (m.point == store and m.fstype == "tmpfs" and m.source == NODEV_SOURCE)]


def loops_backed_by(path: Path) -> list[str]:
    """Loop devices (`loopN`) whose backing file is under `path`, on a filesystem mounted under it, or a
    loop device that is one of those."""
    listing = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE,BACK-MAJ:MIN"],
                             capture_output=True, text=True, check=True).stdout
    loops = json.loads(listing)["loopdevices"] if listing.strip() else []
    devices = {m.device for m in mounts_under(path)}
    ours = {Path(loop["name"]).name for loop in loops
            if _under(str(loop["back-file"] or "").removesuffix(" (deleted)"), path)
            or str(loop["back-maj:min"] or "").strip() in devices}
    while more := {Path(loop["name"]).name for loop in loops
                   if str(loop["back-file"] or "").removeprefix("/dev/") in ours} - ours:
        ours |= more
    return sorted(ours)


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (the test's private directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def processes_using(path: Path) -> list[int]:
    """Pids whose command line mentions `path` (bwrap, its sandbox's init) or whose mount namespace holds
    a bind of something under it (a sandbox's processes). A bind names its source by its path inside
    its filesystem (mountinfo's fourth field), `path` relative to the mount that holds it, found here
    by `path`'s last part, which must be unique on the machine. A namespace that merely copied a mount
    *at* a point under `path` (another's `unshare --mount` while it was mounted) is not matched."""
    found = set(processes_mentioning(str(path)))
    needle = f"/{path.name}/"
    own = os.readlink("/proc/self/ns/mnt")
    seen: dict[str, bool] = {}  # namespace -> whether it binds something under `path`
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                namespace = os.readlink(entry / "ns" / "mnt")
                if namespace != own and namespace not in seen:
                    lines = (entry / "mountinfo").read_text().splitlines()
                    seen[namespace] = any(needle in _unescape(line.split()[3]) for line in lines)
            except OSError:
                continue
            if seen.get(namespace):
                found.add(int(entry.name))
    return sorted(found)
