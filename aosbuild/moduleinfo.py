"""A module's metadata, read exactly as osbuild 191 reads it, and the schema a manifest's use of it must meet.

osbuild keeps a module's summary, description, capabilities and option schemas in `<name>.meta.json`
(`schema` for manifest format 1, `schema_2` for format 2, either or both). A module without that file
keeps them in its source as the constants `SCHEMA`, `SCHEMA_2` (a string holding the inside of a JSON
object) and `CAPABILITIES` (a list of strings), with the summary and description in its docstring;
osbuild reads them by parsing the source, never by running it, so a module whose imports are missing on
the host still validates. aosbuild reads both the same way, so that an osbuild library (`--libdir
/usr/lib/osbuild`) validates every manifest osbuild validates, with the same errors.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AosbuildError, Problem
from .logs import get_logger

log = get_logger(__name__)

# What osbuild 191 requires of a `.meta.json`; a file that fails it is ignored, with a warning, as there.
META_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["summary", "description"],
    "anyOf": [{"required": ["schema"]}, {"required": ["schema_2"]}],
    "properties": {
        "summary": {"type": "string"},
        "description": {"type": "array", "items": {"type": "string"}},
        "capabilities": {"type": "array", "items": {"type": "string"}},
        "schema": {"type": "object"},
        "schema_2": {"type": "object"},
    },
}

SOURCE_CONSTANTS = ("SCHEMA", "SCHEMA_2", "CAPABILITIES")


class ModuleMetaError(AosbuildError):
    """A module's metadata cannot be read (broken JSON, a source that does not parse, a bad schema constant)."""

    exit_code = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleInfo:
    """What a library root says of one module: where it is, which root it came from, and its options.

    `path` is the module's file (an executable for stages and assemblers, a host service for osbuild's
    inputs, devices, mounts and sources), or None where the root has only its metadata (aosbuild's own
    host modules are implemented in the engine).
    """

    kind: str
    name: str
    root: Path
    path: Path | None
    summary: str = ""
    description: str = ""
    capabilities: frozenset[str] = frozenset()
    schema_v1: dict[str, Any] = field(default_factory=dict)
    schema_v2: dict[str, Any] = field(default_factory=dict)

    def validation_schema(self, version: str) -> dict[str, Any]:
        """The JSON schema a manifest's use of this module is validated against, built by osbuild's rules.

        Raises ModuleMetaError where osbuild would fail (no schema for this manifest format).
        """
        schema: dict[str, Any] = {"title": f"Pipeline {self.kind}", "type": "object", "additionalProperties": False}
        if self.kind in ("Stage", "Assembler"):
            key = "type" if version == "2" else "name"
            # a format-2 stage without `schema_2` takes its format-1 schema as its options
            options = self.schema_v2 if version == "2" and self.schema_v2 else {"options": self.schema_v1}
            props: dict[str, Any] = {key: {"enum": [self.name]}, **_copy(options)}
            props.setdefault("mounts", {"type": "array"})
            props.setdefault("devices", {"type": "object", "additionalProperties": True})
            schema["properties"] = props
            schema["required"] = [key]
        elif self.kind == "Device":
            # a device's schema is the schema of its `options`
            schema["additionalProperties"] = True
            schema["properties"] = {"type": {"enum": [self.name]}, "options": _copy(self._options(version, "1"))}
        elif self.kind == "Mount":
            # a mount's schema is the whole mount object's, of format 2 only; its `type` is pinned
            schema.update(_copy(self._options("2", None)))
            if not isinstance(schema.get("properties"), dict):
                raise ModuleMetaError(f"mount {self.name}: its schema_2 has no 'properties'")
            schema["properties"]["type"] = {"enum": [self.name]}
        else:  # inputs and sources: the module's schema is the whole object's
            schema.update(_copy(self._options(version, "1")))
        # module schemas are written as if they were the root, so their `#/definitions/...` references
        # need the definitions of `properties` or of `options` moved to the top
        top = schema.get("properties")
        if isinstance(top, dict):
            if isinstance(top.get("definitions"), dict):
                schema["definitions"] = top.pop("definitions")
            top_options = top.get("options")
            if isinstance(top_options, dict) and "definitions" in top_options:
                schema["definitions"] = top_options.pop("definitions")
        return schema

    def _options(self, version: str, fallback: str | None) -> dict[str, Any]:
        by_version = {"1": self.schema_v1, "2": self.schema_v2}
        raw = by_version.get(version) or (by_version.get(fallback) if fallback else None)
        if not raw:
            raise ModuleMetaError(f"{self.kind.lower()} {self.name} has no schema for manifest format {version}")
        return raw


def _copy(node: Any) -> Any:
    """A deep copy of a JSON document (schemas are shared by every use of a module)."""
    return json.loads(json.dumps(node))


def check_schema(schema: dict[str, Any], base: tuple[str | int, ...]) -> list[Problem]:
    """A module schema that is not itself a valid draft-4 schema is reported as osbuild does: its first error."""
    import jsonschema  # here, not at the top: only validation needs it, and `--version` starts without it

    try:
        jsonschema.Draft4Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        return [Problem(exc.message, base + tuple(exc.absolute_path))]
    return []


def read_module(kind: str, name: str, root: Path, folder: str) -> ModuleInfo | None:
    """Read module `name` from `root/folder`: its `.meta.json`, else the constants in its source.

    None where the root has neither, or where the `.meta.json` breaks osbuild's rules for one (osbuild
    then treats the module as missing, with a warning).
    """
    module = root / folder / name
    meta_path = module.with_name(f"{name}.meta.json")
    path = module if module.is_file() else None
    if meta_path.is_file():
        return _from_json(kind, name, root, path, meta_path)
    if path is not None:
        return _from_source(kind, name, root, path)
    return None


def _from_json(kind: str, name: str, root: Path, path: Path | None, meta_path: Path) -> ModuleInfo | None:
    # the validation's cache of what was found valid before: reading a module then imports no jsonschema
    # (about 45 ms of every `--inspect` and build, which read the modules a manifest names)
    from .validation import Check, run_checks

    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModuleMetaError(f"{meta_path}: invalid module metadata: {exc}") from None
    errors = [problem.message for problem in run_checks([Check(META_JSON_SCHEMA, meta)])]
    if errors:
        log.warning("module metadata ignored", path=str(meta_path), errors=errors)
        return None
    return ModuleInfo(kind=kind, name=name, root=root, path=path, summary=meta["summary"],
                      description="\n".join(meta["description"]),
                      capabilities=frozenset(meta.get("capabilities", ())),
                      schema_v1=meta.get("schema", {}), schema_v2=meta.get("schema_2", {}))


def _from_source(kind: str, name: str, root: Path, path: Path) -> ModuleInfo:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as exc:
        raise ModuleMetaError(f"{path}: no .meta.json beside it and its source does not parse as Python "
                              f"({exc}); add {name}.meta.json") from None
    constants: dict[str, ast.Assign] = {}
    for node in tree.body:  # top-level assignments only; the last one of a name wins
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in SOURCE_CONSTANTS:
                    constants[target.id] = node
    docstring = (ast.get_docstring(tree) or "").split("\n")
    return ModuleInfo(kind=kind, name=name, root=root, path=path, summary=docstring[0],
                      description="\n".join(docstring[1:]),
                      capabilities=_source_capabilities(constants.get("CAPABILITIES"), path),
                      schema_v1=_source_schema(constants.get("SCHEMA"), path),
                      schema_v2=_source_schema(constants.get("SCHEMA_2"), path))


def _source_schema(node: ast.Assign | None, path: Path) -> dict[str, Any]:
    """`SCHEMA = "..."` holds the inside of a JSON object; anything but a plain string counts as no schema."""
    if node is None or not isinstance(node.value, ast.Constant) or not isinstance(node.value.value, str):
        return {}
    try:
        value = json.loads("{" + node.value.value + "}")
    except json.JSONDecodeError as exc:
        line = node.lineno + exc.lineno - 1
        raise ModuleMetaError(f"{path}:{line}:{exc.colno}: invalid schema: {exc.msg}") from None
    return dict(value)


def _source_capabilities(node: ast.Assign | None, path: Path) -> frozenset[str]:
    if node is None:
        return frozenset()
    elements = getattr(node.value, "elts", None)
    if elements is None or not all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in elements):
        raise ModuleMetaError(f"{path}:{node.lineno}: CAPABILITIES must be a list of strings")
    return frozenset(e.value for e in elements)
