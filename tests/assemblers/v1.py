"""v1 manifests for the assembler tests: one tree pipeline of stages, one assembler, exported as `assembler`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import Aosbuild, Run


def v1_stage(name: str, **options: Any) -> dict[str, Any]:
    return {"name": name, "options": options}


def v1_manifest(stages: list[dict[str, Any]], assembler: str, **options: Any) -> dict[str, Any]:
    return {"pipeline": {"stages": stages, "assembler": {"name": assembler, "options": options}}}


def run(aosbuild: Aosbuild, stages: list[dict[str, Any]], assembler: str, **options: Any) -> Run:
    return aosbuild(v1_manifest(stages, assembler, **options), "--export", "assembler", "--output-directory",
                    str(aosbuild.output))


def assemble(aosbuild: Aosbuild, stages: list[dict[str, Any]], assembler: str, **options: Any) -> Path:
    """Build the v1 manifest and export its assembler's output; returns the output directory."""
    result = run(aosbuild, stages, assembler, **options)
    assert result.returncode == 0, result.stdout + result.stderr
    return aosbuild.output / "assembler"


def assert_invalid_v1(result: Run, location: str, message: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert f".pipeline.assembler.options{location}:\n  {message}" in result.stdout, result.stdout
