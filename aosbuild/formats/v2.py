"""osbuild's manifest format 2: its validation, its loading into the model, `--inspect` and `--json`.

Validation collects every problem at once: the document against `schemas/osbuild2.json`, then each
source, stage, input, device and mount against its module's schema (one cached `run_checks`). Loading
then finds the errors of meaning (unknown or later `name:` references, duplicate pipeline names, unknown
source items, device cycles, paths that leave the tree) and resolves every reference to an id.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..confine import component, relative_path
from ..errors import AosbuildError, ManifestError, Problem, SourceError
from ..library import Library
from ..manifest import (
    PIPELINE_ORIGIN,
    SOURCE_ORIGIN,
    Device,
    Input,
    Manifest,
    Mount,
    Pipeline,
    Source,
    Stage,
    make_stage,
)
from ..validation import Check, module_checks, run_checks

if TYPE_CHECKING:
    from ..buildreport import BuildReport
    from ..results import StageResult
    from ..sources import ItemResult

VERSION = "2"
SCHEMA = "osbuild2.json"
# stages reach source items only through their inputs: an export needs only the items its pipelines use
SOURCES_THROUGH_INPUTS = True


def _module(library: Library, kind: str, desc: Any, path: tuple[str | int, ...]) -> Iterator[Check | Problem]:
    if not isinstance(desc, dict) or not isinstance(desc.get("type"), str):
        return  # the manifest schema already said what is wrong with this node
    yield from module_checks(library, kind, desc["type"], desc, VERSION, path)


def validate(description: dict[str, Any], library: Library) -> list[Problem]:
    """Every problem of the document: the v2 schema's, then each module's use's, at their JSON paths."""
    problems: list[Check | Problem] = [Check(library.manifest_schema(SCHEMA), description)]
    sources = description.get("sources")
    if isinstance(sources, dict):
        for name, source in sources.items():
            problems += module_checks(library, "Source", name, source, VERSION, ("sources", name))
    pipelines = description.get("pipelines")
    for i, pipeline in enumerate(pipelines if isinstance(pipelines, list) else []):
        runner = pipeline.get("runner") if isinstance(pipeline, dict) else None
        why = library.runner_problem(runner) if isinstance(runner, str) else None
        if why:  # osbuild refuses it as it loads the manifest, with a traceback
            problems.append(Problem(why, ("pipelines", i, "runner")))
        stages = pipeline.get("stages") if isinstance(pipeline, dict) else None
        for j, stage in enumerate(stages if isinstance(stages, list) else []):
            path: tuple[str | int, ...] = ("pipelines", i, "stages", j)
            problems += _module(library, "Stage", stage, path)
            if not isinstance(stage, dict):
                continue
            for kind, key in (("Device", "devices"), ("Input", "inputs")):
                group = stage.get(key)
                if isinstance(group, dict):
                    for name, desc in group.items():
                        problems += _module(library, kind, desc, (*path, key, name))
            # osbuild reports a mount's own schema errors under its name, not its index (the
            # manifest schema's under the index), and checks only the last of same-named mounts
            mounts = stage.get("mounts")
            named = {m["name"]: m for m in (mounts if isinstance(mounts, list) else [])
                     if isinstance(m, dict) and isinstance(m.get("name"), str)}
            for name, mount in named.items():
                problems += _module(library, "Mount", mount, (*path, "mounts", name))
    return run_checks(problems)


def load(description: dict[str, Any], source: str, *, build: bool = False) -> Manifest:
    """The model of a valid v2 document, with every `name:` reference resolved to a pipeline id.

    Pipeline references osbuild drops are dropped too, so that ids (`--inspect`) are osbuild's;
    `build=True` (what a build loads) refuses them.
    """
    return _Loader(description, source, build=build).load()


def _references(refs: Any) -> dict[str, dict[str, Any]]:
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


class _Loader:
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
        return Manifest(version=VERSION, pipelines=tuple(pipelines), sources=sources,
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
        refs = _references(desc["references"])
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


def _with(desc: dict[str, Any], **optional: Any) -> dict[str, Any]:
    """`desc` with those of `optional` that are set: osbuild leaves empty and missing fields out."""
    desc.update((key, value) for key, value in optional.items() if value)
    return desc


def _device(device: Device) -> dict[str, Any]:
    # osbuild leaves `parent` out (the parent's id is in the mount ids already)
    return _with({"type": device.type}, options=device.options)


def _mount(mount: Mount) -> dict[str, Any]:
    # `target` is always there, `null` when the manifest has none, as osbuild prints it
    return _with({"name": mount.name, "type": mount.type, "target": mount.target},
                 source=mount.device.name if mount.device else None, partition=mount.partition,
                 options=mount.options)


def _input(inp: Input) -> dict[str, Any]:
    # `references` is empty when every pipeline reference lacked `name:` and was dropped
    return _with({"type": inp.type, "origin": inp.origin}, options=inp.options, references=inp.refs)


def _stage(stage: Stage) -> dict[str, Any]:
    return _with({"type": stage.type, "id": stage.id}, options=stage.options,
                 devices={name: _device(d) for name, d in stage.devices.items()},
                 mounts=[_mount(m) for m in stage.mounts],
                 inputs={name: _input(i) for name, i in stage.inputs.items()})


def _pipeline(pipeline: Pipeline, build_ids: set[str], host_runner: str | None) -> dict[str, Any]:
    desc: dict[str, Any] = {"name": pipeline.name}
    if pipeline.build:
        desc["build"] = pipeline.build
    # osbuild keeps a `runner` only where it is used: on pipelines that others use as build root
    # (without one of its own, such a pipeline runs its users on the host's runner)
    if pipeline.id in build_ids:
        runner = pipeline.runner or host_runner
        if runner:
            desc["runner"] = runner
    # osbuild leaves `source-epoch` out of the description (it is in the stage ids already)
    if pipeline.stages:
        desc["stages"] = [_stage(s) for s in pipeline.stages]
    return desc


def describe(manifest: Manifest, host_runner: str | None = None) -> dict[str, Any]:
    """What `osbuild --inspect` prints for a v2 manifest: its pipelines with every stage id.

    `host_runner` is named for build pipelines that have no `runner` of their own, as osbuild does.
    """
    build_ids = {p.build for p in manifest.pipelines if p.build}
    desc: dict[str, Any] = {"version": VERSION,
                            "pipelines": [_pipeline(p, build_ids, host_runner) for p in manifest.pipelines]}
    metadata = manifest.description.get("metadata")
    if metadata:  # osbuild keeps the manifest's `metadata` (generators, exports) as given
        desc["metadata"] = metadata
    if manifest.sources:
        # osbuild describes a source by its items only
        desc["sources"] = {source.type: {"items": source.items} for source in manifest.sources}
    return desc


def output(manifest: Manifest, report: BuildReport, error: AosbuildError | None = None) -> dict[str, Any] | None:
    """osbuild's v2 `--json` result: a success, a stage's error or a source's error, with the sources and
    each pipeline's log; None for an error outside any stage or source."""
    if report.failed is not None:
        return _stage_error_document(failed=report.failed, sources=report.sources, logs=report.logs)
    if isinstance(error, SourceError):
        return _source_error_document(source_type=error.source_type, output=str(error), sources=report.sources)
    if error is not None:
        return None
    return _success_document(metadata=report.metadata(), sources=report.sources, logs=report.logs)


def _sources_section(sources: Mapping[str, Sequence[ItemResult]], success: bool) -> dict[str, Any]:
    section: dict[str, Any] = {"success": success}
    for source_type, items in sources.items():
        section[source_type] = [
            {"cached": i.cached, "checksum": i.checksum, **({"error": i.error} if i.error else {})}
            for i in items]
    return section


def _log_section(logs: Mapping[str, Sequence[StageResult]]) -> dict[str, Any]:
    section: dict[str, Any] = {}
    for pipeline, results in logs.items():
        section[pipeline] = [
            {"id": r.id, "type": r.type, "output": r.output, **({} if r.success else {"success": False})}
            for r in results]
    return section


def _success_document(*, metadata: Mapping[str, Mapping[str, Any]],
                      sources: Mapping[str, Sequence[ItemResult]],
                      logs: Mapping[str, Sequence[StageResult]]) -> dict[str, Any]:
    return {"type": "result", "success": True, "metadata": dict(metadata),
            "sources": _sources_section(sources, True), "log": _log_section(logs)}


def _stage_error_document(*, failed: StageResult, sources: Mapping[str, Sequence[ItemResult]],
                          logs: Mapping[str, Sequence[StageResult]]) -> dict[str, Any]:
    stage = {"id": failed.id, "type": failed.type, "output": failed.output, "error": failed.error}
    return {"type": "error", "success": False,
            "error": {"type": "org.osbuild.error.stage", "details": {"stage": stage}},
            "sources": _sources_section(sources, True), "log": _log_section(logs)}


def _source_error_document(*, source_type: str, output: str,
                           sources: Mapping[str, Sequence[ItemResult]]) -> dict[str, Any]:
    return {"type": "error", "success": False,
            "error": {"type": "org.osbuild.error.source",
                      "details": {"source": {"type": source_type, "output": output}}},
            "sources": _sources_section(sources, False), "log": {}}
