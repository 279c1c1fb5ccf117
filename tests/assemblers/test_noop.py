"""The org.osbuild.noop assembler: no output, its options printed."""

from __future__ import annotations

from tests.conftest import Aosbuild

from .v1 import assemble, assert_invalid_v1, run, v1_stage


def test_makes_nothing(aosbuild: Aosbuild) -> None:
    output = assemble(aosbuild, [v1_stage("org.osbuild.hostname", hostname="example")], "org.osbuild.noop")
    assert list(output.iterdir()) == []


def test_says_so(aosbuild: Aosbuild) -> None:
    result = run(aosbuild, [], "org.osbuild.noop")
    assert result.returncode == 0, result.stderr
    assert "Not doing anything with these options: {}" in result.stdout


def test_takes_no_options(aosbuild: Aosbuild) -> None:
    result = run(aosbuild, [], "org.osbuild.noop", zero=0)
    assert_invalid_v1(result, "", "Additional properties are not allowed ('zero' was unexpected)")


def test_the_engine_runs_the_assembler(aosbuild: Aosbuild) -> None:
    result = run(aosbuild, [], "org.osbuild.noop")
    assert "Not doing anything with these options" in result.stdout
