"""Pins: the store entries one build relies on, held until the build ends.

A tree is a stack of layers (see `layers`): pinning a tree pins every layer of it, so that no build
evicts one while this one reads it, and a tree one of whose layers is gone is a miss, never a tree with a
hole in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ..errors import StoreError
from . import entries
from .entries import Entry, LoadedEntry, NewEntry

if TYPE_CHECKING:
    from .fscache import Store


@dataclass(frozen=True, slots=True, kw_only=True)
class TreeView:
    """A tree as the store holds it: a stack of layer directories (top first), or one plain directory."""

    layers: tuple[Path, ...]
    flat: bool


class Pins:
    """The trees one build relies on, held until it ends.

    A committed entry is pinned with its read lock, so no build evicts it while this one needs it; a tree
    that could not be stored (too large, no room) floats: its staging entry stays, locked, until the end.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._entries: dict[str, Entry] = {}
        self._floating: set[str] = set()
        self._stacks: dict[str, tuple[str, ...]] = {}  # id -> the ids of its layers, bottom first, itself last

    def __contains__(self, object_id: object) -> bool:
        return object_id in self._entries

    def try_pin(self, object_id: str) -> bool:
        """Pin a committed entry and every layer below it; False if one is absent or contended (a miss:
        build it)."""
        if object_id in self._entries:
            return True
        entry = self.store.try_load(object_id)
        if entry is None:
            return False
        below = entry.layers
        loaded: list[LoadedEntry] = []
        for layer_id in below:
            if layer_id in self._entries:
                continue
            layer = self.store.try_load(layer_id)
            if layer is None:
                for held in [entry, *loaded]:
                    held.close()
                return False
            loaded.append(layer)
        for layer in loaded:
            self._entries[layer.id] = layer
            self._stacks[layer.id] = (*layer.layers, layer.id)
        self._entries[object_id] = entry
        self._stacks[object_id] = (*below, object_id)
        return True

    def adopt(self, entry: LoadedEntry) -> None:
        if entry.id in self._entries:  # made twice in one build (the same stage in two pipelines)
            entry.close()
            return
        self._entries[entry.id] = entry
        self._stacks[entry.id] = (*entry.layers, entry.id)

    def float(self, object_id: str, entry: NewEntry) -> None:
        assert object_id not in self._entries, object_id  # Store._settle discards a second one
        self._entries[object_id] = entry
        self._floating.add(object_id)
        self._stacks[object_id] = (*entry.layers, object_id)

    def get(self, object_id: str) -> Entry:
        try:
            return self._entries[object_id]
        except KeyError:
            raise StoreError(f"{object_id} was needed but is neither built nor pinned in the store: something "
                             "removed it during the build (another process on the store?); build again") from None

    def stack(self, object_id: str) -> tuple[str, ...]:
        """The ids of the layers of the tree `object_id`, bottom first, ending with `object_id`."""
        self.get(object_id)
        return self._stacks[object_id]

    def view(self, object_id: str) -> TreeView:
        """How to read the tree `object_id`: its layers' directories, top first."""
        ids = self.stack(object_id)
        entry = self.get(object_id)
        flat = entry.flat if isinstance(entry, (LoadedEntry, NewEntry)) else False
        return TreeView(layers=tuple(self.get(i).tree for i in reversed(ids)), flat=flat and len(ids) == 1)

    def tree(self, object_id: str) -> Path:
        """The entry's own directory: the whole tree if it is flat, else only its own layer (read a
        tree through a mount of its `view`)."""
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
            self._stacks.clear()
