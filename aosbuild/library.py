"""The module library: stages, assemblers, runners, sources, inputs, devices and mounts on disk.

A library root is laid out like osbuild's libdir (`/usr/lib/osbuild`): `stages/`, `assemblers/`, `inputs/`,
`devices/`, `mounts/`, `sources/`, each module beside its `<name>.meta.json`, `runners/`, and the manifest
schemas under `schemas/`. aosbuild's bundled root keeps the metadata of the host modules the engine
implements itself under `schemas/inputs`, `schemas/devices` and `schemas/mounts`. Several roots may be
stacked (`--libdir`, tests' own stages): a module comes from the first root that has it, its metadata or its
source (read by `moduleinfo`), and the bundled root is always searched last.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from .errors import SandboxError
from .moduleinfo import ModuleInfo, read_module

BUNDLED_ROOT = Path(__file__).resolve().parent.parent

# kind -> folders searched in each root: osbuild's layout first, then where aosbuild's bundled root keeps the
# schemas of the host modules the engine implements itself
KINDS: dict[str, tuple[str, ...]] = {
    "Stage": ("stages",),
    "Assembler": ("assemblers",),
    "Source": ("sources",),
    "Input": ("inputs", "schemas/inputs"),
    "Device": ("devices", "schemas/devices"),
    "Mount": ("mounts", "schemas/mounts"),
}


def is_osbuild_library(root: Path | None) -> bool:
    """Whether a library root is laid out as osbuild's: it has the `osbuild` package folder (possibly
    empty: an installed osbuild then provides the package, as osbuild's buildroot does)."""
    return root is not None and (root / "osbuild").is_dir()


class Library:
    """Finds modules across stacked library roots."""

    def __init__(self, roots: Sequence[Path] = ()) -> None:
        self.roots = (*tuple(Path(r).resolve() for r in roots), BUNDLED_ROOT)

    def find(self, kind: str, name: str) -> ModuleInfo | None:
        return _find(self.roots, kind, name)

    def manifest_schema(self, name: str) -> dict[str, Any]:
        """A manifest format's document schema (`schemas/NAME`), from the first root that has it."""
        for root in self.roots:
            path = root / "schemas" / name
            if path.exists():
                return dict(json.loads(path.read_text()))
        raise SandboxError(f"no schemas/{name} in the library roots {[str(r) for r in self.roots]}: the "
                           "bundled library is incomplete; reinstall aosbuild")

    @property
    def aosbuild_roots(self) -> tuple[Path, ...]:
        """The roots whose runners run aosbuild's stages: not osbuild libraries, whose runners expect
        osbuild's contract (their stages get their own library's runner, `osbuild_api.library_runner`)."""
        return tuple(root for root in self.roots if not is_osbuild_library(root))

    def runner(self, name: str) -> Path:
        """An aosbuild runner by name, for aosbuild's own stages."""
        for root in self.aosbuild_roots:
            path = root / "runners" / name
            if path.exists():
                return path
        raise SandboxError(f"runner '{name}' not found in the library roots: give --libdir a library with "
                           f"runners/{name}, or reinstall aosbuild if it is one of its own")

    def runner_names(self) -> list[str]:
        """The runners for aosbuild's own stages."""
        return sorted({name for root in self.aosbuild_roots for name in _runner_names(root)})

    def host_runner(self, os_release: Path = Path("/etc/os-release")) -> str:
        """The runner for the host, chosen as osbuild does: same distribution, closest version not above."""
        info = read_os_release(os_release)
        distro = info.get("ID", "linux")
        version = info.get("VERSION_ID", "").replace(".", "")
        # from the first root that has a runner for the host, as a module comes from the first root that
        # has it: with `--libdir /usr/lib/osbuild`, osbuild's own choice
        for root in self.roots:
            names = _runner_names(root)
            with contextlib.suppress(SandboxError):
                return choose_runner(names, distro, version)
        return choose_runner(self.runner_names(), distro, version)  # raises: no root has one


def choose_runner(available: Sequence[str], distro: str, version: str) -> str:
    """Pick `org.osbuild.<distro><version>`, else the highest version below, else the bare distro, else linux."""
    pattern = re.compile(rf"^org\.osbuild\.{re.escape(distro)}(\d*)$")
    wanted = int(version) if version.isdigit() else None
    best: tuple[int, str] | None = None
    for name in available:
        m = pattern.match(name)
        if not m:
            continue
        candidate = int(m.group(1)) if m.group(1) else -1
        if wanted is not None and candidate > wanted:
            continue
        if best is None or candidate > best[0]:
            best = (candidate, name)
    if best:
        return best[1]
    if "org.osbuild.linux" in available:
        return "org.osbuild.linux"
    raise SandboxError(f"No suitable runner for {distro}{version}: the library has {list(available)}; name "
                       "one of them as the pipeline's `runner`, or give --libdir a library with one")


def _runner_names(root: Path) -> list[str]:
    folder = root / "runners"
    return [p.name for p in folder.iterdir() if p.name.startswith("org.")] if folder.is_dir() else []


def read_os_release(path: Path) -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            info[key.strip()] = value.strip().strip('"')
    return info


@cache
def _find(roots: tuple[Path, ...], kind: str, name: str) -> ModuleInfo | None:
    """The module from the first root that has it (its metadata or its source), as osbuild reads one root."""
    for root in roots:
        for folder in KINDS[kind]:
            if (root / folder / name).is_file() or (root / folder / f"{name}.meta.json").is_file():
                return read_module(kind, name, root, folder)
    return None
