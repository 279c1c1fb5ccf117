"""Inputs: what a stage reads besides its tree, made visible read-only under /run/osbuild/inputs/<name>.

- `org.osbuild.tree`: one pipeline's tree, bind-mounted (from a mount of its layers: see builder.Views).
- `org.osbuild.files`: source items, hard-linked into a directory named by their checksums; or, with
  pipeline origin, single files out of pipeline trees (`{"<id>": {"file": "/disk.img"}}`).
- `org.osbuild.noop`: an empty directory.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .confine import relative_path
from .errors import SandboxError
from .manifest import PIPELINE_ORIGIN, Input
from .sandbox import INPUTS, Bind


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def map_input(inp: Input, *, scratch: Path, tree_of: Callable[[str], Path],
              file_of: Callable[[str, str], Path | None],
              source_item: Callable[[str], Path]) -> tuple[list[Bind], dict[str, Any]]:
    """The binds that show an input in the sandbox, and the argument the stage gets for it.

    `tree_of(id)` is a directory showing a pipeline's tree, `file_of(id, name)` the regular file `name`
    in it with symlinks resolved inside the tree (None if there is none)."""
    target = f"{INPUTS}/{inp.name}"
    if inp.type == "org.osbuild.tree":
        if len(inp.refs) > 1:
            raise SandboxError(f"input '{inp.name}': org.osbuild.tree takes one pipeline, got {len(inp.refs)}")
        if inp.refs:
            return [Bind(tree_of(next(iter(inp.refs))), target)], {"path": target}  # no `data`, as osbuild
    elif inp.type == "org.osbuild.files" and inp.origin == PIPELINE_ORIGIN:
        binds = []
        files: dict[str, Any] = {}
        for pipeline_id, ref in inp.refs.items():
            # the loader refused bad names already; checked again here, and the bind target is built
            # from the checked name, so a symlink in the tree cannot move the mount point
            name, why = relative_path(str(ref.get("file", "")))
            path = file_of(pipeline_id, name) if name else None
            if name is None or path is None:
                raise SandboxError(f"input '{inp.name}': no file '{ref.get('file')}' in pipeline {pipeline_id}"
                                   + (f" (the name {why})" if why else " inside its tree"))
            binds.append(Bind(path, f"{target}/{name}"))
            files[name] = ref.get("metadata", {})
        return binds, {"path": target, "data": {"files": files}}
    elif inp.type == "org.osbuild.files":
        directory = scratch / "inputs" / inp.name
        directory.mkdir(parents=True)
        for checksum in inp.refs:
            _link_or_copy(source_item(checksum), directory / checksum)
        # each item's `metadata` from the manifest, as osbuild's files input gives it
        files = {checksum: (ref or {}).get("metadata", {}) for checksum, ref in inp.refs.items()}
        return [Bind(directory, target)], {"path": target, "data": {"files": files}}
    elif inp.type != "org.osbuild.noop":
        raise SandboxError(f"input '{inp.name}': aosbuild has no input type {inp.type}")
    empty = scratch / "inputs" / inp.name
    empty.mkdir(parents=True)
    if inp.type == "org.osbuild.noop":
        # osbuild's noop input: a directory of its own inside, and the references handed back
        (empty / str(uuid.uuid4())).mkdir()
        return [Bind(empty, target)], {"path": target, "data": {"refs": dict(inp.refs)}}
    return [Bind(empty, target)], {"path": target}
