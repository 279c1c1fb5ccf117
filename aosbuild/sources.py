"""Sources: fetching the items a manifest names by checksum into `store/sources/<content-type>/`.

Items are fetched while pipelines run: every item is its own task, each has a readiness event, and a
pipeline waits only for the items its own stages use. How an item is fetched is up to its source type's
fetcher (`aosbuild.fetchers`); this module orchestrates: an item already in the store is not fetched
again, an item is fetched under a per-item lock so that several aosbuild processes sharing a store fetch
it once, and every item's outcome and every byte are reported to the monitor.

A source type aosbuild has no fetcher for is fetched by an osbuild library's module for it, run as
osbuild runs sources (a host service's `download`, i.e. its `fetch_all`), into the same directory.

A failed item fails its source at once in a build (the build cannot succeed); with `keep_going`, as
`--sources-only` runs, every other item is still fetched and all failures are reported at the end.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from .checksum import VerifiedFile
from .download import Downloader, DownloadOptions, open_downloader
from .errors import ChecksumMismatch, DownloadError, SandboxError, SourceError
from .fetchers import FETCHERS, Fetcher
from .hostservices import download_with_service
from .manifest import Source
from .moduleinfo import ModuleInfo
from .monitor import Monitor
from .store import Store, sourcecache

CONTENT_TYPE = "org.osbuild.files"
PROGRESS_INTERVAL = 0.1          # seconds between byte-progress events of one source
LOCK_POLL = (0.02, 0.5)          # first and longest wait between tries of a contended item lock


@dataclass(frozen=True, slots=True, kw_only=True)
class ItemResult:
    checksum: str
    cached: bool
    error: str | None = None
    size: int = 0                # bytes of the item in the store


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceProgress:
    """How far one source is: items, and bytes of the items whose size is known so far."""

    items_total: int
    items_done: int              # fetched, found cached, or failed
    items_failed: int
    bytes_done: int
    bytes_total: int
    sized: int                   # items whose size is known; bytes_total is a lower bound until all are


@asynccontextmanager
async def item_lock(item: Path, on_wait: Callable[[], None]) -> AsyncIterator[None]:
    """Hold the item's lock (`sourcecache.take_lock`) while this process fetches it.

    A non-blocking try, retried with backoff, so the event loop never blocks.
    """
    delay, longest = LOCK_POLL
    waited = False
    while (fd := sourcecache.take_lock(item)) is None:
        if not waited:
            on_wait()
            waited = True
        await anyio.sleep(delay)
        delay = min(delay * 2, longest)
    try:
        yield
    finally:
        sourcecache.release_lock(item, fd)


class _Run:
    """One source being fetched: its items' outcomes and its progress."""

    def __init__(self, source: Source, items: Mapping[str, Any], monitor: Monitor) -> None:
        self.source = source
        self.items = items
        self.monitor = monitor
        self.results: dict[str, ItemResult] = {}
        self.failures: list[SourceError] = []
        self.sizes: dict[str, int] = {}
        self.bytes_done = 0
        self._reported = 0.0

    def progress(self) -> SourceProgress:
        return SourceProgress(items_total=len(self.items), items_done=len(self.results),
                              items_failed=len(self.failures), bytes_done=self.bytes_done,
                              bytes_total=sum(self.sizes.values()), sized=len(self.sizes))

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._reported >= PROGRESS_INTERVAL:
            self._reported = now
            self.monitor.source_progress(self.source, self.progress())

    def log(self, message: str) -> None:
        self.monitor.source_log(self.source, message)


class _ItemProgress:
    """The `download.Progress` of one item, counted into its source's totals."""

    def __init__(self, run: _Run, checksum: str, label: str) -> None:
        self.run = run
        self.checksum = checksum
        self.label = label
        self.received = 0

    def expect(self, size: int) -> None:
        self.run.sizes[self.checksum] = size
        self.run.report()

    def advance(self, nbytes: int) -> None:
        self.received += nbytes
        self.run.bytes_done += nbytes
        self.run.report()

    def rewind(self, nbytes: int) -> None:
        self.received -= nbytes
        self.run.bytes_done -= nbytes

    def retry(self, message: str) -> None:
        self.run.log(f"Retrying {self.label}: {message}")


class Sources:
    """Fetches the items of a manifest's sources and lets pipelines wait for the ones they use.

    `only` limits the items to those checksums (a source left with none is skipped altogether). An item
    in the store is used if it is unchanged since it was verified (`sourcecache.check`; with `verify`,
    only after hashing it again); a damaged one is removed and fetched again.
    """

    def __init__(self, store: Store, sources: Iterable[Source], monitor: Monitor, *,
                 download: DownloadOptions | None = None, only: Collection[str] | None = None,
                 keep_going: bool = False, verify: bool = False,
                 library: Callable[[str], ModuleInfo | None] = lambda name: None,
                 fetchers: Mapping[str, Callable[[Downloader], Fetcher]] = FETCHERS) -> None:
        self.store = store
        self.library = library  # a source's module in an osbuild library, for types aosbuild cannot fetch
        self.fetchers = fetchers
        self.verify = verify  # hash every item in the store before trusting it, not only changed ones
        self.monitor = monitor
        self.download = download or DownloadOptions()
        self.keep_going = keep_going
        self.selected: list[tuple[Source, dict[str, Any]]] = []
        for source in sources:
            items = {c: d for c, d in source.items.items() if only is None or c in only}
            if items or only is None:
                self.selected.append((source, items))
        self.sources = tuple(source for source, _ in self.selected)
        self._ready = {checksum: anyio.Event() for _, items in self.selected for checksum in items}
        self._runs: dict[str, _Run] = {}
        # a second place to fetch items from before their own URLs: the remote cache (checksum, target)
        # -> whether it had the item, put at target verified
        self.mirror: Callable[[str, Path], Awaitable[str | None]] | None = None

    def restrict(self, only: Collection[str]) -> None:
        """Before `fetch_all`: fetch only the items `only` names (what the stages left to run use, once a
        remote cache gave the rest); sources left with none are skipped."""
        self.selected = [(source, kept) for source, items in self.selected
                         if (kept := {c: d for c, d in items.items() if c in only})]
        self.sources = tuple(source for source, _ in self.selected)

    @property
    def results(self) -> dict[str, list[ItemResult]]:
        """Each source's item results so far, in the manifest's order."""
        return {t: [run.results[c] for c in run.items if c in run.results] for t, run in self._runs.items()}

    def path(self, checksum: str) -> Path:
        return self.store.source_path(CONTENT_TYPE, checksum)

    async def wait_for(self, checksums: Iterable[str]) -> None:
        for checksum in checksums:
            event = self._ready.get(checksum)
            if event is not None:
                await event.wait()

    async def fetch_all(self) -> None:
        """Fetch every item; raises the first item's SourceError once its source has stopped."""
        async with open_downloader(self.download) as downloader, anyio.create_task_group() as tg:
            for source, items in self.selected:
                factory = self.fetchers.get(source.type)
                module = self.library(source.type) if factory is None else None
                if module is not None and module.path is not None:
                    tg.start_soon(self._fetch_with_service, source, items, module)
                    continue
                fetcher = factory(downloader) if factory else None
                tg.start_soon(self._fetch_source, source, items, fetcher)

    async def _fetch_with_service(self, source: Source, items: dict[str, Any], module: ModuleInfo) -> None:
        """A source type aosbuild has no fetcher for, fetched by its osbuild module's `fetch_all`, run as
        osbuild runs it: one host service for all the items, into `sources/<content type>/` of the store."""
        run = self._runs[source.type] = _Run(source, items, self.monitor)
        self.monitor.source_started(source)
        if items:
            try:
                replies = await download_with_service(module, source.type, items, source.options,
                                                       self.store.sources, on_line=run.log)
            except SandboxError as exc:
                replies = [{"success": False, "error": str(exc), "metadata": {"checksum": c}} for c in items]
            for reply in replies:
                metadata = reply.get("metadata") or {}
                checksum = str(metadata.get("checksum", ""))
                if checksum not in items:
                    continue
                if reply.get("success", False):
                    run.results[checksum] = ItemResult(checksum=checksum, cached=bool(metadata.get("cached")))
                    self._ready[checksum].set()
                else:
                    error = SourceError(source.type, checksum, str(reply.get("error") or "failed"))
                    run.failures.append(error)
                    run.results[checksum] = ItemResult(checksum=checksum, cached=False, error=str(error))
                    run.log(f"Error: {error}\n")
            for checksum in items:
                if checksum not in run.results:
                    error = SourceError(source.type, checksum, "its host service gave no result for it")
                    run.failures.append(error)
                    run.results[checksum] = ItemResult(checksum=checksum, cached=False, error=str(error))
        run.report(force=True)
        results = [run.results[c] for c in items if c in run.results]
        self.monitor.source_finished(source, results, success=not run.failures)
        if run.failures:
            raise run.failures[0]

    async def _fetch_source(self, source: Source, items: dict[str, Any], fetcher: Fetcher | None) -> None:
        run = self._runs[source.type] = _Run(source, items, self.monitor)
        self.monitor.source_started(source)
        async with anyio.create_task_group() as tg:
            for checksum, description in items.items():
                tg.start_soon(self._fetch_item, run, fetcher, checksum, description, tg.cancel_scope)
        run.report(force=True)
        results = [run.results[c] for c in items if c in run.results]
        self.monitor.source_finished(source, results, success=not run.failures)
        if run.failures:
            raise run.failures[0]

    async def _fetch_item(self, run: _Run, fetcher: Fetcher | None, checksum: str, description: Any,
                          scope: anyio.CancelScope) -> None:
        source_type = run.source.type
        target = self.path(checksum)
        label = fetcher.label(description) if fetcher else None
        progress = _ItemProgress(run, checksum, label or checksum)
        try:
            cached = not self.verify and sourcecache.recorded(target)
            if not cached:
                target.parent.mkdir(parents=True, exist_ok=True)
                waiting = f"Waiting for another aosbuild process to fetch {label or checksum}\n"
                async with item_lock(target, on_wait=lambda: run.log(waiting)):
                    # the other process may have fetched it meanwhile; what is there is checked first
                    cached = await anyio.to_thread.run_sync(self._check_cached, run, target, checksum, label)
                    mirrored = None if cached or self.mirror is None else await self.mirror(checksum, target)
                    if mirrored is not None:
                        sourcecache.record(target)
                        run.log(f"Fetched {label or checksum} from the remote cache {mirrored}\n")
                    elif not cached:
                        if fetcher is None:
                            raise SourceError(source_type, checksum,
                                              f"aosbuild cannot fetch items of {source_type} itself: give "
                                              "--libdir osbuild's library, whose source module fetches them")
                        with VerifiedFile(target, checksum) as out:
                            await fetcher.fetch(checksum, description, out, progress)
                        sourcecache.record(target)
                        if label:
                            run.log(f"Downloaded {label}\n")
            size = target.stat().st_size
        except (DownloadError, ChecksumMismatch, ValueError) as exc:
            self._failed(run, progress, SourceError(source_type, checksum, str(exc)), scope)
        except OSError as exc:
            message = (f"cannot write {exc.filename or target}: {exc.strerror}; check that the store's "
                       "filesystem is writable and has room")
            self._failed(run, progress, SourceError(source_type, checksum, message), scope)
        except SourceError as exc:
            self._failed(run, progress, exc, scope)
        else:
            run.sizes[checksum] = size
            if cached:
                run.bytes_done += size
            run.results[checksum] = ItemResult(checksum=checksum, cached=cached, size=size)
            self._ready[checksum].set()
            run.report(force=True)

    def _check_cached(self, run: _Run, target: Path, checksum: str, label: str | None) -> bool:
        """Whether the item in the store is good; a damaged one is removed, with a warning. Blocking."""
        try:
            problem = sourcecache.check(target, checksum, full=self.verify)
        except FileNotFoundError:
            return False
        if problem is None:
            return True
        sourcecache.discard(target)
        run.log(f"Warning: the stored item {checksum} is damaged ({problem}): removed, fetching it again"
                f"{f' from {label}' if label else ''}\n")
        return False

    def _failed(self, run: _Run, progress: _ItemProgress, error: SourceError, scope: anyio.CancelScope) -> None:
        run.bytes_done -= progress.received
        run.sizes.pop(error.checksum, None)
        run.failures.append(error)
        run.results[error.checksum] = ItemResult(checksum=error.checksum, cached=False, error=str(error))
        run.log(f"Error: {error}\n")
        run.report(force=True)
        if not self.keep_going:
            scope.cancel()
