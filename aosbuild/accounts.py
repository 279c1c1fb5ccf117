"""The build root's user and group databases, as osbuild's build root has them.

osbuild gives a stage none of the build root's `/etc` but a few files; its distribution runners (Debian's,
Fedora's, CentOS's, RHEL's) run `systemd-sysusers` first, which writes `/etc/passwd` and `/etc/group`
from the build root's `usr/lib/sysusers.d` onto that empty `/etc`. What a stage looks up by name, then,
comes from there: the owner names GNU tar writes into an archive (`org.osbuild.tar`: uid 1000 has no name
in osbuild's archive; with the host's `/etc/passwd` it had the host user's), the ids it gives names when
it unpacks one. aosbuild's sandbox shows its stages the same two files, made once per pipeline the same
way (`systemd-sysusers --root` on a scratch directory holding copies of the build root's sysusers.d),
where the build root has a sysusers.d and the host has systemd-sysusers; else the build root's own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from . import process
from .store import layers as overlay

SYSUSERS_DIR = "usr/lib/sysusers.d"


@dataclass(frozen=True, slots=True)
class Accounts:
    """The contents of `/etc/passwd` and `/etc/group` for a stage's sandbox."""

    passwd: bytes
    group: bytes

    def files(self) -> dict[str, bytes]:
        return {"passwd": self.passwd, "group": self.group}


def sysusers_configs(layers: Sequence[Path]) -> dict[str, Path]:
    """The build root's `usr/lib/sysusers.d/*.conf` (name -> the real file), its layers merged as overlayfs
    merges them: every layer's names, each looked up through the stack (whiteouts and opaque directories
    hide, symlinks out of the tree, such as a `/dev/null` mask, leave nothing to copy)."""
    directory = overlay.resolve(layers, SYSUSERS_DIR)
    if directory is None:
        return {}
    names: set[str] = set()
    for layer in layers:
        try:
            names.update(n for n in os.listdir(layer / directory) if n.endswith(".conf"))
        except (FileNotFoundError, NotADirectoryError):
            continue
    found = {}
    for name in sorted(names):
        resolved = overlay.file_in(layers, f"{directory}/{name}")
        real = overlay.find(layers, resolved) if resolved is not None else None
        if real is not None:
            found[name] = real
    return found


def _sysusers_root(root: Path, configs: dict[str, Path]) -> None:
    (root / SYSUSERS_DIR).mkdir(parents=True)
    (root / "etc").mkdir()
    for name, real in configs.items():
        shutil.copyfile(real, root / SYSUSERS_DIR / name)


def _read(root: Path) -> Accounts:
    return Accounts(passwd=(root / "etc/passwd").read_bytes(), group=(root / "etc/group").read_bytes())


async def make_accounts(layers: Sequence[Path], scratch: Path) -> Accounts | None:
    """What systemd-sysusers makes of the build root's sysusers.d on an empty `/etc`; None without either."""
    sysusers = shutil.which("systemd-sysusers")
    configs = await anyio.to_thread.run_sync(sysusers_configs, layers)
    if sysusers is None or not configs:
        return None
    with tempfile.TemporaryDirectory(dir=scratch, prefix="sysusers-") as d:
        root = Path(d)
        await anyio.to_thread.run_sync(_sysusers_root, root, configs)
        await process.run([sysusers, f"--root={root}"])
        return await anyio.to_thread.run_sync(_read, root)
