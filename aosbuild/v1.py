"""osbuild's format v1, converted into the v2 model with osbuild's pipeline names and ids.

v1 has one pipeline (named `tree`), an optional nested `build` (named `build`, `build-build`, ...) with
the runner to use inside it, and an optional `assembler`, which becomes a pipeline named `assembler` of
one stage reading the `tree` pipeline through an `org.osbuild.tree` input named `tree`.
"""

from __future__ import annotations

from typing import Any

from .errors import ManifestError, Problem
from .library import Library
from .manifest import PIPELINE_ORIGIN, Input, Manifest, Pipeline, Source, make_stage
from .validation import check, check_module


def validate_v1(description: dict[str, Any], library: Library) -> list[Problem]:
    problems = list(check(library.manifest_schema("1"), description))

    def walk(pipeline: Any, path: tuple[str | int, ...]) -> None:
        if not isinstance(pipeline, dict):
            return
        build = pipeline.get("build")
        if isinstance(build, dict):
            walk(build.get("pipeline"), (*path, "build", "pipeline"))
        stages = pipeline.get("stages")
        for j, stage in enumerate(stages if isinstance(stages, list) else []):
            problems.extend(_check_module(library, "Stage", stage, (*path, "stages", j)))
        if isinstance(pipeline.get("assembler"), dict):
            problems.extend(_check_module(library, "Assembler", pipeline["assembler"], (*path, "assembler")))

    walk(description.get("pipeline"), ("pipeline",))
    sources = description.get("sources")
    if isinstance(sources, dict):
        for name, source in sources.items():
            # osbuild checks `org.osbuild.files` as `org.osbuild.curl` and reports it under that name
            module = "org.osbuild.curl" if name == "org.osbuild.files" else name
            found = list(check_module(library, "Source", module, source, "1", ("sources", module)))
            if not found and name == "org.osbuild.files" and "urls" not in source:
                # the schema allows `items` too, but osbuild's v1 loader then fails with a KeyError
                found.append(Problem("a v1 'org.osbuild.files' source lists its files under 'urls'",
                                     ("sources", name)))
            problems += found
    return problems


def _check_module(library: Library, kind: str, desc: Any, path: tuple[str | int, ...]) -> list[Problem]:
    if not isinstance(desc, dict) or not isinstance(desc.get("name"), str):
        return []
    return list(check_module(library, kind, desc["name"], desc, "1", path))


def _load_pipeline(desc: dict[str, Any], pipelines: list[Pipeline], depth: int, build_runner: str | None) -> Pipeline:
    build_id = None
    build = desc.get("build")
    if build:
        build_pipeline = _load_pipeline(build.get("pipeline", {}), pipelines, depth + 1, build.get("runner"))
        build_id = build_pipeline.id
    stages = []
    base = None
    for stage_desc in desc.get("stages", []):
        stage = make_stage(type_=stage_desc["name"], build=build_id, base=base,
                           options=dict(stage_desc.get("options", {})), source_epoch=None, inputs={},
                           devices={}, mounts=())
        stages.append(stage)
        base = stage.id
    name = "-".join(["build"] * depth) if depth else "tree"
    pipeline = Pipeline(name=name, build=build_id, runner=build_runner, stages=tuple(stages))
    pipelines.append(pipeline)
    return pipeline


def load_v1(description: dict[str, Any], library: Library, source: str, *, validate: bool = True) -> Manifest:
    if validate:
        problems = validate_v1(description, library)
        if problems:
            raise ManifestError(source, problems)
    pipelines: list[Pipeline] = []
    desc = description.get("pipeline", {})
    tree = _load_pipeline(desc, pipelines, 0, None)
    assembler = desc.get("assembler")
    if assembler:
        tree_input = Input(name="tree", type="org.osbuild.tree", origin=PIPELINE_ORIGIN,
                           refs={tree.id: {}} if tree.id else {}, null_ref=tree.id is None)
        stage = make_stage(type_=assembler["name"], build=tree.build, base=None,
                           options=dict(assembler.get("options", {})), source_epoch=None,
                           inputs={"tree": tree_input}, devices={}, mounts=(), kind="Assembler")
        pipelines.append(Pipeline(name="assembler", build=tree.build, stages=(stage,)))
    sources = []
    for name, src in description.get("sources", {}).items():
        if name == "org.osbuild.files":
            sources.append(Source(type="org.osbuild.curl", items=dict(src.get("urls", {}))))
        else:
            sources.append(Source(type=name, items=dict(src.get("items", {})), options=dict(src.get("options", {}))))
    return Manifest(version="1", pipelines=tuple(pipelines), sources=tuple(sources), description=description)
