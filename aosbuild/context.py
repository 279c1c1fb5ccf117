"""The build context: the one object that carries a build's settings and shared services downward.

What the build did travels back up as events to the monitor (`buildreport.Recorder`), not through here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .library import Library
from .manifest import Manifest
from .monitor import Monitor
from .sources import Sources
from .store import Pins, Store

if TYPE_CHECKING:
    from .remotecache import RemoteCache


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
    pins: Pins = field(init=False)  # the store entries this build relies on, held until it ends
    remote: RemoteCache | None = None  # the store's second tier (--cache-remote), while the build runs

    def __post_init__(self) -> None:
        self.pins = Pins(self.store)
