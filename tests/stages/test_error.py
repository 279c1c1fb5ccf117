"""org.osbuild.error: the stage fails with the exit status it is given, and the build with it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import assert_invalid


@pytest.mark.parametrize(("options", "status"), [({}, 255), ({"returncode": 3}, 3)])
def test_fails_with_the_status(aosbuild: Aosbuild, options: dict[str, Any], status: int) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.error", **options))), "--json")
    assert result.returncode == 1
    assert f"Error stage will now return error: {status}" in result.stdout
    assert '"success": false' in result.stdout


def test_returncode_zero_succeeds(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.error", returncode=0))))
    assert result.returncode == 0, result.stderr


def test_later_stages_do_not_run(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.error"), stage("org.osbuild.noop", marker="ran"))))
    assert result.returncode == 1
    assert "marker" not in result.stdout


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.error", exit_code=3))))
    assert_invalid(result, ".pipelines[0].stages[0].options", "Additional properties are not allowed")
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.error", returncode="3"))))
    assert_invalid(result, ".pipelines[0].stages[0].options.returncode", "'3' is not of type 'number'")
