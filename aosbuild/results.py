"""What a build produced: per-stage results and the `--json` result document (osbuild's v2 shape)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
