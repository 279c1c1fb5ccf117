"""A stage's layer as an OCI image layer: an overlayfs upper directory <-> a compressed tar changeset.

The tar is PAX, entries sorted by name, numeric owners only (no user or group names), mtimes to the
nanosecond (PAX `mtime`), xattrs as `SCHILY.xattr.NAME`, device nodes, fifos, symlinks and hard links (a
later name of an inode is a link to its first name in sorted order). overlayfs marks become OCI's: a
whiteout (a 0:0 character device, or an empty file with `trusted.overlay.whiteout`) is an empty file
`.wh.NAME`, an opaque directory (`trusted.overlay.opaque=y`) gets a `DIR/.wh..wh..opq` entry right after
its own; other `trusted.overlay.*` xattrs are overlayfs's bookkeeping and are left out. A directory that
overlayfs redirected (`trusted.overlay.redirect`, a rename) has no OCI form: such a layer is refused, so
the caller flattens it first. Sockets are skipped (tar has no type for them).

Nothing in the output depends on the machine (no names, no archive time, gzip without name or time), so
the same layer gives the same digest anywhere. Reading goes two ways: back into an upper directory
(`.wh.` entries become whiteouts again) or applied onto a merged tree (`.wh.` entries delete), as an
image's layers are unpacked in order. Unpacking trusts nothing in the tar (a pulled layer is what a
registry served): no member is written, linked or whited out outside `dest` (through `..`, or through a
symlink, one that replaced a directory an earlier member made included), overlayfs's own xattrs are
refused, and with `max_bytes` the layer's files may hold no more than that.

The work is synchronous file I/O; callers run it in a worker thread (`anyio.to_thread.run_sync`).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal

import zstandard

from .errors import AosbuildError

MEDIA_TYPE_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_TYPE_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPES = {"zstd": MEDIA_TYPE_ZSTD, "gzip": MEDIA_TYPE_GZIP}
Compression = Literal["zstd", "gzip"]

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_XATTRS = "trusted.overlay."
OPAQUE = "trusted.overlay.opaque"
REDIRECT = "trusted.overlay.redirect"
XWHITEOUT = "trusted.overlay.whiteout"
XATTR_PREFIX = "SCHILY.xattr."
ZSTD_LEVEL = 3
GZIP_LEVEL = 6
CHUNK = 1 << 20


class LayerError(AosbuildError):
    """A directory cannot be written as a layer, or a layer tar cannot be unpacked safely."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"layer entry {path!r}: {message}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerInfo:
    """What an OCI manifest says about a layer: its blob's digest and size, and the uncompressed tar's
    digest (the image config's `rootfs.diff_ids`)."""

    digest: str
    size: int
    diff_id: str
    media_type: str


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it to `target`, in 1 MiB pieces
    (tar writes many 512-byte headers: compressing and hashing each alone costs more than the work)."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._pending = bytearray()

    def write(self, data: bytes) -> int:
        self._pending += data
        self.size += len(data)
        if len(self._pending) >= CHUNK:
            self.flush()
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if self._pending:
            self.sha256.update(self._pending)
            self.target.write(bytes(self._pending))
            self._pending.clear()


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in sorted(names)}


def _sorted_paths(root: str) -> list[str]:
    paths: list[str] = []

    def visit(relative: str) -> None:
        directory = os.path.join(root, relative) if relative else root
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
        for entry in entries:
            child = f"{relative}/{entry.name}" if relative else entry.name
            paths.append(child)
            if entry.is_dir(follow_symlinks=False):
                visit(child)

    visit("")
    return paths


def _info(name: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = st.st_mtime_ns // 1_000_000_000
    fraction = st.st_mtime_ns % 1_000_000_000
    info.pax_headers = {"mtime": f"{info.mtime}.{fraction:09d}"} if fraction else {}
    return info


def _is_whiteout(path: str, st: os.stat_result, xattrs: dict[str, bytes]) -> bool:
    if stat.S_ISCHR(st.st_mode):
        return st.st_rdev == 0
    return stat.S_ISREG(st.st_mode) and st.st_size == 0 and XWHITEOUT in xattrs


def _marker(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode, info.uid, info.gid, info.mtime, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
    return info


def _write_tar(upper: str, out: _HashingWriter) -> None:
    first_name: dict[tuple[int, int], str] = {}
    fileobj: Any = out  # tarfile needs only write() and tell()
    with tarfile.TarFile(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                         copybufsize=CHUNK) as tar:
        # the root first, as "./": overlayfs shows the upper root's owner, mode and xattrs on the merged root
        for relative in [".", *_sorted_paths(upper)]:
            path = os.path.join(upper, relative)
            st = os.lstat(path)
            xattrs = _xattrs(path)
            head, _, base = relative.rpartition("/")
            if base.startswith(WHITEOUT_PREFIX):
                raise LayerError(relative, "a name starting with .wh. cannot be stored in an OCI layer")
            if _is_whiteout(path, st, xattrs):
                tar.addfile(_marker(f"{head}/{WHITEOUT_PREFIX}{base}" if head else WHITEOUT_PREFIX + base))
                continue
            if REDIRECT in xattrs:
                raise LayerError(relative, "a redirected (renamed) overlay directory: flatten the layer first")
            info = _info(relative, st)
            info.pax_headers = {**info.pax_headers, **{
                XATTR_PREFIX + name: value.decode("utf-8", "surrogateescape")
                for name, value in xattrs.items() if not name.startswith(OVERLAY_XATTRS)}}
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                if xattrs.get(OPAQUE) == b"y":
                    tar.addfile(_marker(f"{relative}/{OPAQUE_MARKER}"))
            elif stat.S_ISREG(st.st_mode):
                inode = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and inode in first_name:
                    info.type, info.linkname = tarfile.LNKTYPE, first_name[inode]
                    tar.addfile(info)
                    continue
                if st.st_nlink > 1:
                    first_name[inode] = relative
                info.size = st.st_size
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            elif stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
                tar.addfile(info)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
                tar.addfile(info)
            elif stat.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            # sockets: tar has no type for them, and a socket left in a tree is no content


def write_layer(upper: Path, out: BinaryIO, *, compression: Compression = "zstd") -> LayerInfo:
    """Write the upper directory `upper` as a compressed layer tar to `out`; returns its digests."""
    blob = _HashingWriter(out)
    sink: Any = blob  # the compressors need only write()
    if compression == "zstd":
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
        with compressor.stream_writer(sink, closefd=False) as zwriter:
            raw = _HashingWriter(zwriter)
            _write_tar(os.fspath(upper), raw)
            raw.flush()
    else:
        with gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0, compresslevel=GZIP_LEVEL) as gwriter:
            raw = _HashingWriter(gwriter)
            _write_tar(os.fspath(upper), raw)
            raw.flush()
    blob.flush()
    out.flush()
    return LayerInfo(digest="sha256:" + blob.sha256.hexdigest(), size=blob.size,
                     diff_id="sha256:" + raw.sha256.hexdigest(), media_type=MEDIA_TYPES[compression])


def _decompressed(blob: BinaryIO) -> Any:
    magic = blob.read(4)
    blob.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=blob, mode="rb")
    if magic == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(blob, closefd=False)
    return blob  # an uncompressed tar (application/vnd.oci.image.layer.v1.tar)


class _Target:
    """Where entries land: checks that no entry escapes the root through `..` or a symlink."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.safe_dirs: set[str] = {""}

    def path(self, name: str) -> tuple[str, str]:
        """The relative normalised name and its absolute path, its parents checked to be directories."""
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise LayerError(name, "a path outside the tree")
        if not parts:
            return "", self.root
        relative = "/".join(parts)
        parent = "/".join(parts[:-1])
        if parent not in self.safe_dirs:
            walked = ""
            for part in parts[:-1]:
                walked = f"{walked}/{part}" if walked else part
                if walked in self.safe_dirs:
                    continue
                full = os.path.join(self.root, walked)
                try:
                    st = os.lstat(full)
                except FileNotFoundError:
                    os.mkdir(full, 0o755)
                else:
                    if not stat.S_ISDIR(st.st_mode):
                        raise LayerError(name, f"its parent {walked!r} is not a directory")
                self.safe_dirs.add(walked)
        return relative, os.path.join(self.root, relative)

    def forget(self, relative: str) -> None:
        """`relative` is removed or replaced: neither it nor anything below it is a checked directory any
        more (a later member may have put a symlink in its place)."""
        if relative not in self.safe_dirs:
            return  # every checked directory's parents are checked ones: nothing below it is either
        below = relative + "/"
        self.safe_dirs = {d for d in self.safe_dirs if d != relative and not d.startswith(below)} | {""}


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _check_xattrs(info: tarfile.TarInfo) -> None:
    """overlayfs's own xattrs never come from a layer (`write_layer` leaves them out; whiteouts and opaque
    directories have entries of their own): one that did could redirect a lookup anywhere."""
    for key in info.pax_headers:
        if key.startswith(XATTR_PREFIX + OVERLAY_XATTRS):
            raise LayerError(info.name, f"overlayfs's own xattr {key[len(XATTR_PREFIX):]!r}")


def _apply_meta(path: str, info: tarfile.TarInfo, *, is_link: bool) -> None:
    os.chown(path, info.uid, info.gid, follow_symlinks=False)
    if not is_link:
        os.chmod(path, info.mode)
    for key, value in info.pax_headers.items():
        if key.startswith(XATTR_PREFIX):
            os.setxattr(path, key[len(XATTR_PREFIX):], value.encode("utf-8", "surrogateescape"),
                        follow_symlinks=False)


def _mtime_ns(info: tarfile.TarInfo) -> int:
    text = info.pax_headers.get("mtime")
    if text is None:
        return int(info.mtime) * 1_000_000_000
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9])


def _copy_bounded(source: IO[bytes], out: IO[bytes], name: str, budget: list[int] | None) -> None:
    """Copy a member's data; with a `budget` (bytes left, in a list to share it), a layer that unpacks to
    more is refused: a few compressed megabytes can unpack to terabytes of zeros."""
    while chunk := source.read(CHUNK):
        if budget is not None:
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise LayerError(name, "the layer unpacks to more than the store may hold (--cache-max-size)")
        out.write(chunk)


def unpack_layer(blob: BinaryIO, dest: Path, *, into: Literal["upper", "tree"], max_bytes: int | None = None) -> None:
    """Unpack a layer blob (zstd, gzip or plain tar) into `dest`; with `max_bytes`, one whose files hold
    more is refused part way (a `LayerError`).

    `into="upper"`: `dest` becomes the overlay upper directory again (whiteouts as 0:0 character devices,
    opaque directories marked). `into="tree"`: the layer is applied onto the tree in `dest`, as image
    layers are: a whiteout deletes its name, an opaque marker empties its directory of what lower layers
    put there."""
    target = _Target(os.fspath(dest))
    budget = None if max_bytes is None else [max_bytes]
    this_layer: set[str] = set()
    dir_times: list[tuple[str, int]] = []
    with _decompressed(blob) as raw, tarfile.open(fileobj=raw, mode="r|", encoding="utf-8") as tar:
        for info in tar:
            relative, path = target.path(info.name)
            _check_xattrs(info)
            if not relative and not info.isdir():
                raise LayerError(info.name, "the tree's root as something other than a directory")
            head, _, base = relative.rpartition("/")
            if base == OPAQUE_MARKER:
                directory = os.path.join(target.root, head) if head else target.root
                if into == "upper":
                    os.setxattr(directory, OPAQUE, b"y")
                else:
                    for name in os.listdir(directory):
                        child = f"{head}/{name}" if head else name
                        if child not in this_layer:
                            _remove(os.path.join(directory, name))
                            target.forget(child)
                continue
            if base.startswith(WHITEOUT_PREFIX):
                name = base[len(WHITEOUT_PREFIX):]
                if name in ("", ".", ".."):
                    raise LayerError(info.name, "a whiteout of no name, of its own directory or of the one above")
                hidden = os.path.join(os.path.dirname(path), name)
                _remove(hidden)
                target.forget(f"{head}/{name}" if head else name)
                if into == "upper":
                    os.mknod(hidden, stat.S_IFCHR, os.makedev(0, 0))  # mode 0, as overlayfs makes them
                continue
            this_layer.add(relative)
            if info.isdir():
                try:
                    if not stat.S_ISDIR(os.lstat(path).st_mode):
                        _remove(path)
                        os.mkdir(path)
                except FileNotFoundError:
                    os.mkdir(path)
                target.safe_dirs.add(relative)
                _apply_meta(path, info, is_link=False)
                dir_times.append((path, _mtime_ns(info)))
                continue
            _remove(path)
            target.forget(relative)
            if info.isreg():
                fileobj = tar.extractfile(info)
                assert fileobj is not None  # a regular member always has a body
                with open(path, "xb") as out:
                    _copy_bounded(fileobj, out, info.name, budget)
            elif info.islnk():
                _, link_path = target.path(info.linkname)
                if not stat.S_ISREG(os.lstat(link_path).st_mode):
                    raise LayerError(info.name, f"a hard link to {info.linkname!r}, which is not a file")
                os.link(link_path, path)
                continue  # the link shares its inode's owner, mode, xattrs and mtime
            elif info.issym():
                os.symlink(info.linkname, path)
            elif info.ischr() or info.isblk():
                kind = stat.S_IFCHR if info.ischr() else stat.S_IFBLK
                os.mknod(path, info.mode | kind, os.makedev(info.devmajor, info.devminor))
            elif info.isfifo():
                os.mkfifo(path, info.mode)
            else:
                raise LayerError(info.name, f"an entry of tar type {info.type!r}")
            _apply_meta(path, info, is_link=info.issym())
            os.utime(path, ns=(_mtime_ns(info), _mtime_ns(info)), follow_symlinks=False)
    # directories last, deepest first: creating what is inside them changed their times
    for path, mtime in reversed(dir_times):
        os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
