"""The layer format: overlay upper directories to OCI layer tars and back, exactly and deterministically."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from aosbuild import ocilayer

from .layertrees import make_upper, tree
from .treedigest import digest


def write(upper: Path, blob: Path, compression: ocilayer.Compression = "zstd") -> ocilayer.LayerInfo:
    with open(blob, "wb") as out:
        return ocilayer.write_layer(upper, out, compression=compression)


def members(blob: Path) -> list[tarfile.TarInfo]:
    with open(blob, "rb") as f, ocilayer._decompressed(f) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        return list(tar)


def stacked(workdir: Path, lower: Path, upper: Path) -> Path:
    """`lower` and `upper` written as layers and unpacked one over the other into `workdir/merged`."""
    write(lower, workdir / "l1")
    write(upper, workdir / "l2")
    merged = workdir / "merged"
    merged.mkdir()
    for blob in ("l1", "l2"):
        with open(workdir / blob, "rb") as f:
            ocilayer.unpack_layer(f, merged, into="tree")
    return merged


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_an_upper_directory_comes_back_exactly(workdir: Path, compression: ocilayer.Compression) -> None:
    upper = make_upper(workdir / "upper")
    info = write(upper, workdir / "layer", compression)
    data = (workdir / "layer").read_bytes()
    assert info.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert info.size == len(data)
    assert info.media_type == ocilayer.MEDIA_TYPES[compression]
    back = workdir / "back"
    back.mkdir()
    with open(workdir / "layer", "rb") as f:
        ocilayer.unpack_layer(f, back, into="upper")
    assert tree(back) == tree(upper)
    assert digest(os.fspath(back))["."] == digest(os.fspath(upper))["."]  # the root's owner, mode, xattrs
    assert os.getxattr(back / "var/cache", "trusted.overlay.opaque") == b"y"
    assert os.stat(back / "usr/bin/ping").st_ino == os.stat(back / "usr/bin/ping6").st_ino
    assert os.stat(back / "etc/hostname").st_mtime_ns == 1_700_000_000_123_456_789


def test_the_tar_says_it_the_oci_way(workdir: Path) -> None:
    upper = make_upper(workdir / "upper")
    write(upper, workdir / "layer")
    entries = {m.name: m for m in members(workdir / "layer")}
    names = list(entries)
    # depth first in byte order of the tree's names, each directory before what it holds
    assert names.index("etc") < names.index("etc/hostname") < names.index("etc/ping-link") < names.index("null")
    assert all(names.index(n.rpartition("/")[0]) < names.index(n) for n in names if "/" in n)
    assert entries["etc/.wh.deleted"].isreg()
    assert entries["etc/.wh.deleted"].size == 0
    assert "etc/deleted" not in entries
    assert names.index("var/cache/.wh..wh..opq") == names.index("var/cache") + 1
    assert entries["usr/bin/ping"].pax_headers["SCHILY.xattr.security.capability"].encode(
        "utf-8", "surrogateescape") == bytes.fromhex("0100000200040000000000000000000000000000")
    assert not any(key.startswith("SCHILY.xattr.trusted.overlay") for key in entries["var/cache"].pax_headers)
    # the first name of the inode in sorted order holds the data, the others link to it
    assert entries["etc/a-link-sorted-first"].isreg()
    assert entries["usr/bin/ping"].islnk()
    assert entries["usr/bin/ping"].linkname == "etc/a-link-sorted-first"
    assert entries["null"].ischr()
    assert (entries["null"].devmajor, entries["null"].devminor) == (1, 3)
    assert entries["loop0"].isblk()
    assert entries["initctl"].isfifo()
    assert all(m.uname == "" and m.gname == "" for m in entries.values())
    assert entries["etc/hostname"].uid == 1000
    assert entries["etc/hostname"].gid == 1001


def test_the_same_layer_has_the_same_digest_when_made_again(workdir: Path) -> None:
    """Two copies of one tree, made separately (other inode numbers, other creation order): one digest."""
    first = make_upper(workdir / "one")
    second = workdir / "two"
    with open(workdir / "l1", "wb") as out:
        ocilayer.write_layer(first, out)
    with open(workdir / "l1", "rb") as f:
        second.mkdir()
        ocilayer.unpack_layer(f, second, into="upper")
    for compression in ("zstd", "gzip"):
        a = write(first, workdir / f"a.{compression}", compression)
        b = write(second, workdir / f"b.{compression}", compression)
        assert a == b
    assert write(first, workdir / "a2").diff_id == write(first, workdir / "a3", "gzip").diff_id


def test_gnu_tar_reads_the_layer(workdir: Path) -> None:
    """Interoperability: GNU tar unpacks the same content, xattrs and nanosecond times included."""
    upper = workdir / "upper"
    make_upper(upper)
    (upper / "etc/deleted").unlink()  # GNU tar knows nothing of whiteouts or opaque markers
    os.removexattr(upper / "var/cache", "trusted.overlay.opaque")
    write(upper, workdir / "layer")
    out = workdir / "gnu"
    out.mkdir()
    subprocess.run(["tar", "--zstd", "-x", "-p", "--xattrs", "--xattrs-include=*", "--numeric-owner",
                    "-f", workdir / "layer", "-C", out], check=True, capture_output=True)
    assert tree(out) == tree(upper)


def test_applying_layers_deletes_and_hides_what_lower_layers_had(workdir: Path) -> None:
    lower = workdir / "lower"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc/deleted").write_text("gone in the upper layer\n")
    (lower / "etc/kept").write_text("kept\n")
    (lower / "var/cache/old").mkdir(parents=True)
    (lower / "var/cache/old/file").write_text("hidden by the opaque directory\n")
    upper = make_upper(workdir / "upper")
    merged = stacked(workdir, lower, upper)
    assert not (merged / "etc/deleted").exists()
    assert (merged / "etc/kept").read_text() == "kept\n"
    assert sorted(os.listdir(merged / "var/cache")) == ["kept"]
    assert "trusted.overlay.opaque" not in os.listxattr(merged / "var/cache")


def tar_with(*entries: tuple[tarfile.TarInfo, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def test_a_layer_cannot_write_outside_its_tree(workdir: Path) -> None:
    dest = workdir / "dest"
    dest.mkdir()
    outside = workdir / "outside"
    outside.mkdir()
    escape = tarfile.TarInfo("../outside/evil")
    with pytest.raises(ocilayer.LayerError, match="outside the tree"):
        ocilayer.unpack_layer(tar_with((escape, b"x")), dest, into="tree")
    link = tarfile.TarInfo("link")
    link.type, link.linkname = tarfile.SYMTYPE, os.fspath(outside)
    through = tarfile.TarInfo("link/evil")
    with pytest.raises(ocilayer.LayerError, match="not a directory"):
        ocilayer.unpack_layer(tar_with((link, b""), (through, b"x")), dest, into="tree")
    assert os.listdir(outside) == []


def test_a_renamed_overlay_directory_is_refused_not_mangled(workdir: Path) -> None:
    upper = workdir / "upper"
    (upper / "moved").mkdir(parents=True)
    os.setxattr(upper / "moved", "trusted.overlay.redirect", b"/original")
    with pytest.raises(ocilayer.LayerError, match="flatten"), open(workdir / "layer", "wb") as out:
        ocilayer.write_layer(upper, out)
    (upper / "moved").rmdir()
    (upper / ".wh.trap").write_text("")
    with pytest.raises(ocilayer.LayerError, match=r"\.wh\."), open(workdir / "layer", "wb") as out:
        ocilayer.write_layer(upper, out)


def test_unpacking_replaces_what_a_lower_layer_had_under_a_name(workdir: Path) -> None:
    lower = workdir / "lower"
    (lower / "a").mkdir(parents=True)
    (lower / "a/inner").write_text("x")
    (lower / "b").write_text("file")
    upper = workdir / "upper"
    upper.mkdir()
    (upper / "a").write_text("now a file")
    (upper / "b").mkdir()
    merged = stacked(workdir, lower, upper)
    assert (merged / "a").read_text() == "now a file"
    assert stat.S_ISDIR(os.lstat(merged / "b").st_mode)
    shutil.rmtree(merged)


# -- a hostile registry's layers: whatever a tar says, nothing outside its tree changes ----------------------

def directory(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def hardlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info


def victim(workdir: Path) -> Path:
    """A directory outside the tree, with a file an attack would overwrite, link or delete."""
    outside = workdir / "outside"
    (outside / "etc").mkdir(parents=True)
    (outside / "etc/passwd").write_text("root:x:0:0\n")
    return outside


def untouched(outside: Path) -> bool:
    return os.listdir(outside / "etc") == ["passwd"] and (outside / "etc/passwd").read_text() == "root:x:0:0\n"


@pytest.mark.parametrize("into", ["upper", "tree"])
@pytest.mark.parametrize("attack", ["write", "hard link", "whiteout", "opaque"])
def test_a_symlink_put_where_a_directory_was_is_not_followed_later(workdir: Path, into: str, attack: str) -> None:
    """`a` and `a/etc` are directories, then `a` becomes a symlink out of the tree: a later entry below
    `a/etc` must see the symlink, not the directory checked before (main wrote through it)."""
    outside = victim(workdir)
    dest = workdir / "dest"
    dest.mkdir()
    last = {"write": (tarfile.TarInfo("a/etc/passwd"), b"pwned\n"),
            "hard link": (hardlink("stolen", "a/etc/passwd"), b""),
            "whiteout": (tarfile.TarInfo("a/etc/.wh.passwd"), b""),
            "opaque": (tarfile.TarInfo("a/etc/.wh..wh..opq"), b"")}[attack]
    layer = tar_with((directory("a"), b""), (directory("a/etc"), b""), (symlink("a", os.fspath(outside)), b""),
                     last)
    with pytest.raises(ocilayer.LayerError, match="is not a directory"):
        ocilayer.unpack_layer(layer, dest, into=into)  # type: ignore[arg-type]
    assert untouched(outside)
    assert not (dest / "stolen").exists()


@pytest.mark.parametrize("into", ["upper", "tree"])
@pytest.mark.parametrize("name", [".wh...", "d/.wh...", "d/.wh..", ".wh."])
def test_a_whiteout_of_dot_dot_deletes_nothing(workdir: Path, into: str, name: str) -> None:
    """`.wh...` would whiteout `..`: on main that removed everything in the directory above the tree."""
    entry = workdir / "entry"
    (entry / "tree/d").mkdir(parents=True)
    (entry / "tree/d/kept").write_text("x")
    (entry / "sibling").write_text("beside the tree")
    with pytest.raises(ocilayer.LayerError, match="a whiteout of no name"):
        ocilayer.unpack_layer(tar_with((tarfile.TarInfo(name), b"")), entry / "tree", into=into)  # type: ignore[arg-type]
    assert (entry / "sibling").read_text() == "beside the tree"
    assert (entry / "tree/d/kept").read_text() == "x"


@pytest.mark.parametrize("xattr", ["trusted.overlay.redirect", "trusted.overlay.opaque", "trusted.overlay.metacopy",
                                   "trusted.overlay.origin"])
def test_overlayfs_xattrs_from_a_layer_are_refused(workdir: Path, xattr: str) -> None:
    """`write_layer` never writes overlayfs's own xattrs: a layer that has one was made to steer lookups
    (a redirect `/../../..` leads `layers.find`, and so file inputs, out of the store)."""
    info = directory("d")
    info.pax_headers = {f"SCHILY.xattr.{xattr}": "/../../../../etc"}
    dest = workdir / "dest"
    dest.mkdir()
    with pytest.raises(ocilayer.LayerError, match="overlayfs's own xattr"):
        ocilayer.unpack_layer(tar_with((info, b"")), dest, into="upper")
    assert not (dest / "d").exists() or xattr not in os.listxattr(dest / "d")


def test_a_layer_that_replaces_its_own_files_unpacks_the_last(workdir: Path) -> None:
    """A file replacing a file forgets no checked directory (and costs no rescan of them): the last wins."""
    entries = [(directory(f"d{n}"), b"") for n in range(300)]
    entries += [(tarfile.TarInfo(f"d{n}/f{m}"), b"x") for n in range(300) for m in range(20)]
    entries += [(tarfile.TarInfo(f"d{n}/f0"), b"y") for n in range(300)]
    dest = workdir / "dest"
    dest.mkdir()
    ocilayer.unpack_layer(tar_with(*entries), dest, into="tree")
    assert (dest / "d299/f0").read_text() == "y"
    assert len(os.listdir(dest / "d7")) == 20
