"""The manifest model: frozen pipelines, stages, inputs, devices, mounts and sources, with their ids.

Built once by its format's loader (`aosbuild.formats`); a v1 manifest converts into the same model. Ids are filled in
at construction, from the rules in `aosbuild.ids`, so every consumer sees the same values.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import ids

PIPELINE_ORIGIN = "org.osbuild.pipeline"
SOURCE_ORIGIN = "org.osbuild.source"


@dataclass(frozen=True, slots=True, kw_only=True)
class Input:
    name: str
    type: str
    origin: str
    # resolved references: pipeline id or source checksum -> reference options
    refs: dict[str, dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    # osbuild's v1 assembler references a tree without stages by its id, None: the input means an
    # empty tree (no refs here) but is hashed as `{null: {}}`
    null_ref: bool = False

    @property
    def id(self) -> str:
        # json.dumps writes a None key as "null", so this hashes exactly as osbuild's {None: {}}
        refs = {"null": {}} if self.null_ref else self.refs
        return ids.input_id(self.type, self.origin, refs, self.options)


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    name: str
    type: str
    parent: Device | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return ids.device_id(self.type, self.parent.id if self.parent else None, self.options)


@dataclass(frozen=True, slots=True, kw_only=True)
class Mount:
    name: str
    type: str
    device: Device | None = None
    partition: int | None = None
    target: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return ids.mount_id(self.type, self.device.id if self.device else None, self.partition,
                            self.target, self.options)


@dataclass(frozen=True, slots=True, kw_only=True)
class Stage:
    type: str
    id: str
    # "Assembler" for a v1 assembler: it runs assemblers/<type>, which may share its name with a stage
    kind: str = "Stage"
    options: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Input] = field(default_factory=dict)
    devices: dict[str, Device] = field(default_factory=dict)  # in dependency order, parents first
    mounts: tuple[Mount, ...] = ()

    def pipeline_refs(self) -> Iterator[str]:
        """Ids of the pipelines whose trees this stage reads through its inputs."""
        for inp in self.inputs.values():
            if inp.origin == PIPELINE_ORIGIN:
                yield from inp.refs

    def source_refs(self) -> Iterator[str]:
        for inp in self.inputs.values():
            if inp.origin == SOURCE_ORIGIN:
                yield from inp.refs


def make_stage(*, type_: str, build: str | None, base: str | None, options: dict[str, Any],
               source_epoch: int | None, inputs: dict[str, Input], devices: dict[str, Device],
               mounts: tuple[Mount, ...], kind: str = "Stage") -> Stage:
    """Build a stage with its osbuild id (devices are only hashed through the mounts that use them)."""
    stage_id = ids.stage_id(
        type_=type_, build=build, base=base, options=options, source_epoch=source_epoch,
        input_ids={name: inp.id for name, inp in inputs.items()},
        mount_ids=[m.id for m in mounts])
    return Stage(type=type_, id=stage_id, kind=kind, options=options, inputs=inputs, devices=devices,
                 mounts=mounts)


@dataclass(frozen=True, slots=True, kw_only=True)
class Pipeline:
    name: str
    build: str | None = None         # id of the build pipeline; None: the host is the build root
    # the manifest's `runner` property: as in osbuild, it names the runner for the pipelines that
    # use this one as their build root, not for this pipeline itself
    runner: str | None = None
    source_epoch: int | None = None
    stages: tuple[Stage, ...] = ()

    @property
    def id(self) -> str | None:
        return self.stages[-1].id if self.stages else None

    def dependencies(self, after: int = 0) -> set[str]:
        """Pipeline ids this one needs to run its stages from index `after` on."""
        deps = {ref for stage in self.stages[after:] for ref in stage.pipeline_refs()}
        if self.build and after < len(self.stages):
            deps.add(self.build)
        return deps


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    type: str
    items: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return ids.source_id(self.type, self.items)


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    version: str
    pipelines: tuple[Pipeline, ...]
    sources: tuple[Source, ...] = ()
    description: dict[str, Any] = field(default_factory=dict)  # the document as written, for --inspect

    def by_name(self, name: str) -> Pipeline | None:
        return next((p for p in self.pipelines if p.name == name), None)

    def by_id(self, pipeline_id: str) -> Pipeline | None:
        return next((p for p in self.pipelines if p.id == pipeline_id), None)

    def lookup(self, name_or_id: str) -> Pipeline | None:
        return self.by_name(name_or_id) or self.by_id(name_or_id)

    def source_items(self) -> set[str]:
        return {checksum for source in self.sources for checksum in source.items}
