"""The module library: stages, assemblers, runners, sources, inputs, devices and mounts on disk.

A library root is laid out like osbuild's libdir: `stages/<name>` executables beside `<name>.meta.json`,
`assemblers/`, `runners/`, `sources/<name>.meta.json`, and the manifest and host-module schemas under
`schemas/`. Several roots may be stacked (tests add their own stages); the first root that has a module
wins, and the bundled root is always searched last.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .errors import SandboxError

BUNDLED_ROOT = Path(__file__).resolve().parent.parent

# kind -> (folder under a root, whether the module is an executable)
KINDS: dict[str, tuple[str, bool]] = {
    "Stage": ("stages", True),
    "Assembler": ("assemblers", True),
    "Source": ("sources", False),
    "Input": ("schemas/inputs", False),
    "Device": ("schemas/devices", False),
    "Mount": ("schemas/mounts", False),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleInfo:
    """What the library knows of one module: where it is and what its options look like."""

    kind: str
    name: str
    path: Path | None
    root: Path | None = None  # the library root it came from
    summary: str = ""
    capabilities: tuple[str, ...] = ()  # added to the stage's default set (`capabilities` of .meta.json)
    schema_v1: dict[str, Any] = field(default_factory=dict)
    schema_v2: dict[str, Any] = field(default_factory=dict)

    def validation_schema(self, version: str) -> dict[str, Any]:
        """The JSON schema a manifest's use of this module is validated against (osbuild's rules)."""
        if self.kind in ("Stage", "Assembler"):
            key = "type" if version == "2" else "name"
            props: dict[str, Any] = {key: {"enum": [self.name]}}
            if version == "2":
                # a module with only a v1 `schema` takes it as its v2 `options`, as osbuild reads it
                strict = {"type": "object", "additionalProperties": False}
                props.update(self.schema_v2 or {"options": self.schema_v1 or strict})
                props.setdefault("devices", {"type": "object"})
                props.setdefault("mounts", {"type": "array"})
            else:
                props["options"] = self.schema_v1 or self.schema_v2.get("options", {})
            schema: dict[str, Any] = {"title": "Pipeline Stage", "type": "object",
                                      "additionalProperties": False, "properties": props,
                                      "required": [key]}
        elif self.kind == "Source" and version == "1":
            # v1 sources have their own shape (`urls` for org.osbuild.files); osbuild wraps the schema
            # in a strict object, as here
            schema = {"title": "Pipeline Source", "type": "object", "additionalProperties": False,
                      **(self.schema_v1 or self.schema_v2)}
        elif self.kind == "Device":
            schema = {"additionalProperties": True,
                      "properties": {"type": {"enum": [self.name]}, **self.schema_v2}}
        else:
            schema = dict(self.schema_v2)
        return _hoist_definitions(schema)


def _hoist_definitions(schema: dict[str, Any]) -> dict[str, Any]:
    """Move every nested `definitions` block to the root, where `$ref: #/definitions/...` expects it."""
    definitions: dict[str, Any] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            node = dict(node)
            if isinstance(node.get("definitions"), dict):
                definitions.update(node.pop("definitions"))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    result: dict[str, Any] = walk(schema)
    if definitions:
        result["definitions"] = definitions
    return result


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

    def manifest_schema(self, version: str) -> dict[str, Any]:
        name = "osbuild2.json" if version == "2" else "osbuild1.json"
        for root in self.roots:
            path = root / "schemas" / name
            if path.exists():
                return dict(json.loads(path.read_text()))
        raise SandboxError(f"no schemas/{name} in the library roots {[str(r) for r in self.roots]}")

    @property
    def aosbuild_roots(self) -> tuple[Path, ...]:
        """The roots whose runners run aosbuild's stages: not osbuild libraries, whose runners expect
        osbuild's contract (their stages get their own library's runner, `osbuild_api.library_runner`)."""
        return tuple(root for root in self.roots if not is_osbuild_library(root))

    def runner(self, name: str) -> Path:
        for root in self.aosbuild_roots:
            path = root / "runners" / name
            if path.exists():
                return path
        raise SandboxError(f"runner '{name}' not found in the library roots",)

    def runner_names(self) -> list[str]:
        names: set[str] = set()
        for root in self.aosbuild_roots:
            if (root / "runners").is_dir():
                names.update(p.name for p in (root / "runners").iterdir() if p.name.startswith("org."))
        return sorted(names)

    def host_runner(self, os_release: Path = Path("/etc/os-release")) -> str:
        """The runner for the host, chosen as osbuild does: same distribution, closest version not above."""
        info = read_os_release(os_release)
        distro = info.get("ID", "linux")
        version = info.get("VERSION_ID", "").replace(".", "")
        return choose_runner(self.runner_names(), distro, version)


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
    raise SandboxError(f"No suitable runner for {distro}{version}: the library has {list(available)}")


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
    folder, executable = KINDS[kind]
    for root in roots:
        meta_path = root / folder / f"{name}.meta.json"
        module_path = root / folder / name
        if executable and not module_path.exists():
            continue
        if not meta_path.exists():
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None  # an unreadable .meta.json is a missing module, as in osbuild
        return ModuleInfo(kind=kind, name=name, path=module_path if executable else None, root=root,
                          summary=str(meta.get("summary", "")),
                          capabilities=tuple(str(c) for c in meta.get("capabilities", ())),
                          schema_v1=dict(meta.get("schema", {})),
                          schema_v2=dict(meta.get("schema_2", {})))
    return None
