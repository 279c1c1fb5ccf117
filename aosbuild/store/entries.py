"""Store entries on disk, and the lock protocol that makes them safe to share between processes.

An entry is a directory::

    object.lock          the entry's lock file; its atime is the entry's last use (for LRU eviction)
    object.info          {"size": <bytes on disk>, "created": <unix time>, "layers": [<id>, ...],
                         "flat": <bool>, "pipeline": <name>}, written just before commit; a layer
                         committed before its check (`pending`) has "size": null and "pending": true
                         until its builder writes it again (`write_checked_info`)
    data/tree/           a layer (`layers`): what one stage changed, over the entries `layers` names
                         (bottom first); or, `flat`, a whole tree as one plain directory
    data/meta/           <stage-id>.json: metadata a stage reported (osbuild's layout), and
                         results.json: every stage's result (id, type, output, duration, metadata)

The protocol, which every function here follows:

- An entry under construction lives in `stage/` (or `tmp/`, for scratch space) as `uuid-<hex>`, and its
  creator holds a write lock on its `object.lock` for as long as it lives. A staging entry whose lock can
  be taken has lost its owner (killed, crashed): whoever takes the lock may remove it.
- A committed entry is `objects/<id>`, put there by renaming a staging entry, which cannot replace a
  non-empty directory: two builds of one id never overwrite each other, the second one loses quietly.
- Readers hold a read lock; evicting takes a write lock without waiting, so an entry that is read is
  never evicted and an entry being evicted is a miss. Eviction first renames the entry back into `stage/`
  (still locked), so `objects/` only ever shows complete entries.
- Whoever takes a lock checks afterwards that the path still names the file it locked: between its
  `open()` and its lock, the previous holder may have renamed the entry or removed it.
- Removing an entry removes its data first and its lock file last, so a directory in `stage/` with data
  in it always has a lock file, and one without a lock file is empty (and can go with `rmdir`).
- A committed entry is checked when it is loaded, cheaply (`damage`: its structure, not its contents);
  a damaged one is a miss, and is removed under its write lock if nobody else reads it.
- A pending entry (a bottom layer committed while the walk that checks it and counts its size runs
  beside the next stage) keeps its creator's write lock until its object.info is whole: nobody else
  reads or evicts it meanwhile, and the bound counts it at its size walked anew (`list_committed`). If
  its creator dies first, it is damaged (removed when next loaded or evicted), never read.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..logs import get_logger
from ..sandboxside.runnerlib import MNT_DETACH, umount
from .locks import READ, WRITE, LockFile, wait_lock
from .sizes import disk_usage

LOCK = "object.lock"
INFO = "object.info"
RESULTS = "results.json"

log = get_logger(__name__)  # structlog on first use: --version and --inspect import the store


class Entry:
    """An entry this process holds: under construction (write-locked) or committed (read-locked)."""

    def __init__(self, path: Path, lock: LockFile) -> None:
        self.path = path
        self.lock = lock

    @property
    def tree(self) -> Path:
        return self.path / "data" / "tree"

    @property
    def meta(self) -> Path:
        return self.path / "data" / "meta"


class NewEntry(Entry):
    """An entry under construction, with the stage results that go with its tree."""

    def __init__(self, path: Path, lock: LockFile) -> None:
        super().__init__(path, lock)
        self.results: list[dict[str, Any]] = []
        self.outcome: str | None = None  # how its commit went: one of fscache's outcomes
        self.size = 0                    # bytes on disk, known once it is committed
        self.tree_size: int | None = None  # the tree's, if counted after its last change (make_plain)
        self.layers: list[str] = []      # the ids of the layers below this one, bottom first
        self.flat = False                # a whole tree in one directory, not a layer
        self.pipeline = ""               # the name of the pipeline that built it, for `store info`
        self.pending = False             # committed before its tree is checked and counted (see above)
        self.unstored_below = False      # a layer below turned out not stored: do not commit this one
        self.created = 0.0

    def add_result(self, result: dict[str, Any]) -> None:
        """Record a finished stage: its result, and its metadata in osbuild's place if there is any."""
        self.results.append(result)
        if result.get("metadata"):
            (self.meta / f"{result['id']}.json").write_text(json.dumps(result["metadata"]))

    def write_info(self) -> int | None:
        """Write results and object.info, the last files of an entry; returns its size on disk (None:
        pending, its size is not known yet)."""
        (self.meta / RESULTS).write_text(json.dumps(self.results))
        self.created = time.time()
        if self.pending:
            with open(self.path / INFO, "x") as f:
                json.dump({**self._info(None), "pending": True}, f)
            return None
        self.size = self._count()
        with open(self.path / INFO, "x") as f:
            json.dump(self._info(self.size), f)
        return self.size

    def write_checked_info(self) -> int:
        """A pending entry's object.info, written again whole (aside, then renamed over the first: a
        reader sees one or the other) once its tree is checked and `tree_size` known; returns its size."""
        self.size = self._count()
        aside = self.path / f".{INFO}-{uuid.uuid4().hex}"
        aside.write_text(json.dumps(self._info(self.size)))
        os.rename(aside, self.path / INFO)
        self.pending = False
        return self.size

    def _count(self) -> int:
        known = {} if self.tree_size is None else {os.fspath(self.tree): self.tree_size}
        return disk_usage(self.path, known=known)

    def _info(self, size: int | None) -> dict[str, Any]:
        return {"size": size, "created": self.created, "layers": self.layers, "flat": self.flat,
                "pipeline": self.pipeline}


class LoadedEntry(Entry):
    """A committed entry, read-locked: it stays as it is, and is not evicted, until closed."""

    def __init__(self, object_id: str, path: Path, lock: LockFile, info: dict[str, Any]) -> None:
        super().__init__(path, lock)
        self.id = object_id
        self.info = info
        self._results: list[dict[str, Any]] | None = None

    @property
    def layers(self) -> list[str]:
        return list(self.info.get("layers", []))

    @property
    def flat(self) -> bool:
        return bool(self.info.get("flat"))

    @property
    def results(self) -> list[dict[str, Any]]:
        if self._results is None:
            try:
                self._results = json.loads((self.meta / RESULTS).read_text())
            except FileNotFoundError:
                self._results = []
        return self._results

    def close(self) -> None:
        self.lock.close()


def create(parent: Path) -> NewEntry:
    """A fresh, empty, write-locked entry in `parent`."""
    while True:
        path = parent / f"uuid-{uuid.uuid4().hex}"
        path.mkdir()
        # a reclaimer may remove the directory while it is still empty or take the new lock file first;
        # then start over with another name rather than share
        lock = LockFile.try_open(path / LOCK, WRITE, create=True)
        if lock is not None:
            entry = NewEntry(path, lock)
            try:
                entry.tree.mkdir(parents=True)
                entry.meta.mkdir()
            except BaseException:
                remove(entry)
                raise
            return entry


def damage(path: Path) -> str | None:
    """What is wrong with the committed entry at `path`, or None: a check of its structure, not of its
    contents (object.info valid, data/tree and data/meta directories, results.json a list)."""
    try:
        info = json.loads((path / INFO).read_text())
        if isinstance(info, dict) and info.get("pending") is True:
            return "a layer whose check the build that made it did not finish (it was killed)"
        if not (isinstance(info, dict) and isinstance(info.get("size"), int)
                and isinstance(info.get("created"), (int, float))):
            return f"{INFO} is not {{\"size\": <int>, \"created\": <time>}}"
        layers = info.get("layers", [])
        if not (isinstance(layers, list) and all(isinstance(i, str) and "/" not in i for i in layers)):
            return f"{INFO}: \"layers\" is not a list of ids"
    except (OSError, ValueError) as exc:
        return f"{INFO} cannot be read: {exc}"
    for name in ("data/tree", "data/meta"):
        try:
            if not stat.S_ISDIR(os.lstat(path / name).st_mode):
                return f"{name} is not a directory"
        except OSError as exc:
            return f"{name} is missing ({exc.strerror})"
    try:
        results = json.loads((path / "data" / "meta" / RESULTS).read_text())
    except (OSError, ValueError) as exc:
        return f"data/meta/{RESULTS} cannot be read: {exc}"
    if not (isinstance(results, list) and all(isinstance(r, dict) for r in results)):
        return f"data/meta/{RESULTS} is not a list of stage results"
    return None


def open_committed(objects: Path, object_id: str) -> LoadedEntry | None:
    """The committed entry `object_id`, read-locked and marked used; None if it is absent or contended,
    and if it is damaged (then it is removed, unless somebody else reads it)."""
    path = objects / object_id
    lock = LockFile.try_open(path / LOCK, READ)
    if lock is None:
        return None
    problem = damage(path)
    if problem is not None:
        lock.close()
        log.warning("store.damaged", id=object_id, problem=problem,
                    action="removed; it is built again" if discard_damaged(objects, object_id)
                    else "in use by another build; built again without it")
        return None
    info = json.loads((path / INFO).read_text())
    lock.touch()
    return LoadedEntry(object_id, path, lock, info)


def discard_damaged(objects: Path, object_id: str) -> bool:
    """Remove a committed entry found damaged, under its write lock; False if somebody reads it (or it is
    gone already, or no longer damaged: another process replaced it)."""
    size_lock = LockFile.wait_open(objects.parent / "size.lock", WRITE)  # what changes objects/ holds it
    try:
        # a committed entry without its lock file gets one: nobody else can hold it
        lock = LockFile.try_open(objects / object_id / LOCK, WRITE, create=True)
        if lock is None:
            return False
        if damage(objects / object_id) is None:
            lock.close()
            return False
        moved = move_out(objects, object_id, objects.parent / "stage", lock)
    finally:
        size_lock.close()
    remove(moved)
    return True


def commit(entry: NewEntry, objects: Path, object_id: str) -> bool:
    """Rename the entry to `objects/<id>`; False, and nothing changed, if that id is there already."""
    target = objects / object_id
    try:
        os.rename(entry.path, target)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    entry.path = target
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class Committed:
    """What eviction needs to know of a committed entry, read without locking it."""

    id: str
    size: int
    last_used: float
    created: float
    layers: tuple[str, ...] = ()


def _layer_ids(info: Any) -> tuple[str, ...]:
    layers = info.get("layers") if isinstance(info, dict) else None
    return tuple(i for i in layers if isinstance(i, str)) if isinstance(layers, list) else ()


def list_committed(objects: Path) -> list[Committed]:
    """Every committed entry, least recently used first. One being removed meanwhile is left out."""
    found = []
    for name in os.listdir(objects):
        path = objects / name
        try:
            used = os.stat(path / LOCK).st_atime
            info = json.loads((path / INFO).read_text())
            created = float(info["created"])
            # pending (its builder still counting it, or dead): what it takes now, never 0
            size = disk_usage(path) if info["size"] is None and info.get("pending") is True else int(info["size"])
        except (OSError, ValueError, KeyError, TypeError, OverflowError):  # OverflowError: a size of 1e400
            size, created, used = 0, 0.0, 0.0  # incomplete or foreign: worth nothing, evicted first
            info = {}
            if not path.exists():
                continue
        found.append(Committed(id=name, size=size, last_used=used, created=created,
                               layers=_layer_ids(info)))
    # a layer whose lower layers are gone is a miss for ever: worth nothing, evicted first; and a
    # layer is used whenever one above it is, so a lower layer never goes before the layers over it
    present = {c.id for c in found}
    used_at = {c.id: c.last_used for c in found}
    for c in found:
        if any(i not in present for i in c.layers):
            used_at[c.id] = 0.0
    for c in found:
        if used_at[c.id]:
            for below in c.layers:
                if below in used_at:
                    used_at[below] = max(used_at[below], used_at[c.id])
    found = [Committed(id=c.id, size=c.size, last_used=used_at[c.id], created=c.created, layers=c.layers)
             for c in found]
    found.sort(key=lambda c: (c.last_used, -len(c.layers)))  # as recent: the layer above goes first
    return found


def being_checked(objects: Path, object_id: str) -> bool:
    """Whether the committed entry is pending and its creator lives (holds its write lock): not damaged,
    only not ready yet."""
    path = objects / object_id
    try:
        if json.loads((path / INFO).read_text()).get("pending") is not True:
            return False
    except (OSError, ValueError, AttributeError):
        return False
    lock = LockFile.try_open(path / LOCK, READ)
    if lock is None:
        return path.exists()
    lock.close()
    return False


def wait_while_written(objects: Path, object_id: str) -> None:
    """Wait while somebody holds the write lock of the committed entry `object_id`: its creator, until a
    pending entry is checked (or it dies), or an evicting build, until it has moved it out. Blocking."""
    try:
        fd = os.open(objects / object_id / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        wait_lock(fd, READ)
    finally:
        os.close(fd)


def take_for_eviction(objects: Path, object_id: str) -> LockFile | None:
    """The write lock of a committed entry, if nobody reads it; then it may be moved out and removed."""
    return LockFile.try_open(objects / object_id / LOCK, WRITE)


def move_out(objects: Path, object_id: str, staging: Path, lock: LockFile) -> Entry:
    """Move a committed entry whose write lock we hold back into staging, where it can be removed."""
    target = staging / f"uuid-{uuid.uuid4().hex}"
    os.rename(objects / object_id, target)
    return Entry(target, lock)


def remove(entry: Entry) -> None:
    """Remove an entry we hold the write lock of: data first, then its lock file, then the directory."""
    remove_contents(entry.path, keep=LOCK)
    try:
        os.unlink(entry.path / LOCK)
        os.rmdir(entry.path)
    except FileNotFoundError:
        pass
    finally:
        entry.lock.close()


def remove_contents(path: Path, keep: str | None = None) -> None:
    """Remove everything in `path` but `keep`, even directories a stage made read-only.

    Retries a few times: right after a kill -9, a dying stage may still be writing into the tree.
    """
    def make_writable(func: Any, p: str, exc: Any) -> None:
        if isinstance(exc, FileNotFoundError):
            return
        try:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except OSError as again:
            if again.errno not in (errno.ENOENT, errno.ENOTEMPTY):  # ENOTEMPTY: written into; the loop retries
                raise

    for attempt in range(5):
        try:
            with os.scandir(path) as it:
                names = [e for e in it if e.name != keep]
        except FileNotFoundError:
            return
        for child in names:
            if child.is_dir(follow_symlinks=False):
                shutil.rmtree(child.path, onerror=make_writable)  # onexc needs Python 3.12
            else:
                try:
                    os.unlink(child.path)
                except FileNotFoundError:
                    pass
        try:
            with os.scandir(path) as it:
                if all(e.name == keep for e in it):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05 * (attempt + 1))
    raise OSError(errno.ENOTEMPTY, f"cannot empty {path}: something keeps writing into it; stop what "
                  "writes there, then run the command again")


def reclaim(path: Path) -> bool:
    """Remove a staging entry if its owner is gone; True if it was removed."""
    lock = LockFile.try_open(path / LOCK, WRITE)
    if lock is None:
        if not (path / LOCK).exists():
            try:
                os.rmdir(path)  # empty: just created, or its remover died before the rmdir
                return True
            except OSError:
                pass
        return False
    detach_mounts_below(path)
    remove(Entry(path, lock))
    return True


def detach_mounts_below(path: Path) -> None:
    """Lazily unmount what a dead build left mounted in its entry: a build killed with -9 between
    mounting a stage's /dev (in its scratch space) and the stage's start leaves that tmpfs there."""
    prefix = os.fspath(path) + "/"
    with open("/proc/self/mountinfo") as mountinfo:
        # field 5 is the mount point, with spaces and the like escaped as octal (\040)
        points = [line.split()[4].encode().decode("unicode_escape") for line in mountinfo]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        try:
            umount(point, MNT_DETACH)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOENT):  # gone already
                raise


def reclaim_dead(staging: Path) -> int:
    """Remove every entry in `staging` whose owner is gone; returns how many."""
    removed = 0
    for name in os.listdir(staging):
        path = staging / name
        try:
            is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
        except FileNotFoundError:
            continue
        if name.startswith("uuid-") and is_dir and reclaim(path):
            removed += 1
    return removed

