"""An `Invocation` is the whole request: built in code it runs a build without argv, and both command lines
parse into it (aosbuild/invocation.py, aosbuild/run.py)."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from pathlib import Path

import pytest

from aosbuild import cli, osbuild_compat
from aosbuild.download import DownloadOptions
from aosbuild.invocation import Invocation
from aosbuild.run import run
from aosbuild.store import KEEP

REPO = Path(__file__).resolve().parent.parent
HELLO = REPO / "samples" / "hello.json"


def test_an_invocation_built_in_code_runs_a_build(workdir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """samples/hello.json, its `os` tree exported, progress as JSON-seq on a file, the result as JSON."""
    progress = workdir / "progress.jsonseq"
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        inv = Invocation(manifest=str(HELLO), store=str(workdir / "store"), exports=("os",),
                         output_directory=workdir / "out", json=True, monitor="jsonseq", monitor_fd=fd,
                         cache_max_size=None)
        code = run(inv)
    finally:
        os.close(fd)
    out, err = capfd.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["success"] is True
    inline = json.loads(HELLO.read_text())["sources"]["org.osbuild.inline"]["items"]
    (greeting,) = (base64.b64decode(item["data"]) for item in inline.values())
    readme = workdir / "out" / "os" / "usr" / "share" / "doc" / "hello" / "README"
    assert readme.read_bytes() == greeting
    assert oct(readme.stat().st_mode & 0o7777) == "0o644"
    records = [json.loads(record) for record in progress.read_text().split("\x1e") if record.strip()]
    assert "Starting pipeline os" in [r.get("message") for r in records]
    # the unlimited bound asked for is the store's now
    assert json.loads((workdir / "store" / "cache.info").read_text())["maximum-size"] == "unlimited"


def test_a_bad_invocation_is_refused_before_anything_is_built(workdir: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    store = workdir / "store"
    code = run(Invocation(manifest=str(HELLO), store=str(store), jobs=0, json=True))
    out, err = capfd.readouterr()
    assert code == 2
    assert json.loads(out)["success"] is False
    assert "Error: --jobs" in err
    assert "must be 1 or more, not 0" in err
    assert not store.exists()


def test_an_invocation_is_frozen() -> None:
    inv = Invocation(manifest="m.json")
    with pytest.raises(dataclasses.FrozenInstanceError):
        inv.jobs = 3  # type: ignore[misc]
    assert dataclasses.replace(inv, jobs=3).jobs == 3
    assert inv.jobs is None


def test_aosbuild_flags_parse_into_the_invocation() -> None:
    args = cli.parser().parse_args(
        ["m.json", "--store", "s", "-l", "lib1", "--libdir", "lib2", "--checkpoint", "build", "--export", "os",
         "--export", "disk", "--output-directory", "out", "--json", "--monitor", "jsonseq", "--monitor-fd", "3",
         "--stage-timeout", "9.5", "-j", "2", "--sources-only", "--download-jobs", "5",
         "--download-jobs-per-host", "2", "--download-timeout", "7", "--cache-max-size", "1 GiB", "-q",
         "--debug", "--backend", "asyncio"])
    assert cli.invocation(args) == Invocation(
        manifest="m.json", store="s", libdirs=("lib1", "lib2"), checkpoints=("build",), exports=("os", "disk"),
        output_directory=Path("out"), json=True, monitor="jsonseq", monitor_fd=3, stage_timeout=9.5, jobs=2,
        sources_only=True, download=DownloadOptions(jobs=5, per_host=2, timeout=7.0), cache_max_size=2**30,
        quiet=True, debug=True, backend="asyncio")
    assert cli.invocation(cli.parser().parse_args(["m.json"])) == Invocation(manifest="m.json")


def test_osbuild_flags_parse_into_the_invocation(tmp_path: Path) -> None:
    args = osbuild_compat.parser().parse_args(
        ["--cache", "s", "--libdir", "/usr/lib/osbuild", "--checkpoint", "build", "--export", "os",
         "--output-directory", "out", "--json", "--monitor", "JSONSeqMonitor", "--monitor-fd", "3",
         "--stage-timeout", "60", "--cache-max-size", "unlimited", "-q", "m.json"])
    assert osbuild_compat.invocation(args) == Invocation(
        manifest="m.json", store="s", libdirs=("/usr/lib/osbuild",), checkpoints=("build",), exports=("os",),
        output_directory=Path("out"), json=True, monitor="JSONSeqMonitor", monitor_fd=3, stage_timeout=60.0,
        cache_max_size=None, quiet=True, summary=False)
    not_installed = tmp_path / "usr-lib-osbuild"  # test_osbuild_compat.py: the installed library's default
    default = osbuild_compat.invocation(osbuild_compat.parser().parse_args(["m.json"]), not_installed)
    assert default == Invocation(manifest="m.json", summary=False)
    assert default.cache_max_size is KEEP

