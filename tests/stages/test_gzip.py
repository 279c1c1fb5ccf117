"""org.osbuild.gzip: the file of a files input, compressed into the tree."""

from __future__ import annotations

import gzip
import hashlib
from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import assert_invalid, assert_refused, build_ab, export, umask

# the file to compress: /zeros of pipeline "src", taken as a files input named "file"
SRC = pipeline("src", stage("org.osbuild.truncate", filename="/zeros", size="64K"))
CONTENT = bytes(64 << 10)
FILE_INPUT = {"type": "org.osbuild.files", "origin": "org.osbuild.pipeline",
              "references": {"name:src": {"file": "/zeros"}}}


def compress(filename: str, **options: Any) -> dict[str, Any]:
    return {**stage("org.osbuild.gzip", filename=filename, **options), "inputs": {"file": FILE_INPUT}}


def decompress(data: bytes) -> bytes:
    return gzip.decompress(data)


def test_compresses_the_input_file(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, [], compress("/zeros.gz"), others=(SRC,))
    assert list(changes.added) == ["zeros.gz"]
    assert changes.added["zeros.gz"].mode == 0o644 & ~umask()
    assert (changes.removed, changes.changed) == ({}, {})
    data = (aosbuild.output / "b" / "zeros.gz").read_bytes()
    assert len(data) < len(CONTENT)
    assert decompress(data) == CONTENT


def test_replaces_a_file(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.truncate", filename="/out", size="1M")]
    changes = build_ab(aosbuild, base, compress("out"), others=(SRC,))
    assert list(changes.changed) == ["out"]
    data = (aosbuild.output / "b" / "out").read_bytes()
    assert changes.changed["out"]["sha256"][1] == hashlib.sha256(data).hexdigest()
    assert decompress(data) == CONTENT


@pytest.mark.parametrize("filename", ["../escaped", "/a/../../escaped"])
def test_escape_is_refused(aosbuild: Aosbuild, filename: str) -> None:
    result = export(aosbuild, manifest(SRC, pipeline("p", compress(filename))), "p")
    assert_refused(aosbuild, result, "escaped")


def test_without_the_input_fails(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.gzip", filename="x"))))
    assert result.returncode == 1
    assert "this stage reads its input named 'file'" in result.stderr


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(SRC, pipeline("p", {**stage("org.osbuild.gzip"), "inputs": {"file": FILE_INPUT}})))
    assert_invalid(result, ".pipelines[1].stages[0].options", "'filename' is a required property")


@pytest.mark.parametrize("level", [1, 9])
def test_level_and_no_name(aosbuild: Aosbuild, level: int) -> None:
    build_ab(aosbuild, [], compress("out.gz", level=level), others=(SRC,))
    data = (aosbuild.output / "b" / "out.gz").read_bytes()
    assert data[4:8] == bytes(4)  # no time stamp
    assert data[3] & 0x08 == 0  # no file name
    assert data[8] == (2 if level == 9 else 4)  # XFL: slowest or fastest
    assert gzip.decompress(data) == CONTENT


def test_level_out_of_range(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(SRC, pipeline("p", compress("out.gz", level=10))))
    assert_invalid(result, ".pipelines[1].stages[0].options.level", "10 is greater than the maximum of 9")
