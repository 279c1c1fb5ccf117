"""What the store remembers of its recent builds: their progress streams and how long each stage took.

Both live in `STORE/history/`, beside the trees, and are bounded:

- `builds/*.jsonseq`: the `--monitor jsonseq` stream of each of the last `KEEP_BUILDS` builds (at most
  `KEEP_BYTES` together), written whatever monitor the user chose, so that `aosbuild report --last`
  needs nothing saved beforehand. Pruned at the end of every build and by `aosbuild store prune`.
- `durations.json`: the last duration of up to `KEEP_STAGES` stage ids, and a running mean per stage
  type, from which the live view estimates the time left of a build.

A store from before this module simply has no history; a damaged record is ignored, never an error:
it only ever makes estimates worse.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .monitor import JsonSeqMonitor

if TYPE_CHECKING:
    from .manifest import Pipeline, Stage

KEEP_BUILDS = 20
KEEP_BYTES = 64 << 20
KEEP_STAGES = 4096
OUTPUT_BUDGET = 1 << 20  # bytes of stage output lines one saved stream keeps: the timings are what it is
# for, and each stage's result record carries its last 31000 bytes of output anyway


class History:
    """The history directory of one store."""

    def __init__(self, store_root: Path) -> None:
        self.root = store_root / "history"
        self.builds = self.root / "builds"
        self.durations_file = self.root / "durations.json"

    # -- streams

    def new_stream(self) -> int:
        """A descriptor to write this build's jsonseq stream to; named so that names sort by start time."""
        self.builds.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonseq"
        return os.open(self.builds / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def streams(self) -> list[Path]:
        """The saved streams, oldest first."""
        try:
            return sorted(p for p in self.builds.iterdir() if p.suffix == ".jsonseq")
        except FileNotFoundError:
            return []

    def last_stream(self) -> Path | None:
        streams = self.streams()
        return streams[-1] if streams else None

    def prune(self, keep: int = KEEP_BUILDS, keep_bytes: int = KEEP_BYTES) -> int:
        """Remove the oldest streams beyond the bounds (the newest is always kept); returns how many."""
        streams = self.streams()
        sizes = {}
        for path in streams:
            try:
                sizes[path] = path.stat().st_size
            except FileNotFoundError:
                sizes[path] = 0
        removed = 0
        while len(streams) > 1 and (len(streams) > keep or sum(sizes[p] for p in streams) > keep_bytes):
            streams.pop(0).unlink(missing_ok=True)
            removed += 1
        return removed

    # -- durations

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def durations(self) -> Durations:
        try:
            data = json.loads(self.durations_file.read_text())
        except (OSError, ValueError):
            data = {}
        return Durations.from_json(data if isinstance(data, dict) else {})

    def record(self, timed: Mapping[str, tuple[str, float]]) -> None:
        """Remember how long the stages built just now took: `{stage id: (type, seconds)}`."""
        if not timed:
            return
        with self._locked():
            durations = self.durations()
            for stage_id, (stage_type, seconds) in timed.items():
                durations.add(stage_id, stage_type, seconds)
            tmp = self.root / f".durations-{uuid.uuid4().hex}"
            tmp.write_text(json.dumps(durations.to_json()))
            os.rename(tmp, self.durations_file)


class SavedStream(JsonSeqMonitor):
    """The jsonseq stream the store keeps of a build: every record, but stage output only up to a budget,
    so that a stage flooding its output cannot fill the store's filesystem."""

    def __init__(self, fd: int, budget: int = OUTPUT_BUDGET) -> None:
        super().__init__(fd)
        self.budget = budget

    def stage_output(self, pipeline: Pipeline, stage: Stage, text: str) -> None:
        if self.budget <= 0:
            return
        self.budget -= len(text)
        super().stage_output(pipeline, stage, text)


class Durations:
    """Stage id -> seconds (the newest last, bounded) and stage type -> (mean seconds, count)."""

    def __init__(self, stages: dict[str, float], types: dict[str, tuple[float, int]]) -> None:
        self.stages = stages
        self.types = types

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Durations:
        stages: dict[str, float] = {}
        types: dict[str, tuple[float, int]] = {}
        for key, value in (data.get("stages") or {}).items():
            if isinstance(value, int | float):
                stages[str(key)] = float(value)
        for key, value in (data.get("types") or {}).items():
            if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
                types[str(key)] = (float(value[0]), int(value[1]))
        return cls(stages, types)

    def to_json(self) -> dict[str, Any]:
        return {"stages": self.stages, "types": {k: list(v) for k, v in self.types.items()}}

    def add(self, stage_id: str, stage_type: str, seconds: float) -> None:
        self.stages.pop(stage_id, None)
        self.stages[stage_id] = round(seconds, 3)
        while len(self.stages) > KEEP_STAGES:
            del self.stages[next(iter(self.stages))]
        mean, count = self.types.get(stage_type, (0.0, 0))
        count = min(count, 99)  # a moving mean: recent builds weigh more than the first hundred
        self.types[stage_type] = (round((mean * count + seconds) / (count + 1), 3), count + 1)

    def expect(self, stage_id: str, stage_type: str) -> float | None:
        """How long the stage will take: as it took last time, else as its type takes on average."""
        if stage_id in self.stages:
            return self.stages[stage_id]
        if stage_type in self.types:
            return self.types[stage_type][0]
        return None
