"""The object store: committed trees under their ids, staging entries for trees under construction.

Layout (osbuild's, so its tools recognise it)::

    <store>/CACHEDIR.TAG
    <store>/cache.info                 {"version": 1}
    <store>/objects/<id>/data/tree/    a committed tree
    <store>/objects/<id>/data/meta/    <stage-id>.json for each stage that reported metadata
    <store>/stage/uuid-<hex>/          entries being built; removed when their build ends, however it ends
    <store>/sources/<type>/<checksum>  downloaded source items
    <store>/tmp/                       per-stage scratch space

An entry is committed by renaming its staging directory to `objects/<id>`; if that id is already there
(another build got there first), the new entry is discarded quietly. Committed entries are never changed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from . import process
from .errors import StoreError

VERSION = 1
CACHEDIR_TAG = "Signature: 8a477f597d28d172789f06886806bc55\n# This is a cache directory tag created by aosbuild.\n"


class Entry:
    """A store entry under construction: a tree and the metadata of the stages that built it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tree = path / "data" / "tree"
        self.meta = path / "data" / "meta"

    def write_metadata(self, stage_id: str, metadata: dict[str, Any]) -> None:
        if metadata:
            (self.meta / f"{stage_id}.json").write_text(json.dumps(metadata))


class Store:
    """A store directory; create it with `Store.open`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.staging = root / "stage"
        self.sources = root / "sources"
        self.tmp = root / "tmp"

    @classmethod
    def open(cls, root: Path) -> Store:
        root = root.absolute()
        store = cls(root)
        try:
            for d in (store.objects, store.staging, store.sources, store.tmp):
                d.mkdir(parents=True, exist_ok=True)
            tag = root / "CACHEDIR.TAG"
            if not tag.exists():
                tag.write_text(CACHEDIR_TAG)
            info = root / "cache.info"
            if info.exists():
                version = json.loads(info.read_text()).get("version")
                if version != VERSION:
                    raise StoreError(f"the store {root} has format version {version}, this aosbuild uses "
                                     f"{VERSION}: use another --store, or remove this one")
            else:
                info.write_text(json.dumps({"version": VERSION}))
        except OSError as exc:
            raise StoreError(f"cannot use {root} as the store: {exc.strerror}") from exc
        return store

    # -- committed objects ----------------------------------------------------------------------------

    def contains(self, object_id: str | None) -> bool:
        return object_id is not None and (self.objects / object_id / "data" / "tree").is_dir()

    def tree(self, object_id: str) -> Path:
        return self.objects / object_id / "data" / "tree"

    def metadata(self, object_id: str) -> dict[str, dict[str, Any]]:
        """The stage metadata kept with an object, by stage id."""
        meta_dir = self.objects / object_id / "data" / "meta"
        result: dict[str, dict[str, Any]] = {}
        if meta_dir.is_dir():
            for f in meta_dir.glob("*.json"):
                if f.stem != "info":
                    result[f.stem] = json.loads(f.read_text())
        return result

    # -- entries under construction --------------------------------------------------------------------

    @asynccontextmanager
    async def new_entry(self) -> AsyncIterator[Entry]:
        """A fresh staging entry; whatever is left of it is removed on exit, committed or not."""
        entry = Entry(self.staging / f"uuid-{uuid.uuid4().hex}")
        entry.tree.mkdir(parents=True)
        entry.meta.mkdir(parents=True)
        try:
            yield entry
        finally:
            with anyio.CancelScope(shield=True):
                await remove_tree(entry.path)

    @asynccontextmanager
    async def scratch_dir(self, prefix: str) -> AsyncIterator[Path]:
        path = self.tmp / f"{prefix}-{uuid.uuid4().hex}"
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            with anyio.CancelScope(shield=True):
                await remove_tree(path)

    async def commit(self, entry: Entry, object_id: str) -> None:
        """Move a finished entry to `objects/<id>`; if the id is there already, keep the existing one."""
        (entry.meta / "info.json").write_text(json.dumps({"created": int(time.time())}))
        try:
            os.rename(entry.path, self.objects / object_id)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # someone committed this id first
                raise StoreError(f"cannot commit {object_id} to the store: {exc.strerror}") from exc

    async def checkpoint(self, entry: Entry, object_id: str) -> None:
        """Commit a copy of an entry that is still being built on (an intermediate stage)."""
        if self.contains(object_id):
            return
        async with self.new_entry() as copy:
            await copy_tree(entry.tree, copy.tree)
            await copy_tree(entry.meta, copy.meta)
            await self.commit(copy, object_id)

    async def restore(self, object_id: str, entry: Entry) -> None:
        """Start an entry from a committed object, to resume a pipeline after its newest cached stage."""
        await copy_tree(self.tree(object_id), entry.tree)
        await copy_tree(self.objects / object_id / "data" / "meta", entry.meta)

    def source_path(self, content_type: str, checksum: str) -> Path:
        return self.sources / content_type / checksum


async def copy_tree(src: Path, dst: Path) -> None:
    """Copy a tree's contents with owners, modes, links and xattrs, sharing blocks where the fs can."""
    await anyio.Path(dst).mkdir(parents=True, exist_ok=True)
    await process.run(["cp", "--reflink=auto", "-a", "--", f"{src}/.", f"{dst}/"])


async def remove_tree(path: Path) -> None:
    """Remove a directory tree, even one whose directories a stage made read-only."""
    def remove() -> None:
        if not path.exists():
            return

        def make_writable(func: Any, p: str, _exc: Any) -> None:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)

        shutil.rmtree(path, onerror=make_writable)  # onexc needs Python 3.12

    await anyio.to_thread.run_sync(remove)
