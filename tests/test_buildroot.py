"""A build root must be a usable tree: one without /usr or its runner's python3 is refused by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aosbuild.buildroot import interpreter, lacks

from .conftest import REPO, Aosbuild, manifest, pipeline, stage

WHAT_TO_DO = ("What to do: install one in pipeline 'build' (org.aosbuild.debian.install, as the build pipeline "
              "of `aosbuild sample debian` does), or remove the `build` of pipeline 'os' to run its stages on "
              "the host")


@pytest.mark.parametrize(("paths", "missing"), [
    ([{"path": "/etc"}], "has no /usr, which the sandbox binds as its /usr."),
    ([{"path": "/usr/bin", "parents": True}],
     "has no /usr/bin/python3, which the runner org.osbuild.debian12 runs on (its #! line)."),
], ids=["no-usr", "no-python3"])
def test_a_build_root_that_is_not_a_system_is_refused_naming_it(aosbuild: Aosbuild, paths: list[object],
                                                                  missing: str) -> None:
    m = manifest(pipeline("build", stage("org.osbuild.mkdir", paths=paths), runner="org.osbuild.debian12"),
                 pipeline("os", stage("org.osbuild.mkdir", paths=[{"path": "/etc"}]), build="name:build"))
    run = aosbuild(m, "--export", "os", "--output-directory", str(aosbuild.output))
    assert run.returncode == 1, run.stderr
    assert "Error: pipeline 'os' cannot run in its build root, pipeline 'build' (" in run.stderr
    assert missing in run.stderr
    assert WHAT_TO_DO in run.stderr
    # refused before its stage ran: no bwrap message, no stage header, no empty output section
    assert "bwrap" not in run.stdout + run.stderr
    assert "Last output" not in run.stderr
    assert "Pipeline build: " in run.stdout
    assert "Pipeline os: " not in run.stdout
    assert run.stdout.count("org.osbuild.mkdir: ") == 1
    assert "Traceback" not in run.stderr
    assert not (aosbuild.output / "os").exists()


def test_a_stage_that_printed_nothing_says_so(aosbuild: Aosbuild) -> None:
    """Not an empty "Last output of the stage:" section: a line saying there is none."""
    run = aosbuild(manifest(pipeline("os", stage("org.aosbuild.test.fail", lines=0, exit=3))))
    assert run.returncode == 1, run.stderr
    assert "exited with status 3" in run.stderr
    assert "Last output of the stage:" not in run.stderr
    assert "The stage printed nothing before it failed" in run.stderr
    lines = aosbuild(manifest(pipeline("os", stage("org.aosbuild.test.fail", lines=1))))
    assert "Last output of the stage:\n  line 0 of the failing stage\n" in lines.stderr


def test_what_a_runner_runs_on() -> None:
    assert interpreter(REPO / "runners" / "org.osbuild.linux") == "/usr/bin/python3"
    assert interpreter(REPO / "runners" / "org.osbuild.debian") == "/usr/bin/python3"  # a symlink to one
    assert interpreter(REPO / "README.md") is None


def test_lacks_follows_the_trees_links_and_gives_up_on_absolute_ones(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "usr" / "lib" / "bin").mkdir(parents=True)
    (lower / "usr" / "lib" / "bin" / "python3").write_text("")
    upper.mkdir()
    layers = (upper, lower)  # top first
    assert lacks(layers, "usr/bin/python3")
    os.symlink("lib/bin", lower / "usr" / "bin")
    assert not lacks(layers, "usr/bin/python3")
    assert lacks(layers, "usr/bin/python2")
    (upper / "opt").mkdir()
    os.symlink("/usr/bin", upper / "opt" / "bin")  # leaves the tree: the sandbox may still have it
    assert not lacks(layers, "opt/bin/anything")
    assert not lacks(layers, "usr")
    assert lacks((upper,), "usr")
