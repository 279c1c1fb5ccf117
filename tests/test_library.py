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


@pytest.mark.parametrize("name", [
    "org.osbuild.debian12", "org.osbuild.debian13", "org.osbuild.debian", "org.osbuild.linux",
    "org.osbuild.fedora38", "org.osbuild.centos9", "org.osbuild.arch",  # osbuild's: run on org.osbuild.linux
])
def test_a_runner_a_library_or_osbuild_has_is_taken(name: str) -> None:
    assert Library().runner_problem(name) is None


def test_an_unknown_runner_is_refused_with_what_to_do() -> None:
    why = Library().runner_problem("org.osbuild.debain12")
    assert why is not None
    assert why.startswith("unknown runner 'org.osbuild.debain12' (did you mean 'org.osbuild.debian12'?)")
    assert "(they have debian, linux)" in why
    assert "give --libdir a library with runners/org.osbuild.debain12" in why
    assert Library().runner_problem("org.osbuild.nosuchthing42") is not None


def test_a_libdirs_runner_is_taken_at_or_above_its_version(tmp_path: Path) -> None:
    (tmp_path / "runners").mkdir()
    (tmp_path / "runners" / "org.osbuild.mydistro3").write_text("#!/usr/bin/python3\n")
    library = Library([tmp_path])
    assert library.runner_problem("org.osbuild.mydistro3") is None
    assert library.runner_problem("org.osbuild.mydistro5") is None
    assert "at or below version 2" in (library.runner_problem("org.osbuild.mydistro2") or "")
    assert Library().runner_problem("org.osbuild.mydistro3") is not None
