"""`--inspect`: the manifest as osbuild describes it, with every stage id and `name:` references resolved."""

from __future__ import annotations

from typing import Any

from .manifest import Device, Input, Manifest, Mount, Pipeline, Stage


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


def _v1_pipeline(manifest: Manifest, pipeline: Pipeline) -> dict[str, Any]:
    desc: dict[str, Any] = {}
    build = manifest.by_id(pipeline.build) if pipeline.build else None
    if build is not None:
        desc["build"] = {"pipeline": _v1_pipeline(manifest, build), "runner": build.runner}
    if pipeline.stages:
        desc["stages"] = [_v1_stage(s) for s in pipeline.stages]
    return desc


def _v1_stage(stage: Stage) -> dict[str, Any]:
    desc: dict[str, Any] = {"name": stage.type}
    if stage.options:
        desc["options"] = stage.options
    desc["id"] = stage.id
    return desc


def describe_v1(manifest: Manifest) -> dict[str, Any]:
    """What `osbuild --inspect` prints for a v1 manifest: the nested v1 shape, with ids."""
    tree = manifest.by_name("tree")
    desc: dict[str, Any] = {"pipeline": _v1_pipeline(manifest, tree) if tree else {}}
    assembler = manifest.by_name("assembler")
    if assembler is not None:
        desc["pipeline"]["assembler"] = _v1_stage(assembler.stages[0])
    sources = manifest.description.get("sources")
    if sources:
        desc["sources"] = sources
    return desc


def describe(manifest: Manifest, host_runner: str | None = None) -> dict[str, Any]:
    """What `osbuild --inspect` prints for the manifest, in its own format.

    `host_runner` is named for build pipelines that have no `runner` of their own, as osbuild does.
    """
    if manifest.version == "1":
        return describe_v1(manifest)
    build_ids = {p.build for p in manifest.pipelines if p.build}
    desc: dict[str, Any] = {"version": "2",
                            "pipelines": [_pipeline(p, build_ids, host_runner) for p in manifest.pipelines]}
    metadata = manifest.description.get("metadata")
    if metadata:  # osbuild keeps the manifest's `metadata` (generators, exports) as given
        desc["metadata"] = metadata
    if manifest.sources:
        # osbuild describes a source by its items only
        desc["sources"] = {source.type: {"items": source.items} for source in manifest.sources}
    return desc
