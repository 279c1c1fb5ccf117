"""The check of a pipeline's bottom layer, run beside the stage after it rather than before.

A pipeline's first stage writes on its new layer as on a plain directory, so before that layer is the
lower layer of an overlay mount it must be walked (`layers.make_plain`): xattrs the stage set with
overlayfs's names are escaped (the mount would take them for its own), and the size is counted. That
walk is one listxattr and one lstat per entry (~100 ms for the sample's 16k-entry os install), and it
stood between the two stages. Now the layer is committed at once, `pending` (see `store.entries`: its
size unknown, its write lock kept, so no other build reads or evicts it), and the next stage starts on
it straight away while `layers.inspect_plain` walks it in a thread, changing nothing.

Almost every tree has nothing to escape: then, as soon as the walk ends, the layer's object.info is
written whole, with its size, and it joins the build's pins and is readable by other builds (which wait
for that when they lost the race to commit it). If the walk found something, the stage running on the
layer saw it wrong: before that stage's result counts (`stands`), once it has ended (its mount gone with
its namespace), the layer is escaped, and the stage runs again on it. In any case the layer is checked
before the stage above it is committed (`finish`), which also runs when the build fails or is
cancelled, so the layer is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import structlog

from .context import BuildContext
from .store import NewEntry
from .store import layers as overlay
from .store.pins import TreeView

log = structlog.get_logger(__name__)


class LayerCheck:
    """The walk of the bottom layer `entry` (stage `object_id`), committed pending."""

    def __init__(self, ctx: BuildContext, object_id: str, entry: NewEntry,
                 report: Callable[[], None] | None = None) -> None:
        self.ctx = ctx
        self.id = object_id
        self.entry = entry
        self.report = report  # says what became of the layer (a --checkpoint's), once that is known
        self._walked = anyio.Event()
        self._found: overlay.Plain | None = None  # the walk's, or make_plain's: nothing left to escape
        self._finished = False
        self._checked = False  # by `run`
        self._error: Exception | None = None

    @property
    def view(self) -> TreeView:
        """The layer as the next stage's lower layer (read through the mount only, until checked)."""
        return TreeView(layers=(self.entry.tree,), flat=False)

    async def run(self) -> None:
        """The walk, in a thread; if it found nothing to escape, the layer is checked at once, for other
        builds to read it. Never raises (`stands` and `finish` walk again if it failed, `finish` raises
        what checking it raised)."""
        started = time.monotonic()
        try:  # whatever happens, even a cancel before the walk began, `finish` must not wait for ever
            try:
                self._found = await anyio.to_thread.run_sync(overlay.inspect_plain, self.entry.tree)
            except Exception as exc:  # make_plain walks again, and raises it there if it persists
                log.debug("layer.inspect_failed", stage_id=self.id, error=str(exc))
            if self._found is not None and not self._found.marked:
                self._record(self._found)
                # its path is not moved (out of objects/, for want of room) while the next stage may
                # still be mounting it: then `finish` does that
                self._checked = await self.ctx.store.checked(self.entry, self.id, self.ctx.pins,
                                                             may_move=False) is not None
        except Exception as exc:
            self._error = exc
        finally:
            self._walked.set()
        log.debug("layer.inspected", stage_id=self.id, ms=round((time.monotonic() - started) * 1000, 1),
                  marked=self._found.marked if self._found else None, checked=self._checked)

    async def stands(self) -> bool:
        """Whether the stage that just ran on the layer saw it right; if not, the layer is made right
        now (that stage has ended) and the stage must run again."""
        await self._walked.wait()
        if self._found is not None and not self._found.marked:
            return True
        await self._make_plain()
        log.info("layer.escaped", stage_id=self.id)
        return False

    async def finish(self) -> None:
        """Write the layer's object.info whole, and hand it to the build's pins (or let it float there
        if the bound has no room for it). After the stage above it has ended, however it ended."""
        if self._finished:
            return
        self._finished = True
        with anyio.CancelScope(shield=True):
            await self._walked.wait()
            if self._error is not None:
                raise self._error
            if self._checked:
                return
            if self._found is None or self._found.marked:
                await self._make_plain()  # nothing reads the layer now: escaping it is safe
            assert self._found is not None
            self._record(self._found)
            await self.ctx.store.checked(self.entry, self.id, self.ctx.pins)
            if self.report is not None:
                self.report()

    def _record(self, plain: overlay.Plain) -> None:
        self.entry.flat, self.entry.tree_size = plain.readable, plain.size

    async def _make_plain(self) -> None:
        try:
            plain = await anyio.to_thread.run_sync(overlay.make_plain, self.entry.tree)
        except OSError as exc:
            self._finished = True  # the layer is gone: nothing left to finish
            await self.ctx.store.abandon(self.entry, self.id)
            raise self.ctx.store.write_error(f"cannot make the layer of {self.id} ready", exc) from exc
        self._found = overlay.Plain(plain.readable, plain.size, marked=False)
