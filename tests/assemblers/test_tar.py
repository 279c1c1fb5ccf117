"""The org.osbuild.tar assembler: the tree as a tar archive, optionally compressed."""

from __future__ import annotations

import tarfile

import pytest

from tests.conftest import Aosbuild

from .v1 import assemble, assert_invalid_v1, run, v1_stage

STAGES = [v1_stage("org.osbuild.hostname", hostname="example"),
          v1_stage("org.osbuild.chmod", items={"/etc/hostname": {"mode": "0600"}})]


@pytest.mark.parametrize(("compression", "magic"), [(None, None), ("xz", b"\xfd7zXZ\0"), ("gzip", b"\x1f\x8b")])
def test_packs_the_tree(aosbuild: Aosbuild, compression: str | None, magic: bytes | None) -> None:
    options = {"compression": compression} if compression else {}
    output = assemble(aosbuild, STAGES, "org.osbuild.tar", filename="tree.tar", **options)
    archive = output / "tree.tar"  # no extension added, as in osbuild
    assert [p.name for p in output.iterdir()] == ["tree.tar"]
    if magic:
        assert archive.read_bytes().startswith(magic)
    with tarfile.open(archive) as tf:
        assert set(tf.getnames()) == {".", "./etc", "./etc/hostname"}
        info = tf.getmember("./etc/hostname")
        assert (info.mode, info.uid) == (0o600, 0)
        hostname = tf.extractfile(info)
        assert hostname is not None
        assert hostname.read() == b"example\n"
        assert "mtime" in info.pax_headers  # acls, selinux and xattrs make it a pax archive


def test_without_metadata(aosbuild: Aosbuild) -> None:
    output = assemble(aosbuild, STAGES, "org.osbuild.tar", filename="tree.tar", acls=False, selinux=False,
                      xattrs=False)
    with tarfile.open(output / "tree.tar") as tf:
        assert tf.getmember("./etc/hostname").pax_headers == {}


def test_bad_options(aosbuild: Aosbuild) -> None:
    assert_invalid_v1(run(aosbuild, [], "org.osbuild.tar"), "", "'filename' is a required property")
    assert_invalid_v1(run(aosbuild, [], "org.osbuild.tar", filename="t.tar", compression="zip"), ".compression",
                      "'zip' is not one of")


def test_the_engine_runs_the_assembler(aosbuild: Aosbuild) -> None:
    result = run(aosbuild, STAGES, "org.osbuild.tar", filename="tree.tar", compression="xz")
    assert result.returncode == 0, result.stderr
    assert (aosbuild.output / "assembler" / "tree.tar").read_bytes().startswith(b"\xfd7zXZ\0")
