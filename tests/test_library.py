"""The module library: runner choice as osbuild makes it, and stacked library roots."""

from __future__ import annotations

from pathlib import Path

import pytest

from aosbuild.errors import SandboxError
from aosbuild.library import Library, choose_runner

from .conftest import TEST_LIBDIR

RUNNERS = ["org.osbuild.debian", "org.osbuild.debian12", "org.osbuild.fedora38", "org.osbuild.linux"]


@pytest.mark.parametrize(("distro", "version", "expected"), [
    ("debian", "12", "org.osbuild.debian12"),
    ("debian", "13", "org.osbuild.debian12"),   # the closest version not above
    ("debian", "11", "org.osbuild.debian"),     # none at or below: the bare distro name
    ("fedora", "40", "org.osbuild.fedora38"),
    ("arch", "", "org.osbuild.linux"),          # an unknown distro: the generic runner
])
def test_choose_runner(distro: str, version: str, expected: str) -> None:
    assert choose_runner(RUNNERS, distro, version) == expected


def test_no_runner_at_all() -> None:
    with pytest.raises(SandboxError, match="No suitable runner"):
        choose_runner(["org.osbuild.fedora38"], "debian", "12")


def test_host_runner_reads_os_release(tmp_path: Path) -> None:
    os_release = tmp_path / "os-release"
    os_release.write_text('ID=debian\nVERSION_ID="12"\n')
    assert Library().host_runner(os_release) == "org.osbuild.debian12"


def test_test_library_comes_first() -> None:
    library = Library([TEST_LIBDIR])
    info = library.find("Stage", "org.aosbuild.test.sleep")
    assert info is not None
    assert info.path == TEST_LIBDIR / "stages" / "org.aosbuild.test.sleep"
    assert library.find("Stage", "org.osbuild.noop") is not None  # the bundled library is still there
    assert library.find("Stage", "org.osbuild.nope") is None
