"""Pending entries: a bottom layer committed before its walk (escape check and size) has finished.

While its builder lives it is that builder's alone (no other build reads or evicts it) and the bound counts
it at what it takes, never 0; once checked it is an ordinary entry, made room for or floating; if its
builder dies first, it is a miss and goes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
from trio.testing import wait_all_tasks_blocked

from aosbuild.store import EXISTS, NO_ROOM, STORED, Pins, Store, entries, layers
from aosbuild.store.commands import verify_entries
from aosbuild.store.sizes import disk_usage

from .test_store import KIB, fill, last_used, put, python_running


async def store_pending(store: Store, object_id: str, size: int) -> entries.NewEntry:
    async with store.store(object_id) as entry:
        fill(entry.tree, size)
        entry.results = [{"id": object_id}]
        entry.pending = True
    assert entry.outcome == STORED
    return entry


async def check(store: Store, entry: entries.NewEntry, object_id: str, pins: Pins) -> str | None:
    plain = layers.inspect_plain(entry.tree)
    entry.flat, entry.tree_size = plain.readable, plain.size
    return await store.checked(entry, object_id, pins)


async def test_a_pending_layer_is_its_builders_alone_until_it_is_checked(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store", max_size=None)
    pins = Pins(store)
    entry = await store_pending(store, "p", 80 * KIB)
    assert store.contains("p")
    assert json.loads((store.objects / "p" / entries.INFO).read_text())["size"] is None
    other = Store(store.root)  # another build: its locks conflict with ours, as another process's do
    assert other.try_load("p") is None  # a miss: it builds the layer itself
    assert entries.take_for_eviction(store.objects, "p") is None
    counted = {c.id: c.size for c in entries.list_committed(store.objects)}
    assert counted["p"] == disk_usage(store.objects / "p") >= 80 * KIB  # walked anew, never 0
    assert "p" not in pins
    assert await check(store, entry, "p", pins) == STORED
    info = json.loads((store.objects / "p" / entries.INFO).read_text())
    assert "pending" not in info
    assert info["flat"] is True
    assert info["size"] == entry.size >= 80 * KIB
    assert pins.view("p").flat
    loaded = other.try_load("p")  # readable by others now, and still pinned by this build
    assert loaded is not None
    loaded.close()
    assert entries.take_for_eviction(store.objects, "p") is None
    await pins.aclose()
    store.close()


async def test_checking_a_pending_layer_makes_room_for_it_or_floats_it(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store", max_size=None)
    for when, name in enumerate(("a", "b")):
        assert await put(store, name, 80 * KIB) == STORED
        last_used(store, name, 1000 + when)
    entry_size = entries.list_committed(store.objects)[0].size
    store.set_limits(max_size=int(2.5 * entry_size))  # room for two
    pins = Pins(store)
    # committed without a bound check (its size unknown); checked, it evicts the least recently used
    p = await store_pending(store, "p", 80 * KIB)
    assert sorted(os.listdir(store.objects)) == ["a", "b", "p"]
    assert await check(store, p, "p", pins) == STORED
    assert sorted(os.listdir(store.objects)) == ["b", "p"]
    # with everything else held, there is no room: it leaves objects/ and floats, usable until the end
    async with store.load("b"):
        q = await store_pending(store, "q", 80 * KIB)
        assert await check(store, q, "q", pins) == NO_ROOM
    assert sorted(os.listdir(store.objects)) == ["b", "p"]
    assert pins.floating("q")
    assert (pins.tree("q") / "data").stat().st_size == 80 * KIB
    await pins.aclose()
    assert list(store.staging.iterdir()) == []
    assert sum(c.size for c in entries.list_committed(store.objects)) <= int(2.5 * entry_size)
    store.close()


def test_a_pending_layer_whose_builder_died_is_a_miss_and_goes(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store.open(root).close()
    script = ("import anyio, structlog, sys, time; from pathlib import Path; from aosbuild.store import Store\n"
              "structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))\n"
              "async def main():\n"
              f"    store = Store.open(Path({str(root)!r}))\n"
              "    async with store.store('p') as entry:\n"
              "        (entry.tree / 'data').write_bytes(b'x' * 81920)\n"
              "        entry.pending = True\n"
              "    print(entry.outcome, flush=True)\n"
              "    time.sleep(60)\n"
              "anyio.run(main)\n")
    with python_running(script) as first_line:
        assert first_line == STORED
        reader = Store.open(root)
        assert reader.try_load("p") is None  # its builder lives: a miss, and it stays
        assert (root / "objects" / "p").exists()
        assert {c.id: c.size for c in entries.list_committed(root / "objects")}["p"] >= 80 * KIB
        reader.close()
    # killed (-9) before it was checked: its lock is free, and the entry it left is damaged, not a tree
    assert entries.damage(root / "objects" / "p") is not None
    reader = Store.open(root)
    assert reader.try_load("p") is None
    assert not (root / "objects" / "p").exists()
    assert list((root / "stage").iterdir()) == []
    reader.close()


async def test_a_build_that_loses_the_race_to_a_pending_layer_waits_and_uses_it(tmp_path: Path) -> None:
    """The winner's copy is readable moments later, once checked: the loser uses it, rather than float
    its own copy (which would leave every layer it stacks on it unstored)."""
    store = Store.open(tmp_path / "store", max_size=None)
    winner = await store_pending(store, "p", 80 * KIB)
    other = Store(store.root)  # another build: its locks conflict with ours, as another process's do
    other_pins = Pins(other)
    outcome: list[str | None] = []

    async def lose() -> None:
        async with other.store("p", keep=other_pins) as entry:
            fill(entry.tree, 80 * KIB)
        outcome.append(entry.outcome)

    async with anyio.create_task_group() as tg:
        tg.start_soon(lose)
        await wait_all_tasks_blocked()
        assert outcome == []  # waiting for the winner's check
        pins = Pins(store)
        assert await check(store, winner, "p", pins) == STORED
    assert outcome == [EXISTS]
    assert not other_pins.floating("p")
    assert other_pins.tree("p") == store.objects / "p" / "data" / "tree"
    assert list(store.staging.iterdir()) == []
    await other_pins.aclose()
    await pins.aclose()
    store.close()


async def test_store_verify_leaves_a_layer_being_checked_alone(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store", max_size=None)
    entry = await store_pending(store, "p", 8 * KIB)
    assert verify_entries(Store(store.root)) == (0, [])  # its builder lives: not ready, not damaged
    entry.lock.close()  # as if its builder were killed
    checked, damaged = verify_entries(Store(store.root))
    assert checked == 1
    assert [(d["id"], d["removed"]) for d in damaged] == [("p", True)]
    assert not (store.objects / "p").exists()
    store.close()
