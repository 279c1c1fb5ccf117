"""What one stage of a build produced, as the builder reports it and the store keeps it.

The `--json` documents made of these are each format's `output` (`aosbuild/formats/`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
