"""osbuild's manifest format 1: its validation, its loading into the model, `--inspect` and `--json`.

v1 has one pipeline (named `tree`), an optional nested `build` (named `build`, `build-build`, ...) with
the runner to use inside it, and an optional `assembler`, which becomes a pipeline named `assembler` of
one stage reading the `tree` pipeline through an `org.osbuild.tree` input named `tree`. Everything after
loading works on the model alone; only the two documents osbuild prints (`describe`, `output`) give the
nested v1 shape back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import AosbuildError, Problem, SourceError
from ..library import Library
from ..manifest import PIPELINE_ORIGIN, Input, Manifest, Pipeline, Source, Stage, make_stage
from ..validation import check, check_module

if TYPE_CHECKING:
    from ..buildreport import BuildReport
    from ..results import StageResult

VERSION = "1"
SCHEMA = "osbuild1.json"
# v1 stages name the files they use in their options, not through inputs: what an export needs of the
# sources cannot be told from the model, so every item is fetched
SOURCES_THROUGH_INPUTS = False


def validate(description: dict[str, Any], library: Library) -> list[Problem]:
    """Every problem of the document: the v1 schema's, then each stage's, assembler's and source's."""
    problems = list(check(library.manifest_schema(SCHEMA), description))

    def walk(pipeline: Any, path: tuple[str | int, ...]) -> None:
        if not isinstance(pipeline, dict):
            return
        build = pipeline.get("build")
        if isinstance(build, dict):
            walk(build.get("pipeline"), (*path, "build", "pipeline"))
            runner = build.get("runner")
            why = library.runner_problem(runner) if isinstance(runner, str) else None
            if why:
                problems.append(Problem(why, (*path, "build", "runner")))
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
            found = list(check_module(library, "Source", module, source, VERSION, ("sources", module)))
            if not found and name == "org.osbuild.files" and "urls" not in source:
                # the schema allows `items` too, but osbuild's v1 loader then fails with a KeyError
                found.append(Problem("a v1 'org.osbuild.files' source lists its files under 'urls'",
                                     ("sources", name)))
            problems += found
    return problems


def _check_module(library: Library, kind: str, desc: Any, path: tuple[str | int, ...]) -> list[Problem]:
    if not isinstance(desc, dict) or not isinstance(desc.get("name"), str):
        return []
    return list(check_module(library, kind, desc["name"], desc, VERSION, path))


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


def load(description: dict[str, Any], source: str, *, build: bool = False) -> Manifest:
    """The model of a valid v1 document (`build` changes nothing: v1 has no references a build refuses)."""
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
    return Manifest(version=VERSION, pipelines=tuple(pipelines), sources=tuple(sources), description=description)


def describe(manifest: Manifest, host_runner: str | None = None) -> dict[str, Any]:
    """What `osbuild --inspect` prints for a v1 manifest: the nested v1 shape, with ids.

    (`host_runner` is not named: a v1 build pipeline always has its own runner.)
    """
    tree = manifest.by_name("tree")
    desc: dict[str, Any] = {"pipeline": _describe_pipeline(manifest, tree) if tree else {}}
    assembler = manifest.by_name("assembler")
    if assembler is not None:
        desc["pipeline"]["assembler"] = _describe_stage(assembler.stages[0])
    sources = manifest.description.get("sources")
    if sources:
        desc["sources"] = sources
    return desc


def _describe_pipeline(manifest: Manifest, pipeline: Pipeline) -> dict[str, Any]:
    desc: dict[str, Any] = {}
    build = manifest.by_id(pipeline.build) if pipeline.build else None
    if build is not None:
        desc["build"] = {"pipeline": _describe_pipeline(manifest, build), "runner": build.runner}
    if pipeline.stages:
        desc["stages"] = [_describe_stage(s) for s in pipeline.stages]
    return desc


def _describe_stage(stage: Stage) -> dict[str, Any]:
    desc: dict[str, Any] = {"name": stage.type}
    if stage.options:
        desc["options"] = stage.options
    desc["id"] = stage.id
    return desc


def output(manifest: Manifest, report: BuildReport, error: AosbuildError | None = None) -> dict[str, Any] | None:
    """osbuild's v1 `--json` result: the `tree` pipeline with its build pipelines nested under `build`,
    and the assembler pipeline's one stage as `assembler`; None for an error outside any stage or source.

    A pipeline found in the store has the stages of the build that stored it (osbuild shows none); one never
    reached counts as a success and has no `stages`: so, as osbuild, a build whose sources failed to
    download shows `"success": true` (exit 1 still).
    Unlike osbuild, a pipeline's own failure is not hidden by its build pipeline's success.
    """
    if error is not None and report.failed is None and not isinstance(error, SourceError):
        return None
    logs = report.logs

    def pipeline_result(pipeline: Pipeline) -> dict[str, Any]:
        results = logs.get(pipeline.name, ())
        success = all(r.success for r in results)
        document: dict[str, Any] = {"success": success}
        if pipeline.build:
            build = manifest.by_id(pipeline.build)
            if build is not None:
                document["build"] = pipeline_result(build)
                document["success"] = success and document["build"]["success"]
        if results:
            document["stages"] = [_stage_result(r, success) for r in results]
        return document

    tree = manifest.by_name("tree")
    result: dict[str, Any] = pipeline_result(tree) if tree is not None else {"success": True}
    assembler = manifest.by_name("assembler")
    ran = logs.get("assembler", ()) if assembler is not None else ()
    if ran:
        result["assembler"] = _stage_result(ran[0], ran[0].success)
        if not ran[0].success:
            result["success"] = False
    return result


def _stage_result(result: StageResult, committed: bool) -> dict[str, Any]:
    # osbuild reads a stage's metadata back from the pipeline's store object: none when it was not committed
    return {"id": result.id, "type": result.type, "success": result.success, "error": result.error,
            "output": result.output, "metadata": (result.metadata or None) if committed else None}
