"""What a build produced: per-stage results and the `--json` result documents (osbuild's v2 shape; v1's for v1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .manifest import Manifest, Pipeline
    from .sources import ItemResult


@dataclass(frozen=True, slots=True, kw_only=True)
class StageResult:
    id: str
    type: str
    success: bool
    output: str
    duration: float
    metadata: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None  # the exception the stage reported, if any
    reason: str = ""  # why it failed, in words ("exited with status 1", "timed out after 10s")
    cached: bool = False  # reported from the store: this is what the build that stored it reported

    def to_record(self) -> dict[str, Any]:
        """What the store keeps of a successful stage, to report it again on a cache hit."""
        return {"id": self.id, "type": self.type, "output": self.output, "duration": self.duration,
                "metadata": self.metadata}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> StageResult:
        return cls(id=record["id"], type=record["type"], success=True, output=record.get("output", ""),
                   duration=float(record.get("duration", 0.0)), metadata=record.get("metadata") or {},
                   cached=True)


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


def success_document(*, metadata: Mapping[str, Mapping[str, Any]],
                     sources: Mapping[str, Sequence[ItemResult]],
                     logs: Mapping[str, Sequence[StageResult]]) -> dict[str, Any]:
    return {"type": "result", "success": True, "metadata": dict(metadata),
            "sources": _sources_section(sources, True), "log": _log_section(logs)}


def stage_error_document(*, failed: StageResult, sources: Mapping[str, Sequence[ItemResult]],
                         logs: Mapping[str, Sequence[StageResult]]) -> dict[str, Any]:
    stage = {"id": failed.id, "type": failed.type, "output": failed.output, "error": failed.error}
    return {"type": "error", "success": False,
            "error": {"type": "org.osbuild.error.stage", "details": {"stage": stage}},
            "sources": _sources_section(sources, True), "log": _log_section(logs)}


def source_error_document(*, source_type: str, output: str,
                          sources: Mapping[str, Sequence[ItemResult]]) -> dict[str, Any]:
    return {"type": "error", "success": False,
            "error": {"type": "org.osbuild.error.source",
                      "details": {"source": {"type": source_type, "output": output}}},
            "sources": _sources_section(sources, False), "log": {}}


def _v1_stage(result: StageResult, committed: bool) -> dict[str, Any]:
    # osbuild reads a stage's metadata back from the pipeline's store object: none when it was not committed
    return {"id": result.id, "type": result.type, "success": result.success, "error": result.error,
            "output": result.output, "metadata": (result.metadata or None) if committed else None}


def v1_document(manifest: Manifest, logs: Mapping[str, Sequence[StageResult]]) -> dict[str, Any]:
    """osbuild's v1 `--json` result (`formats/v1.py: output`): the `tree` pipeline with its build pipelines
    nested under `build`, and the assembler pipeline's one stage as `assembler`.

    A pipeline found in the store has the stages of the build that stored it (osbuild shows none); one never
    reached counts as a success and has no `stages`: so, as osbuild, a build whose sources failed to
    download shows `"success": true` (exit 1 still).
    Unlike osbuild, a pipeline's own failure is not hidden by its build pipeline's success.
    """

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
            document["stages"] = [_v1_stage(r, success) for r in results]
        return document

    tree = manifest.by_name("tree")
    result: dict[str, Any] = pipeline_result(tree) if tree is not None else {"success": True}
    assembler = manifest.by_name("assembler")
    ran = logs.get("assembler", ()) if assembler is not None else ()
    if ran:
        result["assembler"] = _v1_stage(ran[0], ran[0].success)
        if not ran[0].success:
            result["success"] = False
    return result
