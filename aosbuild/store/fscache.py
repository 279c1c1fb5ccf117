"""The store: a cache of trees under their ids, shared by concurrent builds, bounded in size.

Layout (osbuild's, with a format of its own; see `entries` for one entry)::

    <store>/CACHEDIR.TAG
    <store>/cache.info        {"version": 3, "maximum-size": <bytes>|"unlimited", "sources-maximum-size": ...}
    <store>/cache.lock        read-locked by every running build; `store clear` needs it write-locked
    <store>/size.lock         write-locked for the moment a commit checks the bound, evicts and renames
    <store>/objects/<id>/     committed entries
    <store>/stage/uuid-<hex>/ entries under construction, and evicted ones being removed
    <store>/tmp/uuid-<hex>/   scratch entries, always removed
    <store>/sources/<type>/<checksum>   source items (`sourcecache`)
    <store>/exports/<digest>.json       what the last export to a target left there (`exportmarks`)

The entry lifecycle is three async context managers: `load(id)` (read-locked, or `CacheMiss`),
`store(id)` (a fresh entry, committed when the block ends, discarded quietly if another build committed
the id first) and `stage()` (scratch, always removed). The size bound holds for committed trees: a
commit that would pass it first evicts the least recently used entries nobody is reading; if that is not
enough, or the tree alone is larger than the bound, the tree is not stored, and the build goes on with it.
A pending entry (a bottom layer whose walk runs beside the next stage, `aosbuild.layercheck`) is
committed before its size is known, and made room for when its builder says it is `checked`.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .. import process
from ..errors import CacheMiss, StoreError
from ..logs import get_logger
from ..sizes import Bound, format_size
from . import entries, layers, sourcecache
from .entries import Entry, LoadedEntry, NewEntry
from .locks import READ, WRITE, LockFile
from .sizes import bound_from_json, bound_to_json, default_max, default_sources_max

VERSION = 3  # 3: an entry is one stage's layer (2: a whole tree)
CACHEDIR_TAG = "Signature: 8a477f597d28d172789f06886806bc55\n# This is a cache directory tag created by aosbuild.\n"

# how a commit went
STORED = "stored"          # the entry is objects/<id> now
EXISTS = "exists"          # another build committed that id first; this copy was discarded
TOO_LARGE = "too-large"    # the tree alone is larger than the bound; not stored
NO_ROOM = "no-room"        # entries being read hold the space; not stored
UNSTORED_BELOW = "unstored-below"  # a layer below is not stored, so neither is this one

if TYPE_CHECKING:
    from .pins import Pins, TreeView

COPY_ARGV = ["cp", "--reflink=auto", "-a", "--"]
# how long a build that lost the race to commit an id waits for the winner's copy to be readable (a
# pending layer's walk takes ~0.1 s; an eviction, what removing the tree takes) before it uses its own
WINNER_WAIT = 30.0

log = get_logger(__name__)  # structlog on first use: --version and --inspect import the store


class _Keep:
    pass


KEEP: Any = _Keep()  # a limit argument left as it is in cache.info


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    max_size: Bound             # in effect, for trees
    max_size_configured: bool   # False: the default
    sources_max_size: Bound
    sources_max_size_configured: bool


class Store:
    """A store directory; `Store.open` makes or checks it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.staging = root / "stage"
        self.sources = root / "sources"
        self.tmp = root / "tmp"
        self._in_use: LockFile | None = None

    # -- opening, format and limits ------------------------------------------------------------------

    @classmethod
    def open(cls, root: Path, *, max_size: Bound = KEEP, sources_max_size: Bound = KEEP,
             use: bool = True) -> Store:
        """Open (or create) the store at `root`. With `use`, this process counts as a build using it
        until `finish`, and staging entries of dead builds are removed first."""
        store = cls(root.absolute())
        try:
            store.create_layout()
            store.check_writable()
            store.check_version()
            if max_size is not KEEP or sources_max_size is not KEEP:
                store.set_limits(max_size=max_size, sources_max_size=sources_max_size)
            if use:
                store._begin()
        except OSError as exc:
            raise StoreError(f"cannot use {store.root} as the store: {exc.strerror}; give --store a "
                             "writable directory") from exc
        return store

    def check_writable(self) -> None:
        """Fail now, not mid-build, on a store that cannot be written (a read-only mount, say)."""
        probe = self.tmp / f".probe-{uuid.uuid4().hex}"
        probe.touch()
        probe.unlink()

    def create_layout(self) -> None:
        for d in (self.objects, self.staging, self.sources, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        # trees hold what stages and registries put there: setuid files, device nodes (0666 /dev/sda,
        # say), which no other user of the machine may reach through the store
        for d in (self.objects, self.staging, self.tmp):
            if stat.S_IMODE(d.stat().st_mode) & 0o077:
                d.chmod(0o700)
        tag = self.root / "CACHEDIR.TAG"
        if not tag.exists():
            tag.write_text(CACHEDIR_TAG)
        info = self.root / "cache.info"
        if not info.exists():
            # written aside and linked into place: a concurrent reader sees all of it or nothing
            tmp = self.root / f".cache.info-{uuid.uuid4().hex}"
            tmp.write_text(json.dumps({"version": VERSION}))
            try:
                os.link(tmp, info)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()

    def read_info(self) -> dict[str, Any]:
        try:
            info = json.loads((self.root / "cache.info").read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self.root}/cache.info cannot be read ({exc}): this is not an aosbuild store, "
                             f"or a damaged one; `aosbuild store clear --store {self.root}` starts it afresh") \
                from exc
        if not isinstance(info, dict):
            raise StoreError(f"{self.root}/cache.info is not a JSON object: `aosbuild store clear --store "
                             f"{self.root}` starts the store afresh")
        return info

    def check_version(self) -> None:
        version = self.read_info().get("version")
        if version == VERSION:
            return
        if isinstance(version, int) and version > VERSION:
            what = f"a newer aosbuild (store format {version}; this aosbuild reads format {VERSION})"
            way = "use that aosbuild, or another --store, or"
        else:
            what = (f"osbuild or an older aosbuild (store format {version}; this aosbuild reads format "
                    f"{VERSION}, which keeps every stage's result as a layer, with locks and stage results)")
            way = "use another --store, or"
        raise StoreError(f"the store {self.root} was made by {what}: {way} empty this one with "
                         f"`aosbuild store clear --store {self.root}` (its trees will be built again)")

    def limits(self) -> Limits:
        info = self.read_info()
        try:
            configured = "maximum-size" in info
            max_size = bound_from_json(info["maximum-size"]) if configured else default_max(self.root)
            sources_configured = "sources-maximum-size" in info
            sources_max = (bound_from_json(info["sources-maximum-size"]) if sources_configured
                           else default_sources_max(self.root))
        except ValueError as exc:
            raise StoreError(f"{self.root}/cache.info: {exc}; set the limit again with "
                             f"`aosbuild store limit --store {self.root}`") from exc
        return Limits(max_size=max_size, max_size_configured=configured, sources_max_size=sources_max,
                      sources_max_size_configured=sources_configured)

    def set_limits(self, *, max_size: Bound = KEEP, sources_max_size: Bound = KEEP) -> None:
        """Remember new limits in cache.info (they hold for every later build on this store)."""
        with self._size_lock():
            info = self.read_info()
            if max_size is not KEEP:
                info["maximum-size"] = bound_to_json(max_size)
            if sources_max_size is not KEEP:
                info["sources-maximum-size"] = bound_to_json(sources_max_size)
            tmp = self.root / f".cache.info-{uuid.uuid4().hex}"
            tmp.write_text(json.dumps(info))
            os.rename(tmp, self.root / "cache.info")

    def remote_config(self) -> Any:
        """The store's own remote cache setting (`aosbuild store remote`), as cache.info keeps it."""
        return self.read_info().get("remote")

    def set_remote_config(self, config: dict[str, Any] | None) -> None:
        """Remember the remote cache every build on this store uses (None: none)."""
        with self._size_lock():
            info = self.read_info()
            if config is None:
                info.pop("remote", None)
            else:
                info["remote"] = config
            tmp = self.root / f".cache.info-{uuid.uuid4().hex}"
            tmp.write_text(json.dumps(info))
            os.rename(tmp, self.root / "cache.info")

    @contextmanager
    def _size_lock(self) -> Any:
        """Serialises what changes objects/ and the limits. Held for moments: taken waiting, in a thread."""
        lock = LockFile.wait_open(self.root / "size.lock", WRITE)
        try:
            yield
        finally:
            lock.close()

    # -- the life of a build on this store ---------------------------------------------------------------

    def _begin(self) -> None:
        lock = LockFile.try_open(self.root / "cache.lock", READ, create=True)
        if lock is None:  # `store clear` or a source prune is running: they take moments
            log.info("store.waiting", store=str(self.root), reason="being pruned or cleared")
            lock = LockFile.wait_open(self.root / "cache.lock", READ)
        self._in_use = lock
        dead = entries.reclaim_dead(self.staging) + entries.reclaim_dead(self.tmp)
        if dead:
            log.info("store.reclaimed", store=str(self.root), entries=dead)

    def finish(self, used_sources: Iterable[Path] = ()) -> None:
        """The build is over: mark its source items used, bring the trees under the bound (lowered by
        this build's `--cache-max-size`, maybe), and prune sources if no other build runs."""
        sourcecache.touch(used_sources)
        self.close()
        limits = self.limits()
        if limits.max_size is not None:
            self.prune(limits.max_size)
        self.prune_sources(limits.sources_max_size)

    def close(self) -> None:
        """Stop counting as a build using the store."""
        if self._in_use is not None:
            self._in_use.close()
            self._in_use = None

    def prune_sources(self, to: Bound) -> tuple[int, int] | None:
        """Prune source items down to `to` bytes, unless a build is running; None if one is."""
        if to is None:
            return 0, 0
        lock = LockFile.try_open(self.root / "cache.lock", WRITE, create=True)
        if lock is None:
            return None
        try:
            removed = sourcecache.prune(self.sources, to)
        finally:
            lock.close()
        if removed[0]:
            log.info("store.sources_pruned", items=removed[0], bytes=removed[1])
        return removed

    # -- entries ---------------------------------------------------------------------------------------

    def contains(self, object_id: str | None) -> bool:
        """Whether an entry is committed now (without locking it: it may be gone a moment later)."""
        return object_id is not None and (self.objects / object_id / entries.INFO).is_file()

    def try_load(self, object_id: str) -> LoadedEntry | None:
        """The entry, read-locked, or None: absent, or locked by a writer (a contended lock is a miss)."""
        return entries.open_committed(self.objects, object_id)

    @asynccontextmanager
    async def load(self, object_id: str) -> AsyncIterator[LoadedEntry]:
        """A committed entry, read-locked for the block: nobody evicts it meanwhile. CacheMiss if absent."""
        entry = self.try_load(object_id)
        if entry is None:
            raise CacheMiss(object_id)
        try:
            yield entry
        finally:
            entry.close()

    def _new_entry(self, parent: Path) -> NewEntry:
        try:
            return entries.create(parent)
        except OSError as exc:
            raise self.write_error("cannot make a new entry", exc) from exc

    @asynccontextmanager
    async def stage(self) -> AsyncIterator[Entry]:
        """A scratch entry, removed when the block ends, however it ends."""
        entry = self._new_entry(self.tmp)
        try:
            yield entry
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(entries.remove, entry)

    @asynccontextmanager
    async def store(self, object_id: str, *, keep: Pins | None = None, layers: Iterable[str] = (),
                    flat: bool = False, commit: bool = True) -> AsyncIterator[NewEntry]:
        """A fresh entry to fill; committed as `object_id` when the block ends without an exception.

        `layers` are the ids of the layers below it (bottom first; with `flat`, the entry is a whole tree).
        If another build committed `object_id` first, this copy is discarded quietly. Whatever the
        outcome (`entry.outcome`), with `keep` the tree stays usable in `keep` until it is closed.
        Without `commit` (its layers below are not all stored: also `entry.unstored_below`) the entry is
        only kept, as if too large. An entry made `pending` in the block is committed before its size is
        known, and stays the caller's (write-locked, not in `keep`) until `checked` or `abandon`.
        """
        entry = self._new_entry(self.staging)
        entry.layers, entry.flat = list(layers), flat
        try:
            yield entry
            stored_below = commit and not entry.unstored_below
            entry.outcome = await self._commit(entry, object_id) if stored_below else UNSTORED_BELOW
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(entries.remove, entry)
            raise
        with anyio.CancelScope(shield=True):
            await self._settle(entry, object_id, keep)

    async def _settle(self, entry: NewEntry, object_id: str, keep: Pins | None) -> None:
        """After a commit: hand the tree to `keep` or let it go."""
        if keep is not None and object_id in keep and entry.outcome != STORED:
            # two pipelines of one build made the same stage at once: the build keeps the first
            await anyio.to_thread.run_sync(entries.remove, entry)
            return
        if entry.outcome == STORED and entry.pending:
            return  # the caller's until `checked`
        if entry.outcome == STORED:
            entry.lock.change(READ)  # from writer to reader atomically: nobody can evict it in between
            if keep is not None:
                keep.adopt(LoadedEntry(object_id, entry.path, entry.lock,
                                       {"layers": entry.layers, "flat": entry.flat}))
            else:
                entry.lock.close()
            return
        if keep is not None and not (entry.outcome == EXISTS and await self._pin_winner(keep, object_id)):
            if entry.pending:  # not checked beside the next stage: floating, it is read from now on
                plain = await anyio.to_thread.run_sync(layers.make_plain, entry.tree)
                entry.flat, entry.tree_size, entry.pending = plain.readable, plain.size, False
            keep.float(object_id, entry)  # not stored, or the winner's copy is gone already: use ours
            return
        await anyio.to_thread.run_sync(entries.remove, entry)

    async def _pin_winner(self, keep: Pins, object_id: str) -> bool:
        """Pin the copy of `object_id` that another build committed first. Its write lock may be held for
        moments: it is pending (until checked, see `entries`) or being evicted; then wait for it, rather
        than keep our own copy, which would leave every layer stacked on it unstored."""
        if keep.try_pin(object_id):
            return True
        # not for ever: a stopped or hung holder must not stall this build (the thread, left waiting, only
        # takes and drops a read lock when the holder lets go)
        with anyio.move_on_after(WINNER_WAIT):
            await anyio.to_thread.run_sync(entries.wait_while_written, self.objects, object_id,
                                           abandon_on_cancel=True)
        return keep.try_pin(object_id)

    async def _commit(self, entry: NewEntry, object_id: str) -> str:
        try:
            started = time.monotonic()
            size = await anyio.to_thread.run_sync(entry.write_info)
            bound = self.limits().max_size
            if bound is not None and size is not None and size > bound:
                return TOO_LARGE
            sized = time.monotonic()
            outcome, evicted = await anyio.to_thread.run_sync(self._commit_locked, entry, object_id, size)
            log.debug("store.commit", id=object_id, info_ms=round((sized - started) * 1000, 1),
                      locked_ms=round((time.monotonic() - sized) * 1000, 1))
        except OSError as exc:
            raise self.write_error(f"cannot commit {object_id}", exc) from exc
        if evicted:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_remove_all, evicted)
        return outcome

    def _commit_locked(self, entry: NewEntry, object_id: str, size: int | None) -> tuple[str, list[Entry]]:
        """Rename the entry into objects/ under the size lock, evicting first what its size needs (a
        pending entry's, unknown yet, is made room for by `checked`)."""
        with self._size_lock():
            if self.contains(object_id):
                return EXISTS, []
            evicted: list[Entry] = []
            if size is not None:
                room = self._make_room(entries.list_committed(self.objects), size)
                if room is None:
                    return NO_ROOM, []
                evicted = room
            if not entries.commit(entry, self.objects, object_id):
                return EXISTS, evicted
            return STORED, evicted

    def _make_room(self, committed: list[entries.Committed], size: int) -> list[Entry] | None:
        """Under the size lock: evict least recently used entries until `size` more bytes fit the bound;
        what was moved out (to be removed after the lock), or None if entries being read hold the room."""
        bound = self.limits().max_size
        if bound is None:
            return []
        excess = sum(c.size for c in committed) + size - bound
        if excess <= 0:
            return []
        taken = self._take_lru(committed, excess)
        if sum(c.size for c, _ in taken) < excess:
            for _, lock in taken:
                lock.close()
            return None
        return self._move_out(taken)

    async def checked(self, entry: NewEntry, object_id: str, keep: Pins | None, *,
                      may_move: bool = True) -> str | None:
        """A pending entry is checked (its `tree_size` and `flat` set): write its object.info whole and
        bring the trees under the bound with its size counted, then let others read it, and `keep` hold
        it. Without room in the bound for it, it leaves objects/ again and floats in `keep` (outcome
        TOO_LARGE or NO_ROOM), as it would have at its commit; or, unless it `may_move` (a running
        stage's mount is being made of its path), it stays as it is, the caller's, to be checked again
        later (None). Returns the outcome."""
        assert entry.outcome == STORED
        with anyio.CancelScope(shield=True):
            try:
                size = await anyio.to_thread.run_sync(entry.write_checked_info)
                outcome, evicted = await anyio.to_thread.run_sync(self._checked_locked, entry, object_id, size,
                                                                  may_move)
            except OSError as exc:
                await self.abandon(entry, object_id)
                raise self.write_error(f"cannot commit {object_id}", exc) from exc
            if evicted:
                await anyio.to_thread.run_sync(_remove_all, evicted)
            if outcome is None:
                return None
            entry.outcome = outcome
            await self._settle(entry, object_id, keep)
        return outcome

    def _checked_locked(self, entry: NewEntry, object_id: str, size: int,
                        may_move: bool) -> tuple[str | None, list[Entry]]:
        with self._size_lock():
            bound = self.limits().max_size
            outcome = TOO_LARGE if bound is not None and size > bound else STORED
            if outcome == STORED:
                others = [c for c in entries.list_committed(self.objects) if c.id != object_id]
                room = self._make_room(others, size)
                if room is not None:
                    return STORED, room
                outcome = NO_ROOM
            if not may_move:
                return None, []
            entry.path = entries.move_out(self.objects, object_id, self.staging, entry.lock).path
            return outcome, []

    async def abandon(self, entry: NewEntry, object_id: str) -> None:
        """Remove a pending entry that will not be checked (its check failed)."""
        def take_out() -> None:
            if entry.path.parent == self.objects:
                with self._size_lock():
                    entry.path = entries.move_out(self.objects, object_id, self.staging, entry.lock).path
            entries.remove(entry)

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(take_out)

    def _take_lru(self, committed: list[entries.Committed], need: int) -> list[tuple[entries.Committed, LockFile]]:
        """Write locks on the least recently used entries, until they are worth `need` bytes or there are
        no more; entries being read are skipped, never waited for."""
        taken: list[tuple[entries.Committed, LockFile]] = []
        freed = 0
        for candidate in committed:
            if freed >= need:
                break
            lock = entries.take_for_eviction(self.objects, candidate.id)
            if lock is not None:
                taken.append((candidate, lock))
                freed += candidate.size
        return taken

    def _move_out(self, taken: list[tuple[entries.Committed, LockFile]]) -> list[Entry]:
        """Evict: move the taken entries out of objects/ (at once), to be removed after the size lock."""
        moved: list[Entry] = []
        try:
            for committed, lock in taken:
                moved.append(entries.move_out(self.objects, committed.id, self.staging, lock))
        finally:
            for _, lock in taken[len(moved):]:
                lock.close()
        if moved:
            log.info("store.evicted", ids=[c.id for c, _ in taken], bytes=sum(c.size for c, _ in taken))
        return moved

    def prune(self, to: int) -> tuple[int, int]:
        """Evict least recently used entries until the trees take at most `to` bytes, as far as entries
        being read allow; returns (entries, bytes) evicted. Blocking: for the store commands."""
        with self._size_lock():
            committed = entries.list_committed(self.objects)
            taken = self._take_lru(committed, sum(c.size for c in committed) - to)
            evicted = self._move_out(taken)
        _remove_all(evicted)
        return len(evicted), sum(c.size for c, _ in taken[:len(evicted)])

    def write_error(self, what: str, exc: OSError) -> StoreError:
        """A StoreError for a failed write that says why; for a full disk, what to do about it."""
        if exc.errno == errno.ENOSPC:
            free = os.statvfs(self.root)
            return StoreError(f"{what}: the filesystem of the store {self.root} is full "
                              f"({format_size(free.f_bavail * free.f_frsize)} free). Free some space there, or "
                              f"lower the bound of the store: aosbuild store prune --to SIZE --store {self.root}")
        return StoreError(f"{what} in the store {self.root}: {exc.strerror or exc}; check that the store's "
                          "filesystem is writable, or give --store another directory")

    def source_path(self, content_type: str, checksum: str) -> Path:
        return self.sources / content_type / checksum


    async def copy(self, src: Path, dst: Path, what: str) -> None:
        """`copy_tree` into the store; a full disk is a StoreError that says so."""
        try:
            await copy_tree(src, dst)
        except process.CommandError as exc:
            if "No space left on device" in exc.output:
                raise self.write_error(what, OSError(errno.ENOSPC, "No space left on device")) from exc
            raise


    async def copy_view(self, view: TreeView, dst: Path, what: str) -> None:
        """Copy the tree `view` shows, flattened, into `dst` (through a mount of its layers that only
        the copying command's own mount namespace has: whiteouts and overlay xattrs are not copied).
        A tree of one layer that holds neither is copied directly (reflinks where the filesystem has them)."""
        if view.flat:
            await self.copy(view.layers[0], dst, what)
            return
        if len(view.layers) == 1 and await anyio.to_thread.run_sync(layers.shows_as_is, view.layers[0]):
            await self.copy(view.layers[0], dst, what)
            await anyio.to_thread.run_sync(layers.strip_overlay_xattrs, dst)
            return
        dst = Path(await anyio.Path(dst).absolute())  # the mounting command runs in the store's directory
        async with self.stage() as scratch:
            target, empty = scratch.path / "view", scratch.path / "empty"
            target.mkdir()
            empty.mkdir()
            await anyio.Path(dst).mkdir(parents=True, exist_ok=True)
            mount = layers.Overlay(target=target, lowers=view.layers, empty=empty)
            argv = layers.namespace_argv(self.root, [mount], [*COPY_ARGV, f"{target}/.", f"{dst}/"], [str(dst)],
                                         scratch=scratch.path)
            try:
                await process.run(argv)
            except process.CommandError as exc:
                if "No space left on device" in exc.output:
                    raise self.write_error(what, OSError(errno.ENOSPC, "No space left on device")) from exc
                raise


def _remove_all(evicted: list[Entry]) -> None:
    for entry in evicted:
        entries.remove(entry)


async def copy_tree(src: Path, dst: Path) -> None:
    """Copy a tree's contents with owners, modes, links and xattrs, sharing blocks where the fs can."""
    await anyio.Path(dst).mkdir(parents=True, exist_ok=True)
    await process.run([*COPY_ARGV, f"{src}/.", f"{dst}/"])
