"""Which layers a pushed stage image is made of: the store's own layers, or the lower ones flattened.

A stage's tree in the store is a stack of overlayfs layers. Most become OCI layers as they are, but a
layer where overlayfs renamed a directory (a redirect) has no OCI form, and a stack whose layers mostly
write the same files again (a disk image that each stage copies up) would move those bytes once per
layer. There the tree up to that layer is pushed as one flat layer (`flatten_point`), which the pulling
store commits as a flat entry (a whole tree) under that layer's stage id; the layers above stay layers.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from . import ocilayer
from .logs import get_logger
from .store.pins import TreeView

if TYPE_CHECKING:
    from .context import BuildContext

log = get_logger(__name__)

FLATTEN_WASTE = 1 << 20  # bytes written again by later layers worth flattening for


@dataclass(frozen=True, slots=True, kw_only=True)
class PushedLayer:
    """One layer of a pushed image: the store entry it is committed as on the pulling side, and its blob."""

    entry_id: str
    flat: bool
    blob: Path
    info: ocilayer.LayerInfo


class LayerBlobs:
    """The layer blobs of the stacks one push sends, each written once (stacks share their lower layers),
    in scratch space that the caller removes."""

    def __init__(self, ctx: BuildContext, scratch: Path) -> None:
        self.ctx = ctx
        self.scratch = scratch
        self.written: dict[tuple[str, bool], tuple[Path, ocilayer.LayerInfo]] = {}  # (entry id, flat)

    async def for_stack(self, stack: tuple[str, ...]) -> list[PushedLayer]:
        """The layers of a tree (its entry ids, bottom first) as pushed, lowest first: those up to
        `flatten_point` as one flat tree under the id of the topmost of them, the others as they are."""
        pins = self.ctx.pins
        flats = [bool(getattr(pins.get(i), "flat", False)) for i in stack]
        surveys = [await anyio.to_thread.run_sync(survey, pins.tree(i)) for i in stack]
        cut = flatten_point([(redirect and not flat, files) for (redirect, files), flat in
                             zip(surveys, flats, strict=True)])
        chosen: list[tuple[str, bool]] = []
        if cut > 0 or (cut == 0 and not flats[0]):
            if (stack[cut], True) not in self.written:
                flat_tree = self.scratch / f"flat-{len(self.written)}"
                view = TreeView(layers=tuple(pins.tree(i) for i in reversed(stack[:cut + 1])), flat=False)
                started = time.monotonic()
                await self.ctx.store.copy_view(view, flat_tree, f"cannot flatten {stack[cut]} for the remote cache")
                log.debug("remote.layer.flattened", entry=stack[cut], layers=cut + 1,
                          seconds=round(time.monotonic() - started, 3))
                await self._write((stack[cut], True), flat_tree)
            chosen.append((stack[cut], True))
        else:
            cut = -1
        for n in range(cut + 1, len(stack)):
            if (stack[n], flats[n]) not in self.written:
                await self._write((stack[n], flats[n]), pins.tree(stack[n]))
            chosen.append((stack[n], flats[n]))
        return [PushedLayer(entry_id=i, flat=flat, blob=self.written[(i, flat)][0], info=self.written[(i, flat)][1])
                for i, flat in chosen]

    async def _write(self, key: tuple[str, bool], tree: Path) -> None:
        path = self.scratch / f"blob-{len(self.written)}"
        started = time.monotonic()
        info = await anyio.to_thread.run_sync(write_blob, tree, path)
        self.written[key] = (path, info)
        log.debug("remote.layer.written", entry=key[0], flat=key[1], size=info.size,
                  seconds=round(time.monotonic() - started, 3))


def flatten_point(layers: Sequence[tuple[bool, dict[str, int]]]) -> int:
    """How far up a stack (bottom first: whether a layer has a redirect, its files' sizes) is pushed as
    one flat layer: -1 for none. Up to the topmost layer with a redirect, which has no OCI form; and up
    to the topmost layer where at least half the bytes of the layers so far are files that a later
    layer of them wrote again (a disk image that each stage copies up whole: a layer per stage would
    push and pull it once per stage)."""
    cut = max((n for n, (redirect, _) in enumerate(layers) if redirect), default=-1)
    total = wasted = 0
    below: dict[str, int] = {}  # each path's size in the topmost layer so far that has it
    for top, (_, files) in enumerate(layers):
        for path, size in files.items():
            total += size
            wasted += below.get(path, 0)
            below[path] = size
        if top > 0 and wasted >= FLATTEN_WASTE and 2 * wasted >= total:
            cut = max(cut, top)
    return cut


def write_blob(tree: Path, dest: Path) -> ocilayer.LayerInfo:
    """A layer's tree as a blob file (synchronous: run in a worker thread)."""
    with open(dest, "wb") as out:
        return ocilayer.write_layer(tree, out)


def survey(tree: Path) -> tuple[bool, dict[str, int]]:
    """Whether overlayfs marked a directory of this layer as renamed (no OCI layer can say that), and
    the size of each of its regular files."""
    redirect = False
    files: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames:
            try:
                redirect = redirect or bool(os.getxattr(os.path.join(dirpath, name), ocilayer.REDIRECT,
                                                        follow_symlinks=False))
            except OSError:
                continue
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                files[os.path.relpath(path, tree)] = st.st_size
    return redirect, files
