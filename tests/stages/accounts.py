"""A Debian-like /etc for the stages that manage accounts (users, groups, chown), and reading it back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import stage

HOST_ETC = Path("/etc")


def debian_etc() -> dict[str, Any]:
    """The test stage that writes passwd, group, shadow and gshadow (from the build root: the host) and the
    host's login.defs, /etc/default/useradd and /etc/skel, which decide what useradd and groupadd do on Debian."""
    files = {f"/etc/{name}": (HOST_ETC / name).read_text() for name in ("login.defs", "default/useradd")}
    skel = HOST_ETC / "skel"
    if skel.is_dir():
        files.update({f"/etc/skel/{p.name}": p.read_text() for p in skel.iterdir() if p.is_file()})
    return stage("org.aosbuild.test.debian-etc", files=files)


def skel_names() -> set[str]:
    skel = HOST_ETC / "skel"
    return {p.name for p in skel.iterdir() if p.is_file()} if skel.is_dir() else set()


def entries(tree: Path, name: str) -> dict[str, list[str]]:
    """The entries of /etc/<name> (passwd, group, shadow, gshadow) in a tree, by account name."""
    lines = (tree / "etc" / name).read_text().splitlines()
    return {fields[0]: fields for fields in (line.split(":") for line in lines if line)}
