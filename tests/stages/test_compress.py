"""org.osbuild.gzip, org.osbuild.xz and org.osbuild.zstd: the file of a files input, compressed into the tree."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import assert_invalid, assert_refused, build_ab, export, umask

# the file to compress: /zeros of pipeline "src", taken as a files input named "file"
SRC = pipeline("src", stage("org.osbuild.truncate", filename="/zeros", size="64K"))
CONTENT = bytes(64 << 10)
FILE_INPUT = {"type": "org.osbuild.files", "origin": "org.osbuild.pipeline",
              "references": {"name:src": {"file": "/zeros"}}}


def unzstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-d", "--stdout"], input=data, capture_output=True, check=True).stdout


@dataclass(frozen=True)
class Compressor:
    stage: str
    suffix: str
    decompress: Callable[[bytes], bytes]

    def compress(self, filename: str, **options: Any) -> dict[str, Any]:
        return {**stage(self.stage, filename=filename, **options), "inputs": {"file": FILE_INPUT}}


GZIP = Compressor("org.osbuild.gzip", ".gz", gzip.decompress)
COMPRESSORS = [GZIP, Compressor("org.osbuild.xz", ".xz", lzma.decompress),
               Compressor("org.osbuild.zstd", ".zst", unzstd)]


@pytest.fixture(params=COMPRESSORS, ids=lambda c: c.stage.rsplit(".", 1)[1])
def compressor(request: pytest.FixtureRequest) -> Compressor:
    return request.param  # type: ignore[no-any-return]


def test_compresses_the_input_file(aosbuild: Aosbuild, compressor: Compressor) -> None:
    name = f"zeros{compressor.suffix}"
    changes = build_ab(aosbuild, [], compressor.compress(f"/{name}"), others=(SRC,))
    assert list(changes.added) == [name]
    assert changes.added[name].mode == 0o644 & ~umask()
    assert (changes.removed, changes.changed) == ({}, {})
    data = (aosbuild.output / "b" / name).read_bytes()
    assert len(data) < len(CONTENT)
    assert compressor.decompress(data) == CONTENT


def test_replaces_a_file(aosbuild: Aosbuild, compressor: Compressor) -> None:
    base = [stage("org.osbuild.truncate", filename="/out", size="1M")]
    changes = build_ab(aosbuild, base, compressor.compress("out"), others=(SRC,))
    assert list(changes.changed) == ["out"]
    data = (aosbuild.output / "b" / "out").read_bytes()
    assert changes.changed["out"]["sha256"][1] == hashlib.sha256(data).hexdigest()
    assert compressor.decompress(data) == CONTENT


@pytest.mark.parametrize("filename", ["../escaped", "/a/../../escaped"])
def test_escape_is_refused(aosbuild: Aosbuild, compressor: Compressor, filename: str) -> None:
    result = export(aosbuild, manifest(SRC, pipeline("p", compressor.compress(filename))), "p")
    assert_refused(aosbuild, result, "escaped")


def test_without_the_input_fails(aosbuild: Aosbuild, compressor: Compressor) -> None:
    result = aosbuild(manifest(pipeline("p", stage(compressor.stage, filename="x"))))
    assert result.returncode == 1
    assert "this stage reads its input named 'file'" in result.stderr


def test_bad_options(aosbuild: Aosbuild, compressor: Compressor) -> None:
    result = aosbuild(manifest(SRC, pipeline("p", {**stage(compressor.stage), "inputs": {"file": FILE_INPUT}})))
    assert_invalid(result, ".pipelines[1].stages[0].options", "'filename' is a required property")


@pytest.mark.parametrize("level", [1, 9])
def test_gzip_level_and_no_name(aosbuild: Aosbuild, level: int) -> None:
    build_ab(aosbuild, [], GZIP.compress("out.gz", level=level), others=(SRC,))
    data = (aosbuild.output / "b" / "out.gz").read_bytes()
    assert data[4:8] == bytes(4)  # no time stamp
    assert data[3] & 0x08 == 0  # no file name
    assert data[8] == (2 if level == 9 else 4)  # XFL: slowest or fastest
    assert gzip.decompress(data) == CONTENT


def test_gzip_level_out_of_range(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(SRC, pipeline("p", GZIP.compress("out.gz", level=10))))
    assert_invalid(result, ".pipelines[1].stages[0].options.level", "10 is greater than the maximum of 9")
