"""Pins: the store entries one build relies on, held until the build ends."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ..errors import StoreError
from . import entries
from .entries import Entry, LoadedEntry, NewEntry

if TYPE_CHECKING:
    from .fscache import Store


class Pins:
    """The trees one build relies on, held until it ends.

    A committed entry is pinned with its read lock, so no build evicts it while this one needs it; a tree
    that could not be stored (too large, no room) floats: its staging entry stays, locked, until the end.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._entries: dict[str, Entry] = {}
        self._floating: set[str] = set()

    def __contains__(self, object_id: object) -> bool:
        return object_id in self._entries

    def try_pin(self, object_id: str) -> bool:
        """Pin a committed entry; False if it is absent or contended (a miss: build it)."""
        if object_id in self._entries:
            return True
        entry = self.store.try_load(object_id)
        if entry is None:
            return False
        self._entries[object_id] = entry
        return True

    def adopt(self, entry: LoadedEntry) -> None:
        self._entries.setdefault(entry.id, entry)

    def float(self, object_id: str, entry: NewEntry) -> None:
        self._entries[object_id] = entry
        self._floating.add(object_id)

    def get(self, object_id: str) -> Entry:
        try:
            return self._entries[object_id]
        except KeyError:
            raise StoreError(f"{object_id} was needed but is neither built nor pinned in the store") from None

    def tree(self, object_id: str) -> Path:
        return self.get(object_id).tree

    def results(self, object_id: str) -> list[dict[str, Any]]:
        entry = self._entries[object_id]
        if isinstance(entry, LoadedEntry):
            return entry.results
        return entry.results if isinstance(entry, NewEntry) else []

    def floating(self, object_id: str) -> bool:
        return object_id in self._floating

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            held, self._entries = self._entries, {}
            for object_id, entry in held.items():
                if object_id in self._floating:
                    await anyio.to_thread.run_sync(entries.remove, entry)
                else:
                    entry.lock.close()
            self._floating.clear()
