"""Start-up cost: `--version` and `--inspect` import only what they need (README, bench/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = Path(__file__).parent.parent / "samples" / "hello.json"

# Run the real entry point in a fresh interpreter, then list the heavy modules it ended up importing.
PROBE = """
import json, sys
from aosbuild.entry import main
try:
    code = main()
except SystemExit as exc:  # argparse's --version
    code = exc.code
heavy = sorted({name.partition(".")[0] for name in sys.modules} & {HEAVY})
sys.stderr.write("HEAVY " + json.dumps(heavy) + "\\n")
sys.exit(code)
"""

BUILD_ONLY = ["asyncio", "httpx", "structlog", "trio"]


def imported(argv: list[str], heavy: list[str], env: dict[str, str] | None = None) -> tuple[list[str], str]:
    script = PROBE.replace("{HEAVY}", repr(set(heavy)))
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, check=False,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stderr.splitlines() if line.startswith("HEAVY "))
    names: list[str] = json.loads(line.removeprefix("HEAVY "))
    return names, done.stdout


def test_version_imports_no_engine_validation_or_logging() -> None:
    # ssl: the command line's module imports the downloader; a lone --version never imports that module
    names, out = imported(["--version"], [*BUILD_ONLY, "jsonschema", "ssl"])
    assert out.startswith("aosbuild ")
    assert names == []


def test_inspect_imports_no_engine_or_logging() -> None:
    names, out = imported(["--inspect", str(SAMPLE)], BUILD_ONLY)
    assert "pipelines" in json.loads(out)
    assert names == []


def test_inspect_of_a_manifest_validated_before_imports_no_jsonschema_or_ssl(tmp_path: Path) -> None:
    """The second `--inspect` finds the manifest and its modules' metadata in the cache of valid ones."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    names, _ = imported(["--inspect", str(SAMPLE)], ["jsonschema", "ssl"], env)
    assert names == ["jsonschema"]  # the first time: the cache is empty
    names, out = imported(["--inspect", str(SAMPLE)], ["jsonschema", "ssl"], env)
    assert "pipelines" in json.loads(out)
    assert names == []


@pytest.mark.parametrize("module", ["aosbuild.cli", "aosbuild.osbuild_compat"])
def test_command_line_modules_import_light(module: str) -> None:
    code = f"import sys, {module}; print(sorted({{n.partition('.')[0] for n in sys.modules}} & {set(BUILD_ONLY)!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == "[]"


def test_a_build_without_a_remote_cache_imports_no_registry_client(tmp_path: Path) -> None:
    """httpx and zstandard (about 40 ms) are the remote cache's: a build that uses no registry and
    downloads nothing does not import them (`remotesettings`, `engine.remote_cache`)."""
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"version": "2", "pipelines": []}))
    names, _ = imported(["--store", str(tmp_path / "store"), "--quiet", str(empty)], ["httpx", "zstandard"])
    assert names == []
