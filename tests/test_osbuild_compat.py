"""The drop-in `osbuild` command: the CLI cases of test_build/test_loading with osbuild's spellings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aosbuild.osbuild_compat import INSTALLED_LIBDIR, invocation, parser

from .conftest import GOLDEN, TEST_LIBDIR, Aosbuild, OsbuildOracle, check_jsonseq, manifest, pipeline, stage
from .test_build import check_export_errors, started_stages


class Osbuild(Aosbuild):
    """Runs the drop-in command (`python -m aosbuild.osbuild_compat`) with `--cache`, osbuild's store flag."""

    def command(self, manifest: Path | dict[str, Any], *args: str) -> list[str]:
        path = manifest if isinstance(manifest, Path) else self.write_manifest(manifest)
        return [sys.executable, "-m", "aosbuild.osbuild_compat", "--libdir", str(TEST_LIBDIR),
                "--cache", str(self.store), *args, str(path)]


@pytest.fixture
def osbuild(workdir: Path) -> Osbuild:
    return Osbuild(workdir)


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aosbuild.osbuild_compat", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout == "osbuild 191\n"


@pytest.mark.parametrize("flag", [["--break", "*"], ["--break", "org.osbuild.noop"], ["--in-vm", "tree"]])
def test_unsupported_flags_are_refused(osbuild: Osbuild, flag: list[str]) -> None:
    result = osbuild(manifest(pipeline("tree", stage("org.osbuild.noop"))), *flag)
    assert result.returncode == 2
    assert "not supported by aosbuild" in result.stderr
    assert not osbuild.store.exists()


def test_aosbuild_only_flags_are_not_accepted(osbuild: Osbuild) -> None:
    result = osbuild(manifest(pipeline("tree", stage("org.osbuild.noop"))), "--sources-only")
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr


def test_build_export_jsonseq_and_rebuild(osbuild: Osbuild) -> None:
    path = GOLDEN / "v2-two-pipelines-tree-input.json"
    args = ("--export", "archive", "--output-directory", str(osbuild.output), "--monitor", "JSONSeqMonitor",
            "--cache-max-size", "10GiB")
    first = osbuild(path, *args)
    assert first.returncode == 0, first.stderr
    check_jsonseq(first.stdout)
    assert len(started_stages(first.jsonseq())) == 3
    assert (osbuild.output / "archive" / "os.tar").is_file()
    second = osbuild(path, *args)
    assert second.returncode == 0, second.stderr
    assert started_stages(second.jsonseq()) == []


def test_log_monitor_summary(osbuild: Osbuild) -> None:
    result = osbuild(GOLDEN / "v2-truncate-chmod.json", "--monitor", "LogMonitor")
    assert result.returncode == 0, result.stderr
    assert "tree:     \tfa0e466784d49682a1b7b3cb129b7a75b16bff9c2aed6aee3f0f1988056ce85a" in result.stdout
    assert "finished successfully" in result.stdout


def test_null_monitor_and_quiet(osbuild: Osbuild) -> None:
    m = manifest(pipeline("tree", stage("org.osbuild.noop")))
    for args in (("--monitor", "NullMonitor", "--monitor-fd", "2"), ("-q",)):
        result = osbuild(m, *args)
        assert result.returncode == 0, result.stderr
        assert "Starting module" not in result.stdout + result.stderr
    assert osbuild(m, "--monitor", "jsonseq").returncode == 2  # aosbuild's short names are not osbuild's


def test_json_document(osbuild: Osbuild) -> None:
    m = manifest(pipeline("tree", stage("org.aosbuild.test.report", answer=7)))
    result = osbuild(m, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["type"] == "result"
    assert document["metadata"]["tree"]["org.aosbuild.test.report"]["answer"] == 7


def test_failing_stage_json_document(osbuild: Osbuild) -> None:
    m = manifest(pipeline("tree", stage("org.osbuild.noop"), stage("org.aosbuild.test.fail", exit=3)))
    result = osbuild(m, "--json")
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert document["success"] is False
    assert document["error"]["type"] == "org.osbuild.error.stage"


def test_invalid_manifest(osbuild: Osbuild) -> None:
    m = manifest(pipeline("tree", {"type": "org.osbuild.truncate", "options": {"filename": "/x"}}))
    result = osbuild(m, "--json")
    assert result.returncode == 2
    document = json.loads(result.stdout)
    assert document["type"] == "https://osbuild.org/validation-error"
    assert document["errors"][0]["message"] == "'size' is a required property"
    human = osbuild(m)
    assert human.returncode == 2
    assert "'size' is a required property" in human.stdout


def test_inspect(osbuild: Osbuild) -> None:
    result = osbuild(GOLDEN / "v2-truncate-chmod.json", "--inspect")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pipelines"][0]["stages"][0]["id"]


def test_export_errors(osbuild: Osbuild) -> None:
    check_export_errors(osbuild)


def test_checkpoints(osbuild: Osbuild) -> None:
    m = manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/a"}]),
                          stage("org.osbuild.mkdir", paths=[{"path": "/b"}])))
    first = json.loads(osbuild(m, "--inspect").stdout)["pipelines"][0]["stages"][0]["id"]
    unmatched = osbuild(m, "--checkpoint", "does-not-match")
    assert unmatched.returncode == 1
    assert "No checkpoints matched provided patterns!" in unmatched.stdout + unmatched.stderr
    result = osbuild(m, "--checkpoint", first)
    assert result.returncode == 0, result.stderr
    assert f"{first}: cached" in result.stdout
    assert (osbuild.store / "objects" / first / "data" / "tree" / "a").is_dir()


def test_stage_timeout(osbuild: Osbuild) -> None:
    result = osbuild(manifest(pipeline("tree", stage("org.aosbuild.test.sleep", seconds=60))),
                     "--stage-timeout", "1")
    assert result.returncode == 1
    assert "timed out after 1s" in result.stderr


def test_cache_max_size_is_checked(osbuild: Osbuild) -> None:
    m = manifest(pipeline("tree", stage("org.osbuild.noop")))
    assert osbuild(m, "--cache-max-size", "unlimited").returncode == 0
    assert osbuild(m, "--cache-max-size", "5GiB").returncode == 0
    info = json.loads((osbuild.store / "cache.info").read_text())
    assert info["maximum-size"] == 5 * 2**30  # remembered, as osbuild does
    bad = osbuild(m, "--cache-max-size", "lots")
    assert bad.returncode == 2
    assert "invalid size" in bad.stderr


def test_store_defaults_to_dot_osbuild_and_stdin(workdir: Path) -> None:
    m = json.dumps(manifest(pipeline("tree", stage("org.osbuild.noop"))))
    result = subprocess.run([sys.executable, "-m", "aosbuild.osbuild_compat", "-"], input=m, capture_output=True,
                            text=True, timeout=60, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert (workdir / ".osbuild" / "objects").is_dir()


def test_install_command(workdir: Path) -> None:
    installed = subprocess.run([sys.executable, "-m", "aosbuild", "install-osbuild-command", "--prefix",
                                str(workdir)], capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0, installed.stderr
    script = workdir / "bin" / "osbuild"
    assert installed.stdout.strip() == str(script)
    assert os.access(script, os.X_OK)
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout == "osbuild 191\n"
    script.write_text("#!/bin/sh\necho real osbuild\n")  # not ours: kept unless --force
    again = subprocess.run([sys.executable, "-m", "aosbuild", "install-osbuild-command", "--prefix",
                            str(workdir)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1
    assert "--force" in again.stderr


def test_installed_osbuild_library_is_the_default(tmp_path: Path) -> None:
    """As osbuild: `/usr/lib/osbuild` where it is installed (here a stand-in path), unless --libdir says otherwise."""
    installed = tmp_path / "usr-lib-osbuild"
    args = parser().parse_args(["m.json"])
    assert invocation(args, installed).libdirs == ()  # not installed: aosbuild's bundled library alone
    (installed / "stages").mkdir(parents=True)
    assert invocation(args, installed).libdirs == (str(installed),)
    given = parser().parse_args(["--libdir", "/elsewhere", "m.json"])
    assert invocation(given, installed).libdirs == ("/elsewhere",)
    assert INSTALLED_LIBDIR == Path("/usr/lib/osbuild")


def test_inspect_real_manifest_with_osbuilds_library(osbuild_oracle: OsbuildOracle) -> None:
    """The drop-in command prints what osbuild prints for one of osbuild's own manifests, byte for byte."""
    path = GOLDEN.parent / "real-manifests" / "fedora-boot.json"
    result = run("--libdir", str(osbuild_oracle.libdir), "--inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == path.with_suffix(".expected").read_text()
