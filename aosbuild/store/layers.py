"""Layers: a stage's result as an overlayfs upper directory, and trees as stacks of them.

A layer holds what one stage changed: new and changed files, whiteouts (character devices 0:0) for what
it deleted, `trusted.overlay.opaque` on directories that hide everything below, and
`trusted.overlay.redirect` on directories it renamed (so `redirect_dir=on` is a mount option of every
mount here). A tree is a stack of layers, top first; only an overlay mount shows it as it is, so whatever
reads a tree reads it through one, never a layer's own directory (where whiteouts and overlay xattrs lie).

Every mount is made in a mount namespace of its own, by the command that needs it (`namespace_argv`:
`unshare --mount` mounts, then execs the command), so no mount can outlive that command: when its last
process ends, the kernel takes the namespace and its mounts down, even after a kill -9.

The few things the engine itself must know of a tree without a mount (is `/bin` a symlink, which file is
`/disk.img`) it looks up here the way overlayfs does (`find`).
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from .. import process
from .sizes import Usage

OVERLAY_XATTRS = "trusted.overlay."
OPAQUE = "trusted.overlay.opaque"
REDIRECT = "trusted.overlay.redirect"
XWHITEOUT = "trusted.overlay.whiteout"
ORIGIN = "trusted.overlay.origin"  # on what a stage copied up (changed), not on what it made anew
# redirect_dir=on: a directory renamed by a stage is a redirect, as on a plain directory (no EXDEV);
# metacopy off: a layer holds whole files, whatever stack it is used in later. A stage's own mount has
# index=on: while it runs, all names of a hard-linked lower file show its copy-up, and copied-up files
# carry their origin, which `relink_copied_up` goes by; the index itself stays in the stage's workdir.
# And volatile: no sync of the upper's filesystem, neither for the stage's fsyncs nor when the mount
# ends (a syncfs of the whole filesystem the store is on, ~0.5 s per 300 MB written on a root disk),
# which a plain directory does not pay either; a layer is worth nothing until it is committed, and a
# stage that fails or is killed leaves its upper to be discarded, never mounted again
MOUNT_OPTIONS = "redirect_dir=on,metacopy=off"
STAGE_OPTIONS = "index=on,volatile"
VOLATILE_MARK = "work/incompat/volatile"  # what a volatile mount, even a failed one, leaves in its workdir


def clear_volatile_mark(work: Path) -> None:
    """Let a volatile mount that failed (its lower still busy) be tried again on the same workdir: the
    kernel refuses a workdir holding the mark of an earlier volatile mount, which is there to stop an
    upper dir that missed its syncs being used after a crash; this one was never mounted."""
    shutil.rmtree(work / VOLATILE_MARK, ignore_errors=True)
READ_OPTIONS = "index=off"
# mount(2) takes its options as one page; paths are given relative to the store to fit more layers
OPTIONS_MAX = 4000
# the most layers one mount stacks (plus an empty bottom directory): past it, the tree is squashed into
# one flat layer first. 20 layers of a store under /dev/shm take ~1.7 kB of the page.
MAX_LAYERS = 20
SYMLINK_HOPS = 40

# The previous stage's sandbox may still be going away (its init dies of --die-with-parent a moment after
# bwrap), holding the overlay whose upper dir is now a lower layer here: with index=on the kernel refuses
# that one (EBUSY, "lowerdir is in-use as upperdir"), so a mount is tried again for up to 5 s.
MOUNT_SCRIPT = (
    'cd "$1" || exit 125; unset OLDPWD; '  # cd sets OLDPWD, which the stage must not inherit
    '[ ! -s "$2" ] || xargs -0 -a "$2" umount --lazy 2>/dev/null; shift 2; '
    'while [ "$1" != "--" ]; do n=0; '
    'until mount -t overlay aosbuild -o "$2" "$1" 2>/dev/null; do n=$((n+1)); '
    'if [ $n -ge 100 ]; then mount -t overlay aosbuild -o "$2" "$1"; exit 125; fi; sleep 0.05; done; '
    'shift 2; done; '
    'shift; exec "$@"')
ALWAYS_NEEDED = ("/proc", "/sys")  # bwrap reads /proc/self; binds /sys


def _xattr(path: Path | str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise


def is_whiteout(path: Path | str, st: os.stat_result) -> bool:
    """overlayfs's mark of a deleted name: a 0:0 character device (or, 6.7+, an xattr-marked empty file)."""
    if stat.S_ISCHR(st.st_mode):
        return st.st_rdev == 0
    return stat.S_ISREG(st.st_mode) and st.st_size == 0 and _xattr(path, XWHITEOUT) is not None


def find(layers: Sequence[Path], relative: str) -> Path | None:
    """The real file that `relative` names in the stack `layers` (top first), as overlayfs looks it up:
    the topmost entry wins, a whiteout hides the name, an opaque directory hides what is below it, a
    redirect sends the lookup of lower layers elsewhere. Symlinks on the way are not followed (None)."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    active: list[tuple[Path, str]] = [(root, "") for root in layers]
    if not parts:
        return layers[0] if layers else None
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        found: list[tuple[Path, str]] = []
        redirect: tuple[bool, str] | None = None  # (absolute, path) for the layers below
        for root, prefix in active:
            if redirect is None:
                rel = posixpath.join(prefix, part)
            else:
                rel = redirect[1] if redirect[0] else posixpath.join(prefix, redirect[1])
            path = root / rel
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if is_whiteout(path, st):
                break
            if not stat.S_ISDIR(st.st_mode):
                if not found:  # a non-directory on top is the entry; below a directory it is hidden
                    return path if last else None
                break
            found.append((root, rel))
            if _xattr(path, OPAQUE) == b"y":
                break
            target = _xattr(path, REDIRECT)
            if target:
                text = os.fsdecode(target)
                if ".." in text.split("/"):
                    break  # overlayfs refuses such a redirect; followed here it would leave the layer
                redirect = (True, text.lstrip("/")) if text.startswith("/") else (False, text)
        if not found:
            return None
        if last:
            return found[0][0] / found[0][1]
        active = found
    return None


def resolve(layers: Sequence[Path], relative: str) -> str | None:
    """`relative` with every symlink in the stack resolved, as a path relative to the tree's root; None
    where a symlink leads out of the tree (an absolute target or `..` above the root) or loops."""
    pending = [p for p in relative.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if not done:
                return None
            done.pop()
            continue
        path = find(layers, "/".join([*done, part]))
        if path is not None and path.is_symlink():
            hops += 1
            target = os.readlink(path)
            if hops > SYMLINK_HOPS or target.startswith("/"):
                return None
            pending = [p for p in target.split("/") if p not in ("", ".")] + pending
            continue
        done.append(part)
    return "/".join(done)


def file_in(layers: Sequence[Path], name: str) -> str | None:
    """`name` resolved inside the stack (see `resolve`) if it is a regular file there, else None."""
    resolved = resolve(layers, name)
    real = find(layers, resolved) if resolved else None
    if real is None or real.is_symlink() or not real.is_file():
        return None
    return resolved


def copy_attributes(src: Path, dst: Path) -> None:
    """Owner, mode, times and xattrs (not overlayfs's own) of the directory `src` onto `dst`."""
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src, follow_symlinks=False):
        if not name.startswith(OVERLAY_XATTRS):
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def strip_overlay_xattrs(path: Path) -> None:
    for name in os.listxattr(path, follow_symlinks=False):
        if name.startswith(OVERLAY_XATTRS):
            os.removexattr(path, name, follow_symlinks=False)


ESCAPED = "trusted.overlay.overlay."  # how overlayfs (6.7+) keeps a stage's own trusted.overlay.* xattrs


@dataclass(frozen=True)
class Plain:
    """What a walk of a bottom layer found: whether it reads right without a mount, its bytes on disk,
    and whether it holds xattrs named like overlayfs's own (`marked`: escaped by `make_plain`)."""
    readable: bool
    size: int
    marked: bool = False


def make_plain(tree: Path) -> Plain:
    """Ready a tree that a stage wrote on a plain directory (the bottom layer of a pipeline, which needs
    no overlay mount) to be a layer, and say whether it can also be read as it is, without a mount.

    A stage writing through an overlay mount cannot leave overlayfs's marks: the kernel keeps its
    `trusted.overlay.*` xattrs as `trusted.overlay.overlay.*` and refuses to make a 0:0 device. On a plain
    directory it can (a tarball of a container store, say), and an overlay mount of the layer would then
    take them for its own and hide files. So those xattrs are escaped as the kernel escapes them; then
    the tree reads right only through a mount, and so does one with a 0:0 device (False). Most trees
    have neither (True): such a layer is a whole tree in one directory, read as is (`TreeView.flat`).

    The same walk counts the tree's size (each entry stat'ed after its xattrs are escaped), so that the
    commit need not walk the tree again.
    """
    return _walk_plain(tree, escape=True)


def inspect_plain(tree: Path) -> Plain:
    """`make_plain`'s walk without changing anything: what it would find (`marked`: there is something
    to escape). It may run while the tree is the lower layer of a mount, which must not change under it;
    the builder runs it beside the next stage, and `make_plain` only if it finds a mark (`LayerCheck`)."""
    return _walk_plain(tree, escape=False)


def _walk_plain(tree: Path, *, escape: bool) -> Plain:
    readable, marked = True, False
    usage = Usage()
    root = os.fspath(tree)

    def check(path: str) -> None:
        nonlocal readable, marked
        for name in os.listxattr(path, follow_symlinks=False):
            if name.startswith(OVERLAY_XATTRS):
                readable, marked = False, True
                if escape:
                    value = os.getxattr(path, name, follow_symlinks=False)
                    os.setxattr(path, ESCAPED + name.removeprefix(OVERLAY_XATTRS), value, follow_symlinks=False)
                    os.removexattr(path, name, follow_symlinks=False)

    check(root)
    usage.add(os.lstat(root))
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                check(entry.path)
                st = entry.stat(follow_symlinks=False)  # after escaping: an xattr may take a block
                usage.add(st)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                elif stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    readable = False
    return Plain(readable, usage.total, marked)


def _make_parents(layers: Sequence[Path], upper: Path, relative: str) -> tuple[Path, list[tuple[Path, Path]]] | None:
    """The file to copy up and the directories made for it in `upper` (with their lower ones)."""
    if os.path.lexists(upper / relative):
        return None
    source = find(layers, relative)
    if source is None:
        return None
    return source, _make_dirs(layers, upper, relative)


def _make_dirs(layers: Sequence[Path], upper: Path, relative: str) -> list[tuple[Path, Path]]:
    """The directories above `relative` that `upper` lacks, made (their attributes are set later)."""
    parts = relative.split("/")
    made: list[tuple[Path, Path]] = []
    for depth in range(1, len(parts)):
        sub = "/".join(parts[:depth])
        if not os.path.lexists(upper / sub):
            lower = find(layers, sub)
            (upper / sub).mkdir()
            if lower is not None:
                made.append((lower, upper / sub))
    return made


def _finish_copy(copied: Path, made: list[tuple[Path, Path]]) -> None:
    strip_overlay_xattrs(copied)
    for lower, made_dir in reversed(made):  # deepest first: setting a parent's times last keeps them
        copy_attributes(lower, made_dir)


async def copy_up(layers: Sequence[Path], upper: Path, relative: str) -> None:
    """Copy the file `relative` of the stack `layers` into the new layer `upper` (with its directories),
    as overlayfs does on the first write: for a file the engine itself opens, a loop device's backing
    file, which it must open in the layer the stage writes."""
    plan = await anyio.to_thread.run_sync(_make_parents, layers, upper, relative)
    if plan is None:
        return
    source, made = plan
    await process.run(["cp", "-a", "--sparse=always", "--reflink=auto", "--", os.fspath(source),
                       os.fspath(upper / relative)])
    await anyio.to_thread.run_sync(_finish_copy, upper / relative, made)


def _layer_of(layers: Sequence[Path], path: Path) -> Path:
    return next(root for root in layers if path.is_relative_to(root))


def _same_inode(layer: Path, ino: int) -> list[str]:
    found = []
    for dirpath, _, filenames in os.walk(layer):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.lstat(path).st_ino == ino:
                found.append(os.path.relpath(path, layer))
    return found


def relink_copied_up(lowers: Sequence[Path], upper: Path) -> int:
    """Keep hard links whole across layers; returns how many links were made.

    overlayfs (without `index`, which would tie a layer to one stack) copies up one name of a hard-linked
    file, and the other names keep the old inode in their lower layer: on a plain directory they would all
    show the change. So each file the stage copied up (it has an origin) whose lower file had more links
    gets those other names, where the stage left them alone, linked to the new copy in its layer.
    """
    if not lowers:
        return 0
    made = 0
    for dirpath, _, filenames in os.walk(upper):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or _xattr(path, ORIGIN) is None:
                continue
            relative = os.path.relpath(path, upper)
            lower = find(lowers, relative)
            if lower is None or os.lstat(lower).st_nlink < 2:
                continue
            layer = _layer_of(lowers, lower)
            for member in _same_inode(layer, os.lstat(lower).st_ino):
                if member == relative or os.path.lexists(upper / member) or find(lowers, member) != layer / member:
                    continue  # replaced or removed by the stage, linked already, or hidden by a layer above
                made_dirs = _make_dirs(lowers, upper, member)
                parent = (upper / member).parent
                times = os.lstat(parent)
                os.link(path, upper / member)
                os.utime(parent, ns=(times.st_atime_ns, times.st_mtime_ns))
                for lower_dir, made_dir in reversed(made_dirs):
                    copy_attributes(lower_dir, made_dir)
                made += 1
    return made


@dataclass(frozen=True, slots=True, kw_only=True)
class Overlay:
    """One overlay mount: `lowers` top first; with `upper` (and `work`, on its filesystem) writable."""

    target: Path
    lowers: tuple[Path, ...]
    empty: Path                # an empty directory: the bottom of every stack (a stack needs one lower)
    upper: Path | None = None
    work: Path | None = None

    def options(self, base: Path) -> str:
        inside = f"{os.fspath(base).rstrip('/')}/"

        def rel(path: Path) -> str:
            text = os.fspath(path)  # a layer in the store, mostly: relpath's normalising is the slow way
            plain = text.startswith(inside) and "/." not in text and "//" not in text
            text = text[len(inside):] if plain else os.path.relpath(path, base)
            if any(c in text for c in ",:\\"):
                raise OSError(errno.EINVAL, f"a layer path holds ',', ':' or '\\': {path}")
            return text

        lowers = ":".join(rel(p) for p in (*self.lowers, self.empty))
        if self.upper is None:
            text = f"ro,lowerdir={lowers},{MOUNT_OPTIONS},{READ_OPTIONS}"
        else:
            assert self.work is not None
            text = (f"lowerdir={lowers},upperdir={rel(self.upper)},workdir={rel(self.work)},{MOUNT_OPTIONS},"
                    f"{STAGE_OPTIONS}")
        if len(text) > OPTIONS_MAX:
            raise OSError(errno.E2BIG, f"{len(self.lowers)} layers do not fit one mount's options")
        return text


def mount_points(mountinfo: str | None = None) -> list[str]:
    """The mount points of this mount namespace (mountinfo's fifth field, octal escapes decoded)."""
    if mountinfo is None:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    return [line.split()[4].encode().decode("unicode_escape") for line in mountinfo.splitlines() if line]


def foreign(points: Sequence[str], needed: Sequence[str]) -> list[str]:
    """The mount points a namespace for `needed` paths can do without, deepest first: neither above a
    needed path nor inside one (binds are recursive). Detached there, a long stage does not keep alive
    the copies of other people's mounts its namespace began with (a test's tmpfs, a USB stick)."""
    wanted = {p.rstrip("/") or "/" for p in (*needed, *ALWAYS_NEEDED)}
    # the needed paths and every directory above one, as a set, and string cuts, not dirname: a stage
    # runs this with hundreds of host mounts on a busy machine (pairwise, it took 2 ms of every stage)
    above = {"/", *(path[:cut] for path in wanted for cut in _slashes(path)), *wanted}

    def related(point: str) -> bool:
        # the point is a needed path or above one, or inside one: one of the directories above it is one
        return point in above or any(point[:cut] in wanted for cut in _slashes(point))

    return sorted({p for p in points if not related(p)}, key=len, reverse=True)


def _slashes(path: str) -> list[int]:
    """Where `path` may be cut into a directory above it: before each of its inner slashes."""
    cuts, at = [], path.find("/", 1)
    while at != -1:
        cuts.append(at)
        at = path.find("/", at + 1)
    return cuts


def namespace_argv(base: Path, overlays: Sequence[Overlay], argv: Sequence[str], needed: Sequence[str] = (),
                   *, scratch: Path) -> list[str]:
    """`argv`, run in a new mount namespace with `overlays` mounted (paths relative to `base`), where
    the host's mounts that neither `needed` (the host paths `argv` uses) nor the overlays use are
    detached first. Their list goes into a file in `scratch`, not on the command line: other people's
    mount points there would make this process look like theirs, and a host with many mounts would
    make a very long command line."""
    if not overlays:
        return list(argv)
    mounts: list[str] = []
    paths = [os.fspath(base), *needed]
    for overlay in overlays:
        mounts += [os.fspath(overlay.target), overlay.options(base)]
        paths += [os.fspath(p) for p in (overlay.target, *overlay.lowers, overlay.empty, overlay.upper,
                                         overlay.work) if p is not None]
    detach = scratch / "detach"
    detach.write_bytes(b"".join(os.fsencode(point) + b"\0" for point in foreign(mount_points(), paths)))
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", MOUNT_SCRIPT,
            "aosbuild-mount", os.fspath(base), os.fspath(detach), *mounts, "--", *argv]


def squashable(layers: Sequence[Path]) -> bool:
    return len(layers) >= MAX_LAYERS


def shows_as_is(layer: Path) -> bool:
    """Whether the bottom layer `layer` alone reads the same as an overlay mount of it: below its top
    directory (whose overlayfs xattrs, `uuid` and `origin` of the mount it was the upper of, a copy
    strips) it holds no whiteout and no overlayfs xattr, which only the mount hides. Then it can be
    copied directly, with reflinks or in-kernel copies, and no mount namespace."""
    todo = [os.fspath(layer)]
    while todo:
        directory = todo.pop()
        if directory != os.fspath(layer) and any(
                name.startswith(OVERLAY_XATTRS) for name in os.listxattr(directory, follow_symlinks=False)):
            return False
        with os.scandir(directory) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    todo.append(entry.path)
                elif is_whiteout(entry.path, st) or (not stat.S_ISLNK(st.st_mode) and any(
                        name.startswith(OVERLAY_XATTRS)
                        for name in os.listxattr(entry.path, follow_symlinks=False))):
                    return False
    return True
