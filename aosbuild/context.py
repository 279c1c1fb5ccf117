"""The build context: the one object that carries a build's settings and shared services downward."""

from __future__ import annotations

from dataclasses import dataclass, field

from .library import Library
from .manifest import Manifest, Pipeline
from .monitor import Monitor
from .results import StageResult
from .sources import Sources
from .store import Pins, Store


def default_jobs() -> int:
    """Pipelines mostly wait on subprocesses and I/O, so run at least 4 even on small machines."""
    import os

    return max(4, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildOptions:
    jobs: int = field(default_factory=default_jobs)
    checkpoints: frozenset[str] = frozenset()   # stage ids to keep in the store besides pipeline ends
    stage_timeout: float | None = None


@dataclass(kw_only=True)
class BuildContext:
    manifest: Manifest
    store: Store
    library: Library
    monitor: Monitor
    sources: Sources
    options: BuildOptions
    # what this run did, for --json and the summary
    logs: dict[str, list[StageResult]] = field(default_factory=dict)
    failed: StageResult | None = None
    cached: list[Pipeline] = field(default_factory=list)  # found whole in the store, reported from it
    pins: Pins = field(init=False)  # the store entries this build relies on, held until it ends

    def __post_init__(self) -> None:
        self.pins = Pins(self.store)
