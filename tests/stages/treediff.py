"""Comparing exported trees: the a/b test of a stage builds a pipeline without it and with it.

Also the checks every stage test makes of a failed build: where the manifest was invalid, or that a
location escaping its root was refused without leaving anything behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import Aosbuild, Run, manifest, pipeline


@dataclass(frozen=True, slots=True)
class Node:
    """What is compared of one path; timestamps are not, as every build sets them anew."""

    kind: str  # "file", "dir", "symlink" or "other"
    mode: int  # the permission bits
    uid: int = dataclasses.field(default_factory=os.getuid)  # stages run as we do
    gid: int = dataclasses.field(default_factory=os.getgid)
    size: int | None = None  # of a file
    sha256: str | None = None  # of a file's content
    target: str | None = None  # of a symlink


def node(path: Path) -> Node:
    st = path.lstat()
    common = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    if stat.S_ISREG(st.st_mode):
        return Node("file", *common, size=st.st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    if stat.S_ISLNK(st.st_mode):
        return Node("symlink", *common, target=os.readlink(path))
    return Node("dir" if stat.S_ISDIR(st.st_mode) else "other", *common)


def snapshot(root: Path) -> dict[str, Node]:
    """Every path below `root` (relative, the root itself as "."), without following symlinks."""
    nodes = {".": node(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            nodes[str(path.relative_to(root))] = node(path)
    return nodes


@dataclass(frozen=True, slots=True, kw_only=True)
class TreeDiff:
    added: dict[str, Node]
    removed: dict[str, Node]
    changed: dict[str, dict[str, tuple[Any, Any]]]  # path -> field -> (in a, in b)


def diff(a: Path, b: Path) -> TreeDiff:
    before, after = snapshot(a), snapshot(b)
    changed = {}
    for path in before.keys() & after.keys():
        old, new = dataclasses.asdict(before[path]), dataclasses.asdict(after[path])
        fields = {key: (old[key], new[key]) for key in old if old[key] != new[key]}
        if fields:
            changed[path] = fields
    return TreeDiff(added={p: after[p] for p in after.keys() - before.keys()},
                    removed={p: before[p] for p in before.keys() - after.keys()}, changed=changed)


def export(aosbuild: Aosbuild, description: dict[str, Any], *names: str) -> Run:
    """Build through the CLI and export the named pipelines to `aosbuild.output/<name>`."""
    exports = [arg for name in names for arg in ("--export", name)]
    return aosbuild(description, *exports, "--output-directory", str(aosbuild.output))


def build_ab(aosbuild: Aosbuild, base: list[dict[str, Any]], stage: dict[str, Any], *,
             others: tuple[dict[str, Any], ...] = (), sources: dict[str, Any] | None = None) -> TreeDiff:
    """Build pipeline "a" of the `base` stages and "b" of the same plus `stage`; what did `stage` do?

    `others` are pipelines that come first, for the stage's inputs to refer to.
    """
    description = manifest(*others, pipeline("a", *base), pipeline("b", *base, stage), sources=sources)
    result = export(aosbuild, description, "a", "b")
    assert result.returncode == 0, result.stdout + result.stderr
    return diff(aosbuild.output / "a", aosbuild.output / "b")


def umask() -> int:
    """The umask the stages run with (they inherit ours); read without changing it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask in /proc/self/status")


def assert_invalid(result: Run, location: str, message: str) -> None:
    """The manifest was refused before anything ran (exit 2), at the JSON path `location` with a message
    that starts with `message`."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{location}:\n  {message}" in result.stdout, result.stdout


def assert_refused(aosbuild: Aosbuild, result: Run, name: str, reason: str = "escapes its root") -> None:
    """The stage refused a location (exit 1), and nothing called `name` appeared anywhere on our side."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert reason in result.stderr, result.stderr
    assert not aosbuild.output.exists()  # the failed pipeline was neither committed nor exported
    assert not any(aosbuild.store.joinpath("stage").iterdir())  # its staging entry is gone
    assert list(aosbuild.workdir.rglob(name)) == []
