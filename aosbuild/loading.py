"""Reading a manifest file into the model: JSON parsing, format detection, validation and loading.

Every problem is collected and raised at once as a `ManifestError` (exit 2): schema errors first, and only
when the document has the right shape, the errors of meaning (unknown or later `name:` references,
duplicate pipeline names, unknown source items, device cycles).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .confine import component, relative_path
from .errors import ManifestError, Problem
from .library import Library
from .manifest import (
    PIPELINE_ORIGIN,
    SOURCE_ORIGIN,
    Device,
    Input,
    Manifest,
    Mount,
    Pipeline,
    Source,
    make_stage,
)
from .v1 import load_v1
from .validation import validate_v2

# Deeper documents pass the schemas but break Python's recursive JSON encoding (ids, the stage channel).
MAX_DEPTH = 500
TOO_DEEP = Problem(f"nested more than {MAX_DEPTH} levels deep; no manifest needs that, check what generated it")


def parse(text: str, source: str) -> Any:
    """Parse JSON, turning a syntax error into a ManifestError that names file, line and column.

    Documents nested deeper than MAX_DEPTH and integers Python will not convert (over 4300 digits) are
    refused here, at load, rather than crashing the build later.
    """
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{source}:{exc.lineno}:{exc.colno}",
                            [Problem(f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")]
                            ) from None
    except RecursionError:  # nested far deeper than MAX_DEPTH
        raise ManifestError(source, [TOO_DEEP]) from None
    except ValueError as exc:  # int() digit limit
        raise ManifestError(source, [Problem(f"invalid number: {exc}; write such values as strings")]) from None
    if depth(document) > MAX_DEPTH:
        raise ManifestError(source, [TOO_DEEP])
    return document


def depth(document: Any) -> int:
    """How deeply arrays and objects nest in a parsed document, without recursion."""
    deepest = 0
    stack = [(document, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def load(description: Any, library: Library, source: str = "manifest", *, validate: bool = True,
         build: bool = False) -> Manifest:
    """Validate and load a parsed manifest of any supported format.

    `validate=False` skips the module schemas (ids can be computed for manifests whose stages this
    library does not have), but never the checks of meaning. Pipeline references osbuild drops are
    dropped too, so that ids (`--inspect`) are osbuild's; `build=True` (what a build loads) refuses them.
    """
    if not isinstance(description, dict):
        raise ManifestError(source, [Problem("a manifest must be a JSON object")])
    version = description.get("version", "1")
    if version == "2":
        problems = validate_v2(description, library) if validate else []
        if problems:
            raise ManifestError(source, problems)
        return _V2Loader(description, source, build=build).load()
    if version == "1":
        return load_v1(description, library, source, validate=validate)
    raise ManifestError(source, [Problem(f"Unsupported manifest format: version {version!r}", ("version",))])


def load_file(path: str, text: str, library: Library, *, build: bool = False) -> Manifest:
    return load(parse(text, path), library, path, build=build)


def normalize_references(refs: Any) -> dict[str, dict[str, Any]]:
    """The three reference forms (list of ids, {id: options}, [{id, options}]) as {id: options}."""
    if isinstance(refs, Mapping):
        return {str(k): dict(v or {}) for k, v in refs.items()}
    result: dict[str, dict[str, Any]] = {}
    for ref in refs:
        if isinstance(ref, str):
            result[ref] = {}
        else:
            result[str(ref["id"])] = dict(ref.get("options") or {})
    return result


class _V2Loader:
    def __init__(self, description: dict[str, Any], source: str, *, build: bool) -> None:
        self.description = description
        self.build = build
        self.source = source
        self.problems: list[Problem] = []
        self.ids_by_name: dict[str, str | None] = {}
        self.all_names = [p.get("name") for p in description.get("pipelines", [])]
        self.source_items = {
            checksum
            for src in description.get("sources", {}).values()
            for checksum in src.get("items", {})
        }

    def load(self) -> Manifest:
        sources = tuple(
            Source(type=name, items=dict(src.get("items", {})), options=dict(src.get("options", {})))
            for name, src in self.description.get("sources", {}).items())
        pipelines = []
        for i, desc in enumerate(self.description.get("pipelines", [])):
            pipeline = self.pipeline(i, desc)
            pipelines.append(pipeline)
            if pipeline.name in self.ids_by_name:
                self.problems.append(Problem(f"duplicate pipeline name '{pipeline.name}'",
                                             ("pipelines", i, "name")))
            self.ids_by_name[pipeline.name] = pipeline.id
            why = component(pipeline.name)
            if why:  # the name is the directory it is exported to (osbuild's schema allows any string)
                self.problems.append(Problem(f"pipeline name {pipeline.name!r} {why}: a pipeline name must be "
                                             "one path component, the directory it is exported to",
                                             ("pipelines", i, "name")))
        if self.problems:
            raise ManifestError(self.source, self.problems)
        return Manifest(version="2", pipelines=tuple(pipelines), sources=sources,
                        description=self.description)

    def resolve(self, ref: str, path: tuple[str | int, ...]) -> str | None:
        """Resolve `name:X` to the id of an earlier pipeline X; anything else is a raw id."""
        if not ref.startswith("name:"):
            return ref
        name = ref[len("name:"):]
        if name in self.ids_by_name:
            return self.ids_by_name[name]
        if name in self.all_names:
            self.problems.append(Problem(
                f"'{ref}' refers to a pipeline defined later; a pipeline can only use earlier ones, "
                "so references cannot form a cycle", path))
        else:
            self.problems.append(Problem(f"unknown pipeline reference '{ref}'", path))
        return None

    def pipeline(self, i: int, desc: dict[str, Any]) -> Pipeline:
        path: tuple[str | int, ...] = ("pipelines", i)
        build = self.resolve(desc["build"], (*path, "build")) if desc.get("build") else None
        epoch = desc.get("source-epoch")
        stages = []
        base: str | None = None
        for j, stage_desc in enumerate(desc.get("stages", [])):
            spath = (*path, "stages", j)
            inputs = {name: self.input(name, d, (*spath, "inputs", name))
                      for name, d in stage_desc.get("inputs", {}).items()}
            devices = self.devices(stage_desc.get("devices", {}), (*spath, "devices"))
            mounts = tuple(self.mount(m, devices, (*spath, "mounts", k))
                           for k, m in enumerate(stage_desc.get("mounts", [])))
            seen: set[str] = set()
            for k, mount in enumerate(mounts):
                if mount.name in seen:  # osbuild fails here with a traceback: "Duplicated mount"
                    self.problems.append(Problem(f"Duplicated mount '{mount.name}': mount names must be unique "
                                                 "in a stage", (*spath, "mounts", k, "name")))
                seen.add(mount.name)
            stage = make_stage(type_=stage_desc["type"], build=build, base=base,
                               options=dict(stage_desc.get("options", {})), source_epoch=epoch,
                               inputs=inputs, devices=devices, mounts=mounts)
            stages.append(stage)
            base = stage.id
        return Pipeline(name=desc["name"], build=build, runner=desc.get("runner"), source_epoch=epoch,
                        stages=tuple(stages))

    def input(self, name: str, desc: dict[str, Any], path: tuple[str | int, ...]) -> Input:
        origin = desc["origin"]
        refs = normalize_references(desc["references"])
        resolved: dict[str, dict[str, Any]] = {}
        if origin == PIPELINE_ORIGIN:
            for ref, opts in refs.items():
                # osbuild quirk, kept by --inspect for identical ids: pipeline references that are not
                # `name:` references are dropped (an empty input); a build refuses them instead
                if not ref.startswith("name:"):
                    if self.build:
                        self.problems.append(Problem(
                            f"pipeline reference {ref!r} is not a 'name:<pipeline>' reference: osbuild ignores "
                            "such references (the input would be empty); refer to the pipeline by its name",
                            (*path, "references")))
                    continue
                target = self.resolve(ref, (*path, "references"))
                if target:
                    resolved[target] = opts
                if desc.get("type") == "org.osbuild.files" and "file" in opts:
                    _, why = relative_path(str(opts["file"]))
                    if why:
                        self.problems.append(Problem(
                            f"file {opts['file']!r} {why}: a file input names a file inside the pipeline's tree",
                            (*path, "references", ref, "file")))
        elif origin == SOURCE_ORIGIN:
            unknown = sorted(set(refs) - self.source_items)
            if unknown:
                self.problems.append(Problem(f"Unknown source reference(s) {unknown}", (*path, "references")))
            resolved = refs
        return Input(name=name, type=desc["type"], origin=origin, refs=resolved,
                     options=dict(desc.get("options", {})))

    def devices(self, descs: dict[str, Any], path: tuple[str | int, ...]) -> dict[str, Device]:
        """Devices in dependency order; a missing parent or a cycle is a problem."""
        devices: dict[str, Device] = {}
        pending = dict(descs)
        while pending:
            ready = [n for n, d in pending.items() if not d.get("parent") or d["parent"] in devices]
            if not ready:
                for name, d in pending.items():
                    why = "a cycle of parents" if d["parent"] in descs else f"unknown parent '{d['parent']}'"
                    self.problems.append(Problem(f"device '{name}' has {why}", (*path, name, "parent")))
                break
            for name in ready:
                d = pending.pop(name)
                filename = dict(d.get("options") or {}).get("filename")
                if d.get("type") == "org.osbuild.loopback" and isinstance(filename, str):
                    _, bad = relative_path(filename)
                    if bad:
                        self.problems.append(Problem(
                            f"loopback file {filename!r} {bad}: a device's file is a path inside the tree",
                            (*path, name, "options", "filename")))
                devices[name] = Device(name=name, type=d["type"],
                                       parent=devices[d["parent"]] if d.get("parent") else None,
                                       options=dict(d.get("options", {})))
        return devices

    def mount(self, desc: dict[str, Any], devices: dict[str, Device], path: tuple[str | int, ...]) -> Mount:
        device = None
        if desc.get("source"):
            device = devices.get(desc["source"])
            if device is None:
                self.problems.append(Problem(f"mount '{desc['name']}' uses unknown device '{desc['source']}'",
                                             (*path, "source")))
        target = desc.get("target")
        if isinstance(target, str) and target.strip("/"):
            _, why = relative_path(target)
            if why:
                self.problems.append(Problem(f"mount target {target!r} {why}: a mount target is a path below "
                                             "the stage's mounts directory", (*path, "target")))
        return Mount(name=desc["name"], type=desc["type"], device=device, partition=desc.get("partition"),
                     target=desc.get("target"), options=dict(desc.get("options", {})))
