"""Every documented flag of the command line, driven through the real CLI, each test showing its effect.

Flags that other test files already drive with an observable effect, and so are not repeated here:
`--monitor-fd` refused when not writable (test_errors), `--checkpoint ID` and a glob matching nothing
(test_build), `store limit` with sizes and `store clear` on an idle store (test_cache),
`install-osbuild-command --prefix` and its refusal without `--force` (test_osbuild_compat).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO, Aosbuild, check_jsonseq, manifest, pipeline, stage
from .fileserver import FileServer, Hold, sha256
from .test_sources import blob, copy_items, curl_manifest, items_in


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer().running() as files:
        yield files


def store_command(aosbuild: Aosbuild, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aosbuild", "store", *args, "--store", str(aosbuild.store)],
                          capture_output=True, text=True, timeout=60, cwd=aosbuild.workdir)


def stage_ids(aosbuild: Aosbuild, m: dict[str, Any]) -> list[list[str]]:
    described = json.loads(aosbuild(m, "--inspect").stdout)
    return [[s["id"] for s in p["stages"]] for p in described["pipelines"]]


def test_monitor_fd_carries_the_stream_and_stdout_none(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/a"}])))
    read, write = os.pipe()
    try:
        proc = subprocess.run(aosbuild.command(m, "--monitor", "jsonseq", "--monitor-fd", str(write)),
                              pass_fds=(write,), capture_output=True, text=True, timeout=120,
                              cwd=aosbuild.workdir)
        os.close(write)
        write = -1
        with os.fdopen(read, "rb") as stream:
            read = -1
            records = stream.read()
    finally:
        for fd in (read, write):
            if fd >= 0:
                os.close(fd)
    assert proc.returncode == 0, proc.stderr
    assert "\x1e" not in proc.stdout
    assert "pipelines=1 stages=1" in check_jsonseq(records)


# -- downloads: the bounds seen at a real server with more routes than the bound ----------------------------


@pytest.mark.parametrize("bound", ["--download-jobs", "--download-jobs-per-host"])
def test_download_bounds(aosbuild: Aosbuild, server: FileServer, bound: str) -> None:
    hold = Hold()
    items = {sha256(data): server.add(f"/f{i}", data, gate=hold) for i in range(6) for data in [blob(f"f{i}")]}
    # the other bound is left at its default (8 overall, 4 per host): either one ignored lets 4 in at once
    with subprocess.Popen(aosbuild.command(curl_manifest(items), "--sources-only", "-q", bound, "2"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=aosbuild.workdir) as proc:
        try:
            # a tighter bound never holds 2; while both are held, a looser one sends its third: a wide window
            held = hold.peak(2, window=3)
            hold.set()
            assert proc.wait(60) == 0
        finally:
            hold.set()
            if proc.poll() is None:
                proc.kill()
    assert held == 2
    assert server.most_active <= 2
    assert len(items_in(aosbuild.store)) == 6


def test_download_timeout_retries_a_stalled_download(aosbuild: Aosbuild, server: FileServer) -> None:
    data = blob("stalled")
    m = curl_manifest({sha256(data): server.add("/stalled", data, "stall")}, copy_items("tree", sha256(data)))
    began = time.monotonic()
    # the stalled response is held for 30 s (the default timeout too), so only the flag makes this quick
    result = aosbuild(m, "--sources-only", "--download-timeout", "2", timeout=120)
    took = time.monotonic() - began
    assert result.returncode == 0, result.stderr
    assert server.count("/stalled") == 2
    assert 2 <= took < 15
    assert items_in(aosbuild.store) == [sha256(data)]


# -- output --------------------------------------------------------------------------------------------------


def test_debug_shows_engine_events_on_stderr(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/a"}])))
    quiet = aosbuild(m, "--store", str(aosbuild.workdir / "plain"))
    assert quiet.returncode == 0, quiet.stderr
    assert "stage.finished" not in quiet.stderr
    debug = aosbuild(m, "--debug")
    assert debug.returncode == 0, debug.stderr
    assert "stage.finished" in debug.stderr
    assert "org.osbuild.mkdir" in debug.stderr


def test_quiet_prints_nothing(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/a"}])))
    loud = aosbuild(m, "--store", str(aosbuild.workdir / "loud"))
    assert loud.returncode == 0, loud.stderr
    assert "org.osbuild.mkdir" in loud.stdout
    for flag in ("-q", "--quiet"):
        quiet = aosbuild(m, flag, "--store", str(aosbuild.workdir / flag))
        assert quiet.returncode == 0, quiet.stderr
        assert (quiet.stdout, quiet.stderr) == ("", "")


# -- scheduling and the store --------------------------------------------------------------------------------


def pipeline_spans(records: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    starts = {r["message"].removeprefix("Starting pipeline "): r["timestamp"] for r in records
              if str(r.get("message", "")).startswith("Starting pipeline ")}
    ends = {r["message"].removeprefix("Finished pipeline "): r["timestamp"] for r in records
            if str(r.get("message", "")).startswith("Finished pipeline ")}
    return {name: (starts[name], ends[name]) for name in starts}


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_jobs_short_flag(aosbuild: Aosbuild, jobs: str) -> None:
    seconds = 2.0
    m = manifest(pipeline("one", stage("org.aosbuild.test.sleep", seconds=seconds, marker="one")),
                 pipeline("two", stage("org.aosbuild.test.sleep", seconds=seconds, marker="two")))
    began = time.monotonic()
    result = aosbuild(m, "-j", jobs, "--monitor", "jsonseq")
    took = time.monotonic() - began
    assert result.returncode == 0, result.stderr
    (a_start, a_end), (b_start, b_end) = pipeline_spans(result.jsonseq()).values()
    if jobs == "1":
        assert a_end <= b_start or b_end <= a_start  # one after the other
        assert took >= 2 * seconds
    else:
        assert a_start < b_end  # at the same time
        assert b_start < a_end
        assert max(a_end, b_end) - min(a_start, b_start) < 2 * seconds


def test_checkpoint_globs_over_stage_types_and_pipeline_names(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("alpha", stage("org.osbuild.mkdir", paths=[{"path": "/a"}]),
                          stage("org.osbuild.mkdir", paths=[{"path": "/b"}]),
                          stage("org.aosbuild.test.sleep", seconds=0), stage("org.osbuild.noop")))
    [[first, second, _, last]] = stage_ids(aosbuild, m)
    plain = aosbuild.workdir / "plain"
    assert aosbuild(m, "-q", "--store", str(plain)).returncode == 0
    assert (plain / "objects" / first).exists()  # every stage is kept, with or without a checkpoint
    assert (plain / "objects" / second).exists()

    result = aosbuild(m, "-q", "--checkpoint", "org.osbuild.mk*")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(aosbuild.stored_tree(first))) == ["a"]
    assert sorted(os.listdir(aosbuild.stored_tree(second))) == ["a", "b"]

    # a pipeline name's glob names its last stage: matched (no "No checkpoints matched"), and kept
    named = aosbuild.workdir / "named"
    by_name = aosbuild(m, "-q", "--checkpoint", "alp*", "--store", str(named))
    assert by_name.returncode == 0, by_name.stderr
    assert (named / "objects" / last).is_dir()


def write_stage(libdir: Path, name: str, marker: str) -> None:
    stages = libdir / "stages"
    stages.mkdir(parents=True, exist_ok=True)
    (stages / name).write_text(
        "#!/usr/bin/python3\nimport os\nimport sys\n\nfrom aosbuild import stageapi\n\n\n"
        f"def main(args):\n    open(os.path.join(args['tree'], {marker!r}), 'w').close()\n    return 0\n\n\n"
        "sys.exit(stageapi.run(main))\n")
    (stages / name).chmod(0o755)
    meta = {"summary": "test", "description": ["test"],
            "schema_2": {"options": {"type": "object", "additionalProperties": False}}}
    (stages / f"{name}.meta.json").write_text(json.dumps(meta))


def test_repeated_libdirs_and_a_shadowed_bundled_stage(aosbuild: Aosbuild) -> None:
    first, second = aosbuild.workdir / "lib1", aosbuild.workdir / "lib2"
    write_stage(first, "org.aosbuild.test.libdir-one", "from-lib1")
    write_stage(second, "org.osbuild.noop", "from-lib2")  # the bundled noop writes nothing
    m = manifest(pipeline("tree", stage("org.aosbuild.test.libdir-one"), stage("org.osbuild.noop")))
    result = aosbuild(m, "-q", "--libdir", str(first), "--libdir", str(second),
                      "--export", "tree", "--output-directory", str(aosbuild.output))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(aosbuild.output / "tree")) == ["from-lib1", "from-lib2"]


def test_store_prune_sources_to(aosbuild: Aosbuild, server: FileServer) -> None:
    data = blob("item")
    m = curl_manifest({sha256(data): server.add("/item", data)}, copy_items("tree", sha256(data)))
    assert aosbuild(m, "--sources-only", "-q").returncode == 0
    kept = store_command(aosbuild, "prune", "--to", "0")
    assert kept.returncode == 0, kept.stderr
    assert items_in(aosbuild.store) == [sha256(data)]  # under the default bound of the sources
    pruned = store_command(aosbuild, "prune", "--to", "0", "--sources-to", "0")
    assert pruned.returncode == 0, pruned.stderr
    assert items_in(aosbuild.store) == []


def test_store_clear_is_refused_while_a_build_runs(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("slow", stage("org.aosbuild.test.sleep", seconds=60)))
    with subprocess.Popen(aosbuild.command(m, "--monitor", "jsonseq"), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, cwd=aosbuild.workdir) as build:
        try:
            assert build.stdout is not None
            for line in build.stdout:
                if "Starting module org.aosbuild.test.sleep" in line:
                    break
            else:
                pytest.fail("the build ended before its stage started")
            refused = store_command(aosbuild, "clear")
            assert refused.returncode != 0
            assert "builds are running" in refused.stderr
            assert (aosbuild.store / "cache.info").exists()
        finally:
            build.send_signal(signal.SIGTERM)
            assert build.wait(60) == 143
    cleared = store_command(aosbuild, "clear")
    assert cleared.returncode == 0, cleared.stderr


def test_store_limit_without_a_size_shows_the_bounds(aosbuild: Aosbuild) -> None:
    aosbuild.store.mkdir()
    assert store_command(aosbuild, "limit", "--cache-max-size", "5GiB", "--sources-max-size", "3GiB").returncode == 0
    before = (aosbuild.store / "cache.info").read_text()
    shown = store_command(aosbuild, "limit")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "trees:   5.0 GiB\nsources: 3.0 GiB\n"
    assert (aosbuild.store / "cache.info").read_text() == before


def test_install_osbuild_command_default_location_and_force(aosbuild: Aosbuild) -> None:
    # a Python whose bin directory is the test's: the default location is beside that Python
    bindir = aosbuild.workdir / "venv" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "python3").symlink_to(sys.executable)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path[1:]])}

    def install(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(bindir / "python3"), "-m", "aosbuild", "install-osbuild-command", *args],
                              capture_output=True, text=True, timeout=60, env=env)

    script = bindir / "osbuild"
    installed = install()
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.strip() == str(script)
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60, env=env)
    assert version.stdout == "osbuild 191\n", version.stderr

    script.write_text("#!/bin/sh\necho real osbuild\n")  # not ours: replaced only with --force
    assert install().returncode == 1
    assert script.read_text() == "#!/bin/sh\necho real osbuild\n"
    forced = install("--force")
    assert forced.returncode == 0, forced.stderr
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60, env=env)
    assert version.stdout == "osbuild 191\n", version.stderr
