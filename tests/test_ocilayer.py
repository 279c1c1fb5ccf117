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
