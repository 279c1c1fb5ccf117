"""v1 manifests for the assembler tests: one tree pipeline of stages, one assembler, exported as `assembler`.

Engine gap: the builder looks a module up as a stage first, so for an assembler that shares its name
with a stage (org.osbuild.qemu, org.osbuild.tar, org.osbuild.noop) it runs the stage. Until the engine
runs `assemblers/<name>` for the assembler pipeline, `run` puts a library root in front whose
`stages/<name>` is the assembler (`test_*_is_the_assembler` tests, strictly xfail, track the fix).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import REPO, Aosbuild, Run


def v1_stage(name: str, **options: Any) -> dict[str, Any]:
    return {"name": name, "options": options}


def v1_manifest(stages: list[dict[str, Any]], assembler: str, **options: Any) -> dict[str, Any]:
    return {"pipeline": {"stages": stages, "assembler": {"name": assembler, "options": options}}}


def assembler_as_stage(workdir: Path, name: str) -> list[str]:
    """`--libdir` arguments under which the engine runs the assembler `name` where it would run the stage."""
    root = workdir / "assembler-lib"
    if not (root / "stages" / name).exists():
        (root / "stages").mkdir(parents=True, exist_ok=True)
        (root / "stages" / name).symlink_to(REPO / "assemblers" / name)
        schema = json.loads((REPO / "assemblers" / f"{name}.meta.json").read_text())["schema"]
        (root / "stages" / f"{name}.meta.json").write_text(json.dumps({"schema_2": {"options": schema}}))
    return ["--libdir", str(root)]


def run(aosbuild: Aosbuild, stages: list[dict[str, Any]], assembler: str, *, workaround: bool = True,
        **options: Any) -> Run:
    extra = assembler_as_stage(aosbuild.workdir, assembler) if workaround and (REPO / "stages" / assembler).exists() \
        else []
    return aosbuild(v1_manifest(stages, assembler, **options), *extra, "--export", "assembler", "--output-directory",
                    str(aosbuild.output))


def assemble(aosbuild: Aosbuild, stages: list[dict[str, Any]], assembler: str, **options: Any) -> Path:
    """Build the v1 manifest and export its assembler's output; returns the output directory."""
    result = run(aosbuild, stages, assembler, **options)
    assert result.returncode == 0, result.stdout + result.stderr
    return aosbuild.output / "assembler"


def assert_invalid_v1(result: Run, location: str, message: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert f".pipeline.assembler.options{location}:\n  {message}" in result.stdout, result.stdout
