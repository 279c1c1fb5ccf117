"""The store's entry lifecycle, locks, bound and eviction, through its Python API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from aosbuild.errors import CacheMiss, StoreError
from aosbuild.sizes import parse_size
from aosbuild.store import EXISTS, NO_ROOM, STORED, TOO_LARGE, Pins, Store, entries, layers, sourcecache
from aosbuild.store.locks import READ, UNLOCK, WRITE, LockFile, holder
from aosbuild.store.sizes import disk_usage

KIB = 1024


@contextmanager
def python_running(script: str) -> Iterator[str]:
    """`script` in another Python until the block ends, then killed (-9) and reaped; yields its first line."""
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            yield proc.stdout.readline().strip()
        finally:
            proc.send_signal(signal.SIGKILL)


def fill(tree: Path, size: int, name: str = "data") -> None:
    (tree / name).write_bytes(b"x" * size)


async def put(store: Store, object_id: str, size: int = 64 * KIB) -> str:
    async with store.store(object_id) as entry:
        fill(entry.tree, size)
        entry.add_result({"id": object_id, "type": "t", "output": f"made {object_id}\n", "duration": 1.5,
                          "metadata": {"n": 1}})
    assert entry.outcome is not None
    return entry.outcome


def test_ofd_locks_conflict_within_one_process(tmp_path: Path) -> None:
    """Locks belong to the open file, not the process: two opens in one process exclude each other."""
    path = tmp_path / "lock"
    reader = LockFile.try_open(path, READ, create=True)
    assert reader is not None
    other_reader = LockFile.try_open(path, READ)
    assert other_reader is not None
    assert LockFile.try_open(path, WRITE) is None  # a contended lock: a miss, never a wait
    fd = os.open(path, os.O_RDONLY)
    assert holder(fd, WRITE) == READ
    reader.close()
    other_reader.close()
    assert holder(fd, WRITE) == UNLOCK
    os.close(fd)
    writer = LockFile.try_open(path, WRITE)
    assert writer is not None
    assert LockFile.try_open(path, READ) is None
    assert writer.change(READ)  # downgrade, atomically
    reader = LockFile.try_open(path, READ)
    assert reader is not None
    reader.close()
    writer.close()


def test_a_lock_dies_with_its_process(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    holder_script = ("import time; from pathlib import Path; from aosbuild.store.locks import LockFile, WRITE;"
                     f"l = LockFile.try_open(Path({str(path)!r}), WRITE, create=True);"
                     "print(l is not None, flush=True); time.sleep(60)")
    with python_running(holder_script) as first_line:
        assert first_line == "True"
        assert LockFile.try_open(path, READ) is None
    lock = LockFile.try_open(path, WRITE)
    assert lock is not None
    lock.close()


async def test_store_load_and_stage(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    with pytest.raises(CacheMiss):
        async with store.load("a"):
            pass
    assert await put(store, "a") == STORED
    async with store.load("a") as loaded:
        assert (loaded.tree / "data").read_bytes() == b"x" * 64 * KIB
        assert loaded.results == [{"id": "a", "type": "t", "output": "made a\n", "duration": 1.5,
                                   "metadata": {"n": 1}}]
        assert json.loads((loaded.meta / "a.json").read_text()) == {"n": 1}  # osbuild's place for it
        info = json.loads((loaded.path / "object.info").read_text())
        assert info["size"] >= 64 * KIB
        # a reader holds a read lock: nobody can take the entry for eviction meanwhile
        assert entries.take_for_eviction(store.objects, "a") is None
    async with store.stage() as scratch:
        (scratch.path / "file").write_text("scratch")
        assert scratch.path.parent == store.tmp
    assert list(store.tmp.iterdir()) == []
    assert list(store.staging.iterdir()) == []


async def fail_while_storing(store: Store, object_id: str) -> None:
    async with store.store(object_id) as entry:
        fill(entry.tree, KIB)
        raise RuntimeError("stage failed")


async def test_failed_block_commits_nothing(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    with pytest.raises(RuntimeError):
        await fail_while_storing(store, "a")
    assert not store.contains("a")
    assert list(store.staging.iterdir()) == []


async def test_second_commit_of_an_id_is_discarded_quietly(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    async with store.store("a") as first, store.store("a") as second:
        fill(first.tree, KIB, "first")
        fill(second.tree, KIB, "second")
    # the inner block ends first: it wins, the outer one finds the id taken and goes away quietly
    assert (second.outcome, first.outcome) == (STORED, EXISTS)
    async with store.load("a") as loaded:
        assert [p.name for p in loaded.tree.iterdir()] == ["second"]
    assert list(store.staging.iterdir()) == []


async def test_pins_keep_a_losing_or_unstored_tree_usable(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store", max_size=100 * KIB)
    pins = Pins(store)
    async with store.store("big", keep=pins) as entry:
        fill(entry.tree, 200 * KIB)
    assert entry.outcome == TOO_LARGE
    assert not store.contains("big")
    assert (pins.tree("big") / "data").stat().st_size == 200 * KIB  # floating until the build ends
    async with store.store("a", keep=pins) as entry:
        fill(entry.tree, KIB)
    assert entry.outcome == STORED
    assert entries.take_for_eviction(store.objects, "a") is None  # pinned: read-locked
    await pins.aclose()
    assert list(store.staging.iterdir()) == []
    lock = entries.take_for_eviction(store.objects, "a")
    assert lock is not None
    lock.close()


def last_used(store: Store, object_id: str, when: float) -> None:
    """Set when an entry was last used (its lock file's atime), rather than wait for clocks to tick."""
    lock = store.objects / object_id / "object.lock"
    os.utime(lock, (when, lock.stat().st_mtime))


async def test_eviction_is_least_recently_used_and_spares_readers(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store", max_size=None)
    for when, name in enumerate(("a", "b", "c")):
        assert await put(store, name, 80 * KIB) == STORED
        last_used(store, name, 1000 + when)
    entry_size = entries.list_committed(store.objects)[0].size  # 80 KiB and what the filesystem adds
    bound = int(3.5 * entry_size)
    store.set_limits(max_size=bound)  # room for three entries
    async with store.load("a"):  # using `a` makes `b` the least recently used
        pass
    assert await put(store, "d", 80 * KIB) == STORED
    assert sorted(os.listdir(store.objects)) == ["a", "c", "d"]
    last_used(store, "d", time.time() + 60)  # the newest, whatever the clock's resolution
    # an entry being read is never evicted: with `c` held (and the oldest), `a` goes instead
    async with store.load("c"):
        last_used(store, "c", 1)
        assert await put(store, "e", 80 * KIB) == STORED
        assert sorted(os.listdir(store.objects)) == ["c", "d", "e"]
        # everything held: no room, and the commit says so rather than failing
        async with store.load("d"), store.load("e"):
            assert await put(store, "f", 80 * KIB) == NO_ROOM
    assert sorted(os.listdir(store.objects)) == ["c", "d", "e"]
    assert list(store.staging.iterdir()) == []
    assert sum(c.size for c in entries.list_committed(store.objects)) <= bound
    store.close()


def test_a_dead_builds_staging_entries_are_reclaimed(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store.open(root)
    script = ("import time; from pathlib import Path; from aosbuild.store import entries;"
              f"e = entries.create(Path({str(root / 'stage')!r})); (e.tree / 'f').write_text('x');"
              "print(e.path, flush=True); time.sleep(60)")
    with python_running(script) as first_line:
        path = Path(first_line)
        assert (path / "data" / "tree" / "f").exists()
        Store.open(root).close()  # the owner is alive: its entry stays
        assert path.exists()
    Store.open(root).close()  # the owner is dead: its lock can be taken, so its entry goes
    assert not path.exists()


async def test_store_of_another_format_says_what_to_do(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    (root / "cache.info").write_text(json.dumps({"version": 1}))
    with pytest.raises(StoreError, match=r"format 1.*aosbuild store clear --store"):
        Store.open(root)
    (root / "cache.info").write_text(json.dumps({"version": 9}))
    with pytest.raises(StoreError, match="newer aosbuild"):
        Store.open(root)


async def test_limits_are_remembered(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store.open(root, max_size=parse_size("5GiB"), sources_max_size=None)
    again = Store.open(root)
    assert again.limits().max_size == 5 * 2**30
    assert again.limits().sources_max_size is None
    assert store.limits().max_size_configured
    fresh = Store.open(tmp_path / "other")
    assert not fresh.limits().max_size_configured
    assert 0 < (fresh.limits().max_size or 0) <= 20 * 2**30


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem of 1 MiB: a tmpfs (needs root)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


async def store_results_that_do_not_fit(store: Store) -> None:
    async with store.store("big") as entry:
        fill(entry.tree, 600 * KIB)
        entry.add_result({"id": "big", "type": "t", "output": "y" * 600 * KIB, "duration": 0.0, "metadata": {}})


async def test_disk_full_during_commit_is_a_clear_error(small_filesystem: Path) -> None:
    """The tree fits on the 1 MiB filesystem; the results written at commit do not."""
    store = Store.open(small_filesystem / "store", max_size=None)
    assert await put(store, "small", 16 * KIB) == STORED
    with pytest.raises(StoreError, match=r"cannot commit big: the filesystem of the store .* is full"):
        await store_results_that_do_not_fit(store)
    assert not store.contains("big")
    assert list(store.staging.iterdir()) == []
    async with store.load("small") as loaded:  # the store is as it was
        assert (loaded.tree / "data").stat().st_size == 16 * KIB
    store.close()


def test_disk_usage_counts_blocks_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 8192)
    os.link(tmp_path / "a", tmp_path / "b")
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(1 << 30)
    assert 8192 <= disk_usage(tmp_path) < 8192 + 4 * 4096


def test_a_bottom_layers_size_is_counted_in_the_walk_that_makes_it_plain(tmp_path: Path) -> None:
    """The commit takes the tree's size from `make_plain`'s walk instead of walking again: that size must
    be disk_usage's (hard links once, sparse files by their blocks, with the escaped xattrs), and the
    entry's recorded size the same as a full walk of it."""
    entry = entries.NewEntry(tmp_path / "entry", LockFile.wait_open(tmp_path / "lock", WRITE))
    entry.tree.mkdir(parents=True)
    entry.meta.mkdir(parents=True)
    (entry.tree / "a").write_bytes(b"x" * 8192)
    os.link(entry.tree / "a", entry.tree / "sub-link")
    (entry.tree / "sub" / "deeper").mkdir(parents=True)
    (entry.tree / "sub" / "deeper" / "b").write_bytes(b"y" * 20000)
    os.link(entry.tree / "a", entry.tree / "sub" / "deeper" / "a-again")
    with open(entry.tree / "sparse", "wb") as f:
        f.truncate(1 << 30)
    os.symlink("a", entry.tree / "link")
    os.setxattr(entry.tree / "sub", "trusted.overlay.opaque", b"y")  # a stage's own: escaped
    plain = layers.make_plain(entry.tree)
    assert not plain.readable
    assert plain.size == disk_usage(entry.tree)
    assert 8192 + 20000 <= plain.size < 8192 + 20000 + 16 * 4096
    entry.tree_size = plain.size
    entry.results = [{"id": "x"}]
    assert entry.write_info() == disk_usage(entry.path) - (entry.path / entries.INFO).stat().st_blocks * 512
    entry.lock.close()


def test_sources_are_pruned_least_recently_used_when_no_build_runs(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store.open(root, sources_max_size=parse_size("100KiB"))
    directory = store.sources / "org.osbuild.files"
    directory.mkdir(parents=True)
    for i in range(4):
        (directory / f"sha256:{i}").write_bytes(b"s" * 40 * KIB)
        os.utime(directory / f"sha256:{i}", (1000 + i, 1000 + i))
    (directory / ".unverified-sha256:9").write_bytes(b"p" * 400 * KIB)  # a download in progress: not ours
    sourcecache.touch([directory / "sha256:0"])
    other = Store.open(root)  # another build is running: nothing is pruned
    store.finish()
    assert len(sourcecache.items(store.sources)) == 4
    other.finish()  # the last build to end prunes
    assert sorted(p.name for p in directory.iterdir()) == [".unverified-sha256:9", "sha256:0", "sha256:3"]
