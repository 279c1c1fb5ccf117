"""Exports replace OUTDIR/NAME with a fresh copy: nothing a previous export left is written through or kept."""

from __future__ import annotations

import concurrent.futures
import fcntl
import functools
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from aosbuild.errors import AosbuildError, UsageError
from aosbuild.exporting import (
    export_target,
    export_tree,
    lock_if_still_there,
    make_fresh,
    move_aside,
    remove_leftovers,
    swap_in,
)
from aosbuild.exportmarks import CLOCK_REALTIME_COARSE, ExportMark, settle
from aosbuild.store import copy_tree

from .conftest import TEST_LIBDIR, Aosbuild, manifest, pipeline, stage

Snapshot = dict[str, tuple[str, int, int, int, bytes]]


def snapshot(root: Path) -> Snapshot:
    """Every entry under `root` (itself as "."): its kind, mode, owner and content or link target."""
    result: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames] if dirpath == str(root) else [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                kind, data = "link", os.fsencode(os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                kind, data = "dir", b""
            else:
                kind, data = "file", path.read_bytes()
            result[os.path.normpath(path.relative_to(root))] = (kind, stat.S_IMODE(st.st_mode), st.st_uid,
                                                                st.st_gid, data)
    return result


def leftovers(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


def test_reexport_writes_through_nothing_the_last_export_left(aosbuild: Aosbuild) -> None:
    canary = aosbuild.workdir / "canary"
    canary.write_text("host file\n")
    canary_dir = aosbuild.workdir / "canary-dir"
    canary_dir.mkdir()
    # a Debian-like tree: an absolute symlink that points out of the tree (as /etc/alternatives/* do)
    m = manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/etc"}]),
                          stage("org.osbuild.ln", paths=[{"target": str(canary), "link_name": "tree:///etc/editor",
                                                          "symbolic": True}]),
                          stage("org.aosbuild.test.files", seed="a", count=2)))
    tree_id = json.loads(aosbuild(m, "--inspect").stdout)["pipelines"][0]["stages"][-1]["id"]
    args = ("--export", "tree", "--output-directory", str(aosbuild.output))
    run = aosbuild(m, *args)
    assert run.returncode == 0, run.stderr
    exported = aosbuild.output / "tree"
    stored = snapshot(aosbuild.stored_tree(tree_id))
    assert snapshot(exported) == stored
    assert os.readlink(exported / "etc" / "editor") == str(canary)

    # the attack: links where the next export writes a file and a directory, and a stale file
    (exported / "a-0").unlink()
    (exported / "a-0").symlink_to(canary)
    (exported / "etc" / "editor").unlink()
    (exported / "etc").rmdir()
    (exported / "etc").symlink_to(canary_dir)
    (exported / "stale").write_text("from an earlier export\n")
    run = aosbuild(m, *args)
    assert canary.read_text() == "host file\n"
    assert os.listdir(canary_dir) == []
    assert run.returncode == 0, run.stderr
    assert snapshot(exported) == stored  # the stale file is gone, the links are replaced
    assert leftovers(aosbuild.output) == []

    # the export directory itself a symlink: replaced, not followed
    shutil.rmtree(exported)
    exported.symlink_to(canary_dir)
    run = aosbuild(m, *args)
    assert os.listdir(canary_dir) == []
    assert run.returncode == 0, run.stderr
    assert not exported.is_symlink()
    assert snapshot(exported) == stored
    assert leftovers(aosbuild.output) == []


def test_swap_in_replaces_whatever_is_there(workdir: Path) -> None:
    outside = workdir / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep\n")
    for old in ("nothing", "dir", "file", "link"):
        target = workdir / "out" / old
        target.parent.mkdir(exist_ok=True)
        if old == "dir":
            target.mkdir()
            (target / "stale").write_text("stale\n")
            (target / "link").symlink_to(outside)  # removed as a link, not followed
        elif old == "file":
            target.write_text("file\n")
        elif old == "link":
            target.symlink_to(outside)
        fresh = workdir / "out" / f".{old}.tmp-x"
        fresh.mkdir()
        (fresh / "new").write_text("new\n")
        swap_in(fresh, target)
        assert not target.is_symlink()
        assert os.listdir(target) == ["new"]
        assert not fresh.exists()
    assert leftovers(workdir / "out") == []
    assert os.listdir(outside) == ["keep"]


def test_move_aside_replaces_a_symlink_without_following_it(workdir: Path) -> None:
    """The way without rename flags (for filesystems that take none)."""
    outside = workdir / "outside"
    outside.mkdir()
    target = workdir / "target"
    target.symlink_to(outside)
    fresh = workdir / ".target.tmp-x"
    fresh.mkdir()
    (fresh / "new").write_text("new\n")
    move_aside(fresh, target)
    assert not target.is_symlink()
    assert os.listdir(target) == ["new"]
    assert os.listdir(outside) == []
    assert sorted(os.listdir(workdir)) == ["outside", "target"]


async def test_a_cancelled_export_leaves_no_temporary_directory(workdir: Path) -> None:
    tree = workdir / "tree"
    tree.mkdir()
    (tree / "new").write_text("new\n")
    target = workdir / "out" / "tree"
    target.mkdir(parents=True)
    (target / "old").write_text("old\n")
    copied = anyio.Event()

    async def copy_then_hang(src: Path, dst: Path) -> None:
        await copy_tree(src, dst)  # the real copy, into the temporary directory
        copied.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(export_tree, tree, target, copy=copy_then_hang))
        await copied.wait()
        assert len(leftovers(target.parent)) == 1  # the copy is under way, beside the target
        tg.cancel_scope.cancel()
    assert leftovers(target.parent) == []
    assert os.listdir(target) == ["old"]


async def test_a_failed_export_leaves_the_old_one(workdir: Path) -> None:
    target = workdir / "out" / "tree"
    target.mkdir(parents=True)
    (target / "old").write_text("old\n")
    with pytest.raises(AosbuildError):
        await export_tree(workdir / "no-such-tree", target)
    assert leftovers(target.parent) == []
    assert os.listdir(target) == ["old"]


async def test_an_empty_pipeline_exports_an_empty_directory(workdir: Path) -> None:
    target = workdir / "out" / "tree"
    await export_tree(None, target)
    assert os.listdir(target) == []
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755


@pytest.mark.parametrize("name", ["", ".", "a/..", "..", "../x", "a/../../x", "/etc", "//etc", "a/b", "x/",
                                  "a\0b", "x" * 256])
def test_an_export_is_one_directory_directly_inside_the_output_directory(workdir: Path, name: str) -> None:
    """Also `a/b`: OUTDIR/a may be a symlink out of OUTDIR, and the loader refuses such pipeline names."""
    with pytest.raises(UsageError, match="directly inside --output-directory"):
        export_target(workdir, name)


@pytest.mark.parametrize("name", ["tree", "build-build", ".hidden", "x" * 255])
def test_export_target_inside_the_output_directory(workdir: Path, name: str) -> None:
    assert export_target(workdir, name) == workdir / name


# An export killed outright: a process that exports with a copy that never ends, killed with -9 once the
# copy has written into the temporary directory.
KILLED_EXPORT = """
import sys, anyio
from pathlib import Path
from aosbuild.exporting import export_tree
from aosbuild.store import copy_tree

async def copy_then_hang(src, dst):
    await copy_tree(src, dst)
    print("copied", flush=True)
    await anyio.sleep_forever()

anyio.run(lambda: export_tree(Path(sys.argv[1]), Path(sys.argv[2]), copy=copy_then_hang))
"""


def test_the_next_export_removes_what_a_killed_export_left(aosbuild: Aosbuild) -> None:
    tree = aosbuild.workdir / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(b"x" * 4096)
    with subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(tree), str(aosbuild.output / "tree")],
                          stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "copied\n"
        proc.kill()
    (stale,) = leftovers(aosbuild.output)
    assert stale.startswith(".tree.tmp-")
    m = manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/etc"}])))
    run = aosbuild(m, "--export", "tree", "--output-directory", str(aosbuild.output))
    assert run.returncode == 0, run.stderr
    assert leftovers(aosbuild.output) == []
    assert os.listdir(aosbuild.output / "tree") == ["etc"]


def test_removing_leftovers_touches_only_dead_exports_of_that_name(workdir: Path) -> None:
    out, canary = workdir / "out", workdir / "canary"
    out.mkdir()
    canary.mkdir()
    (canary / "keep").write_text("keep\n")
    hexes = iter(f"{i:032x}" for i in range(1, 100))
    dead = [out / f".tree.tmp-{next(hexes)}", out / f".tree.old-{next(hexes)}"]
    for path in dead:
        path.mkdir()
        (path / "sub").mkdir()
        (path / "sub" / "link").symlink_to(canary)  # removed as a link, never followed
    kept: dict[str, Callable[[Path], object]] = {
        f".tree.tmp-{next(hexes)}": lambda p: p.symlink_to(canary),         # a symlink: not followed
        f".tree.old-{next(hexes)}": lambda p: p.write_text("a file\n"),     # not a directory of ours
        f".other.tmp-{next(hexes)}": lambda p: p.mkdir(),                   # another export's
        ".tree.tmp-short": lambda p: p.mkdir(),                             # not a name we make
        f".tree.tmp-{next(hexes)}.x": lambda p: p.mkdir(),
        "tree": lambda p: p.mkdir(),
    }
    for name, make in kept.items():
        make(out / name)
    live, fd = make_fresh(out, "tree")  # a live export's: its flock is held
    try:
        assert sorted(remove_leftovers(out, "tree")) == sorted(p.name for p in dead)
        assert sorted(os.listdir(out)) == sorted([*kept, live.name])
    finally:
        os.close(fd)
    assert remove_leftovers(out, "tree") == [live.name]  # once its export is gone
    assert os.listdir(canary) == ["keep"]


def open_elsewhere(path: Path, *, besides: int) -> bool:
    """Whether a descriptor of this process other than `besides` is open on `path`."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if int(name) != besides and os.readlink(f"/proc/self/fd/{name}") == str(path):
                return True
        except OSError:
            continue
    return False


def test_a_fresh_directory_removed_before_it_is_locked_is_not_used(workdir: Path) -> None:
    """Another export's `remove_leftovers` took the new directory for a dead one and removes it, holding
    its flock: the flock of the export that made it waits, then sees it gone (make_fresh starts over)."""
    fresh = workdir / f".tree.tmp-{'0' * 32}"
    fresh.mkdir()
    remover = os.open(fresh, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(remover, fcntl.LOCK_EX)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        locking = pool.submit(lock_if_still_there, fresh)
        deadline = time.monotonic() + 10
        while not open_elsewhere(fresh, besides=remover):  # the thread has it open: next, it flocks
            assert time.monotonic() < deadline
        fresh.rmdir()
        os.close(remover)
        assert locking.result(timeout=10) is None
    fresh.mkdir()
    fd = lock_if_still_there(fresh)
    assert fd is not None
    os.close(fd)


async def test_concurrent_exports_of_one_name_never_remove_each_others_copy(workdir: Path) -> None:
    """Each export clears leftovers of its name first: it must not take another's live copy for one."""
    tree = workdir / "tree"
    tree.mkdir()
    for i in range(50):
        (tree / f"f{i}").write_text(f"{i}\n")
    target = workdir / "out" / "tree"
    async with anyio.create_task_group() as tg:
        for _ in range(16):
            tg.start_soon(export_tree, tree, target)
    assert sorted(os.listdir(target)) == sorted(f"f{i}" for i in range(50))
    assert leftovers(target.parent) == []


def test_export_to_a_relative_output_directory(aosbuild: Aosbuild) -> None:
    """The layers are merged by a command that runs in the store's directory: a relative output
    directory still means one relative to where aosbuild was started."""
    m = manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/a"}]),
                          stage("org.osbuild.mkdir", paths=[{"path": "/b"}])))
    run = aosbuild(m, "--export", "tree", "--output-directory", "relative-out")
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(aosbuild.workdir / "relative-out" / "tree")) == ["a", "b"]


def inodes(root: Path) -> dict[str, tuple[int, int]]:
    return {os.path.relpath(os.path.join(d, n), root): (os.lstat(os.path.join(d, n)).st_dev,
                                                         os.lstat(os.path.join(d, n)).st_ino)
            for d, _, files in os.walk(root) for n in files}


def test_the_same_export_again_keeps_the_copy_until_it_is_changed(aosbuild: Aosbuild) -> None:
    """A cached rebuild into the same output directory leaves the export that is there alone, as long as
    nothing changed it; one changed in any way (even with its size and mtime put back) is copied again.
    An export never shares an inode with the store, kept or copied."""
    m = manifest(pipeline("tree", stage("org.aosbuild.test.files", seed="a", count=2, size=65536)))
    tree_id = json.loads(aosbuild(m, "--inspect").stdout)["pipelines"][0]["stages"][-1]["id"]
    args = ("--export", "tree", "--output-directory", str(aosbuild.output))
    exported, image = aosbuild.output / "tree", aosbuild.output / "tree" / "a-0"

    def export() -> None:
        run = aosbuild(m, *args)
        assert run.returncode == 0, run.stderr
        assert snapshot(exported) == stored
        assert not set(inodes(exported).values()) & set(inodes(aosbuild.store).values())
        assert leftovers(aosbuild.output) == []

    assert aosbuild(m, *args).returncode == 0
    stored = snapshot(aosbuild.stored_tree(tree_id))
    export()
    first = inodes(exported)
    export()
    assert inodes(exported) == first  # kept: nothing was copied

    before = os.lstat(image)
    with open(image, "r+b") as f:  # the user's change: same size, and the mtime put back
        f.write(b"changed")
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    export()
    assert inodes(exported) != first
    second = inodes(exported)

    (exported / "added").write_text("by the user\n")
    export()  # the added file is gone
    assert inodes(exported) != second

    other = manifest(pipeline("tree", stage("org.aosbuild.test.files", seed="b", count=1)))
    assert aosbuild(other, *args).returncode == 0
    assert os.listdir(exported) == ["b-0"]
    export()  # the mark is of the other tree now


def test_a_mark_is_kept_only_once_a_later_write_gets_a_later_time(workdir: Path) -> None:
    """`settle`: after it, the coarse clock (the one file times come from) is more than 1 ms past the
    newest ctime recorded, so a write after the export is done changes its file's ctime. A filesystem
    whose times are whole milliseconds or coarser (FAT: 2 s) gets no mark."""
    target = workdir / "tree"
    target.mkdir()
    (target / "f").write_text("x")
    newest = os.lstat(target / "f").st_ctime_ns
    assert settle(newest)
    assert time.clock_gettime_ns(CLOCK_REALTIME_COARSE) > newest + 1_000_000
    assert not settle(newest - newest % 1_000_000)
    assert not settle(time.time_ns() + 10**9)  # a time a second ahead is not waited for

    mark = ExportMark(store=workdir / "store", tree="t")
    workdir.joinpath("store").mkdir()
    for _ in range(20):
        mark.remember(target)
        assert mark.holds(target)
        with open(target / "f", "a") as f:
            f.write("y")
        assert not mark.holds(target)
    assert not ExportMark(store=workdir / "store", tree="another").holds(target)


@pytest.fixture
def xfs(workdir: Path) -> Iterator[Path]:
    """An XFS (reflinks on, as mkfs.xfs makes it) on a loop device of our own, mounted in `workdir`."""
    image, mountpoint = workdir / "xfs.img", workdir / "xfs"
    with open(image, "wb") as f:
        f.truncate(320 << 20)  # mkfs.xfs's smallest
    subprocess.run(["mkfs.xfs", "-q", str(image)], check=True)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                            text=True).stdout.strip()
    try:
        mountpoint.mkdir()
        subprocess.run(["mount", device, str(mountpoint)], check=True)
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)


def shared_extents(path: Path) -> bool:
    """Whether every extent of the file is shared with another file (FIEMAP_EXTENT_SHARED)."""
    extents = [line for line in subprocess.run(["filefrag", "-v", str(path)], check=True, capture_output=True,
                                               text=True).stdout.splitlines() if line.lstrip()[:1].isdigit()]
    return bool(extents) and all("shared" in line for line in extents)


def test_an_export_on_a_filesystem_with_reflinks_shares_blocks_not_inodes(xfs: Path) -> None:
    """Store and output directory on one XFS: the export is a reflink copy (its blocks shared with the
    store's, no data copied), still a file of its own; the next export keeps it, a changed one is copied."""
    m = manifest(pipeline("tree", stage("org.aosbuild.test.files", seed="a", count=1, size=1 << 20)))
    path = xfs / "manifest.json"
    path.write_text(json.dumps(m))
    argv = [sys.executable, "-m", "aosbuild", "--libdir", str(TEST_LIBDIR), "--store", str(xfs / "store"),
            "--export", "tree", "--output-directory", str(xfs / "output"), str(path)]
    subprocess.run(argv, check=True, capture_output=True)
    image = xfs / "output" / "tree" / "a-0"
    assert shared_extents(image)
    # copied from the layer itself, not through an overlay mount: none of the layer's overlayfs xattrs
    assert [x for x in os.listxattr(image.parent) if x.startswith("trusted.overlay.")] == []
    stored = [Path(d, n) for d, _, files in os.walk(xfs / "store" / "objects") for n in files if n == "a-0"]
    assert stored
    assert all(os.lstat(s).st_ino != os.lstat(image).st_ino and s.read_bytes() == image.read_bytes()
               for s in stored)
    first = os.lstat(image).st_ino
    subprocess.run(argv, check=True, capture_output=True)
    assert os.lstat(image).st_ino == first
    with open(image, "r+b") as f:  # a write to a reflinked file unshares that block, not the store's
        f.write(b"changed")
    assert all(s.read_bytes()[:7] != b"changed" for s in stored)
    subprocess.run(argv, check=True, capture_output=True)
    assert os.lstat(image).st_ino != first
    assert shared_extents(image)
    assert image.read_bytes() == stored[0].read_bytes()
