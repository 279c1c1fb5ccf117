"""org.osbuild.tar: pack the `tree` input into an archive in the tree; read back with Python's tarfile."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import assert_invalid, assert_refused, build_ab, export, umask

TREE_INPUT = {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": ["name:src"]}
# the input tree: /etc (0755), /etc/hostname ("example\n", 0600), /var (0700), /var/disk (1 MiB hole)
SRC = pipeline("src",
               stage("org.osbuild.hostname", hostname="example"),
               stage("org.osbuild.chmod", items={"/etc/hostname": {"mode": "0600"}}),
               stage("org.osbuild.mkdir", paths=[{"path": "/var", "mode": 0o700}]),
               stage("org.osbuild.truncate", filename="/var/disk", size="1M"))
EMPTY = pipeline("src")


def tar(**options: Any) -> dict[str, Any]:
    return {**stage("org.osbuild.tar", **options), "inputs": {"tree": TREE_INPUT}}


def build(aosbuild: Aosbuild, filename: str, src: dict[str, Any] = SRC, /, **options: Any) -> Path:
    """Build the archive with the a/b check that it is the one thing the stage adds; returns its path."""
    changes = build_ab(aosbuild, [], tar(filename=filename, **options), others=(src,))
    name = filename.lstrip("/")
    assert list(changes.added) == [name]
    assert (changes.removed, changes.changed) == ({}, {})
    return aosbuild.output / "b" / name


def members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tf:
        return {m.name: m for m in tf.getmembers()}


def test_packs_the_input_tree(aosbuild: Aosbuild) -> None:
    archive = build(aosbuild, "/image.tar")
    found = members(archive)
    mask = umask()
    assert {(m.uid, m.gid) for m in found.values()} == {(os.getuid(), os.getgid())}
    assert {name: (m.type, m.mode) for name, m in found.items()} == {
        ".": (tarfile.DIRTYPE, 0o777 & ~mask), "./etc": (tarfile.DIRTYPE, 0o755 & ~mask),
        "./etc/hostname": (tarfile.REGTYPE, 0o600), "./var": (tarfile.DIRTYPE, 0o700),
        "./var/disk": (tarfile.REGTYPE, 0o666 & ~mask)}
    with tarfile.open(archive) as tf:
        hostname = tf.extractfile("./etc/hostname")
        assert hostname is not None
        assert hostname.read() == b"example\n"


def test_root_node_omit(aosbuild: Aosbuild) -> None:
    assert set(members(build(aosbuild, "image.tar", **{"root-node": "omit"}))) == {
        "etc", "etc/hostname", "var", "var/disk"}


def test_paths_are_the_only_members_in_order(aosbuild: Aosbuild) -> None:
    archive = build(aosbuild, "image.tar", paths=["var/disk", "/etc/hostname"])
    with tarfile.open(archive) as tf:
        assert tf.getnames() == ["var/disk", "etc/hostname"]
        hostname = tf.extractfile("etc/hostname")  # the input tree's, not the build root's
        assert hostname is not None
        assert hostname.read() == b"example\n"


def test_empty_tree(aosbuild: Aosbuild) -> None:
    assert list(members(build(aosbuild, "include.tar", EMPTY))) == ["."]


def test_empty_tree_with_root_node_omit_is_an_empty_archive(aosbuild: Aosbuild) -> None:
    assert members(build(aosbuild, "omit.tar", EMPTY, **{"root-node": "omit"})) == {}


@pytest.mark.parametrize(("filename", "magic"), [("image.tar.gz", b"\x1f\x8b"), ("image.tar.xz", b"\xfd7zXZ\0"),
                                                 ("image.tgz", b"\x1f\x8b")])
def test_compression_from_the_suffix(aosbuild: Aosbuild, filename: str, magic: bytes) -> None:
    archive = build(aosbuild, filename)
    assert archive.read_bytes().startswith(magic)
    assert "./etc/hostname" in members(archive)  # tarfile sees through the compression


NO_METADATA = {"acls": False, "selinux": False, "xattrs": False}


@pytest.mark.parametrize(("format_", "magic", "pax"), [
    ("gnu", b"ustar  \0", False), ("oldgnu", b"ustar  \0", False), ("ustar", b"ustar\x0000", False),
    ("posix", b"ustar\x0000", True)])
def test_format(aosbuild: Aosbuild, format_: str, magic: bytes, pax: bool) -> None:
    archive = build(aosbuild, "image.tar", format=format_, paths=["etc/hostname"], **NO_METADATA)
    assert archive.read_bytes()[257:265] == magic
    with tarfile.open(archive) as tf:
        info = tf.getmember("etc/hostname")
        assert info.mode == 0o600
        assert bool(info.pax_headers) == pax


def test_storing_metadata_makes_a_posix_archive(aosbuild: Aosbuild) -> None:
    # GNU tar keeps ACLs, SELinux contexts and xattrs only in pax headers, whatever --format says
    archive = build(aosbuild, "image.tar", format="gnu", paths=["etc/hostname"])
    with tarfile.open(archive) as tf:
        assert "mtime" in tf.getmember("etc/hostname").pax_headers


def test_sparse(aosbuild: Aosbuild) -> None:
    result = export(aosbuild, manifest(SRC, pipeline(
        "p", tar(filename="dense.tar", paths=["var/disk"]),
        tar(filename="sparse.tar", paths=["var/disk"], sparse=True))), "p")
    assert result.returncode == 0, result.stderr
    dense, sparse = aosbuild.output / "p" / "dense.tar", aosbuild.output / "p" / "sparse.tar"
    assert dense.stat().st_size > 1 << 20 > 100 * sparse.stat().st_size
    with tarfile.open(sparse) as tf:
        disk = tf.extractfile("var/disk")
        assert disk is not None
        assert disk.read() == bytes(1 << 20)


def test_transform(aosbuild: Aosbuild) -> None:
    archive = build(aosbuild, "image.tar", transform="s,^\\./etc,./config,", **{"root-node": "include"})
    assert set(members(archive)) == {".", "./config", "./config/hostname", "./var", "./var/disk"}


def test_bad_options(aosbuild: Aosbuild) -> None:
    both = aosbuild(manifest(SRC, pipeline("p", tar(filename="x.tar", paths=["etc"], **{"root-node": "omit"}))))
    assert_invalid(both, ".pipelines[1].stages[0].options", "{'filename': 'x.tar', ")
    no_input = aosbuild(manifest(pipeline("p", {**stage("org.osbuild.tar", filename="x.tar"), "inputs": {}})))
    assert_invalid(no_input, ".pipelines[0].stages[0].inputs", "'tree' is a required property")
    zip_ = aosbuild(manifest(SRC, pipeline("p", tar(filename="x.zip", format="zip"))))
    assert_invalid(zip_, ".pipelines[1].stages[0].options.format", "'zip' is not one of")


def test_without_a_tree_input_says_what_to_add(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.tar", filename="x.tar"))))
    assert result.returncode == 1
    assert "add an org.osbuild.tree input 'tree'" in result.stderr


@pytest.mark.parametrize("options", [
    {"filename": "../../escaped.tar"},
    {"filename": "/a/../../escaped.tar"},
    {"filename": "escaped.tar", "paths": ["../../../etc"]},
    {"filename": "escaped.tar", "paths": ["etc/../../../../etc/passwd"]},
])
def test_escape_is_refused(aosbuild: Aosbuild, options: dict[str, Any]) -> None:
    result = export(aosbuild, manifest(SRC, pipeline("p", tar(**options))), "p")
    assert_refused(aosbuild, result, "escaped.tar")


@pytest.mark.parametrize(("compression", "magic"), [("xz", b"\xfd7zXZ"), ("gzip", b"\x1f\x8b"),
                                                    ("zstd", b"\x28\xb5\x2f\xfd")])
def test_compression_whatever_the_name(aosbuild: Aosbuild, compression: str, magic: bytes) -> None:
    """osbuild's `compression` names the compressor; `auto` (the default) goes by the file name."""
    archive = build(aosbuild, "/image.tar", compression=compression)
    assert archive.read_bytes()[:len(magic)] == magic


def test_numeric_owner(aosbuild: Aosbuild) -> None:
    found = members(build(aosbuild, "/image.tar", **{"numeric-owner": True}))
    assert {(m.uname, m.gname) for m in found.values()} == {("", "")}
