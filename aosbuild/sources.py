"""Sources: fetching the items a manifest names by checksum into `store/sources/<content-type>/`.

Items are fetched while pipelines run: each item has a readiness event, and a pipeline waits only for the
items its own stages use. Only a verified item is renamed into place, so a present file is a good file.
"""

from __future__ import annotations

import base64
import hashlib
import lzma
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio

from .errors import SourceError
from .manifest import Source
from .monitor import Monitor
from .store import Store

CONTENT_TYPE = "org.osbuild.files"
ALGORITHMS = ("md5", "sha1", "sha256", "sha384", "sha512")


@dataclass(frozen=True, slots=True, kw_only=True)
class ItemResult:
    checksum: str
    cached: bool
    error: str | None = None


def checksum_of(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"{algorithm}:{h.hexdigest()}"


def check_bytes(data: bytes, checksum: str) -> None:
    algorithm, _, expected = checksum.partition(":")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unsupported checksum algorithm '{algorithm}'")
    actual = hashlib.new(algorithm, data).hexdigest()
    if actual != expected:
        raise ValueError(f"checksum mismatch: expected {checksum}, got {algorithm}:{actual}")


def write_verified(target: Path, data: bytes, checksum: str) -> None:
    """Verify `data` and move it into place atomically; nothing is left behind on a mismatch."""
    check_bytes(data, checksum)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".unverified-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


class Fetcher(Protocol):
    async def fetch(self, checksum: str, description: Any, target: Path) -> None: ...


class InlineFetcher:
    """org.osbuild.inline: the data is in the manifest, base64 or lzma+base64."""

    async def fetch(self, checksum: str, description: Any, target: Path) -> None:
        data = base64.b64decode(description["data"])
        if description.get("encoding") == "lzma+base64":
            data = lzma.decompress(data)
        try:
            write_verified(target, data, checksum)
        except ValueError as exc:
            raise SourceError("org.osbuild.inline", checksum, str(exc)) from None


FETCHERS: dict[str, Fetcher] = {"org.osbuild.inline": InlineFetcher()}


class Sources:
    """Fetches every item of a manifest's sources and lets pipelines wait for the ones they use."""

    def __init__(self, store: Store, sources: Iterable[Source], monitor: Monitor) -> None:
        self.store = store
        self.sources = tuple(sources)
        self.monitor = monitor
        self._ready = {checksum: anyio.Event() for s in self.sources for checksum in s.items}
        self.results: dict[str, list[ItemResult]] = {}

    def path(self, checksum: str) -> Path:
        return self.store.source_path(CONTENT_TYPE, checksum)

    async def wait_for(self, checksums: Iterable[str]) -> None:
        for checksum in checksums:
            event = self._ready.get(checksum)
            if event is not None:
                await event.wait()

    async def fetch_all(self) -> None:
        async with anyio.create_task_group() as tg:
            for source in self.sources:
                tg.start_soon(self._fetch_source, source)

    async def _fetch_source(self, source: Source) -> None:
        fetcher = FETCHERS.get(source.type)
        self.monitor.source_started(source)
        results: list[ItemResult] = []
        self.results[source.type] = results
        try:
            for checksum, description in source.items.items():
                target = self.path(checksum)
                cached = target.exists()
                if not cached:
                    if fetcher is None:
                        raise SourceError(source.type, checksum,
                                          f"aosbuild cannot fetch items of {source.type} yet")
                    await fetcher.fetch(checksum, description, target)
                results.append(ItemResult(checksum=checksum, cached=cached))
                self._ready[checksum].set()
        except SourceError as exc:
            results.append(ItemResult(checksum=exc.checksum, cached=False, error=str(exc)))
            self.monitor.source_finished(source, results, success=False)
            raise
        self.monitor.source_finished(source, results, success=True)
