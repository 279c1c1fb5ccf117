"""The store: committed trees under their ids, shared by concurrent builds, bounded in size.

- `fscache`: the `Store` (layout, format version, limits, the entry lifecycle, eviction)
- `pins`: the entries one build holds until it ends
- `layers`: overlayfs layers: looking up a stack of them, mounting it in a namespace of its own
- `entries`: one entry on disk and the lock protocol that makes sharing it safe
- `locks`: Linux open-file-description locks
- `sizes`: disk usage, the default bounds (size arguments: `aosbuild.sizes`)
- `sourcecache`: the source items' own accounting and pruning
- `commands`: `aosbuild store info|prune|clear|limit|verify`
"""

from __future__ import annotations

from .entries import Entry, LoadedEntry, NewEntry
from .fscache import EXISTS, KEEP, NO_ROOM, STORED, TOO_LARGE, UNSTORED_BELOW, VERSION, Limits, Store, copy_tree
from .pins import Pins

__all__ = ["EXISTS", "KEEP", "NO_ROOM", "STORED", "TOO_LARGE", "UNSTORED_BELOW", "VERSION", "Entry", "Limits",
           "LoadedEntry", "NewEntry", "Pins", "Store", "copy_tree"]
