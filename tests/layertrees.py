"""Directory trees with everything a layer must carry, and a digest that compares them."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from .treedigest import digest

CAPABILITY = bytes([1, 0, 0, 2, 0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # cap_net_bind_service+ep


def make_upper(root: Path) -> Path:
    """An overlay upper directory by hand: owners, modes (setuid, sticky), ns mtimes, xattrs (binary
    too), hard links, a symlink, devices, a fifo, a whiteout, an opaque directory, odd names."""
    root.mkdir(parents=True)
    os.chmod(root, 0o700)
    os.chown(root, 0, 4)
    os.setxattr(root, "user.root-note", b"on the root itself")
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("builder\n")
    os.chown(root / "etc/hostname", 1000, 1001)
    (root / "usr/bin").mkdir(parents=True)
    ping = root / "usr/bin/ping"
    ping.write_bytes(os.urandom(3000))
    os.chmod(ping, 0o4755)
    os.setxattr(ping, "security.capability", CAPABILITY)
    os.setxattr(ping, "user.binary", b"\xff\x00\xfe\n")
    os.link(ping, root / "usr/bin/ping6")
    os.link(ping, root / "etc/a-link-sorted-first")
    (root / "tmp").mkdir(mode=0o1777)
    os.chmod(root / "tmp", 0o1777)
    os.symlink("../usr/bin/ping", root / "etc/ping-link")
    os.symlink("/nonexistent/dangling", root / "dangling")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "loop0", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    os.mkfifo(root / "initctl", 0o600)
    os.mknod(root / "etc/deleted", stat.S_IFCHR, os.makedev(0, 0))  # overlayfs's whiteout
    (root / "var/cache").mkdir(parents=True)
    os.setxattr(root / "var/cache", "trusted.overlay.opaque", b"y")
    (root / "var/cache/kept").write_text("in the opaque directory\n")
    (root / "name with spaces & ünïcode").write_text("odd\n")
    (root / ("long-" + "x" * 200)).write_text("a name past ustar's 100 bytes\n")
    os.utime(root / "etc/hostname", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    os.utime(root / "etc", ns=(1_600_000_000_000_000_001, 1_600_000_000_000_000_001))
    return root


def tree(root: Path, *, whiteout_times: bool = False) -> dict[str, Any]:
    """`treedigest.digest` of `root` without the root entry itself (its mtime is the test's), and
    without the mtimes of whiteouts unless asked: an OCI whiteout carries no time."""
    entries = digest(os.fspath(root))
    entries.pop(".")
    if not whiteout_times:
        for entry in entries.values():
            if entry["type"] == stat.S_IFCHR and entry.get("rdev") == [0, 0]:
                entry.pop("mtime", None)
    return entries
