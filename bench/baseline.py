"""The `osbuild` scenario: aosbuild next to osbuild 191 on the same commands, in the same run.

osbuild is found as the tests find it: `$AOSBUILD_OSBUILD_LIBDIR`, an installed `/usr/lib/osbuild`, or
osbuild 191's library in `../shared/osbuild-191` (`$AOSBUILD_SHARED`); without one the scenario is
skipped. It runs as its README says: `/usr/bin/python3 -m osbuild --libdir DIR ...` from DIR, with the
system Python (which has python3-jsonschema). Each repetition runs every command with aosbuild and then
with osbuild, back to back; every build gets a fresh store, and the cached rebuilds a store that the
cold build of the same repetition filled.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from common import BENCH_ENV, REPO, Section, Summary, repeat, summarise, timed_ms
from engine import noop_manifest

NOOP_STAGES = 20
SYSTEM_PYTHON = "/usr/bin/python3"


def osbuild_libdir() -> Path | None:
    """osbuild's library, where tests/conftest.py's `find_osbuild_libdir` would find it."""
    shared = Path(os.environ.get("AOSBUILD_SHARED") or REPO.parent / "shared")
    for candidate in (os.environ.get("AOSBUILD_OSBUILD_LIBDIR"), "/usr/lib/osbuild", shared / "osbuild-191"):
        if candidate and Path(candidate, "stages").is_dir() and Path(candidate, "osbuild").is_dir():
            return Path(candidate)
    if Path("/usr/lib/osbuild/stages").is_dir():
        return Path("/usr/lib/osbuild")  # an installed osbuild: its package is in site-packages
    return None


def prepared_copy(libdir: Path, root: Path) -> Path:
    """A copy of `libdir` under `root`, where osbuild can write its bytecode as an installed osbuild has
    it, with its symlinks restored where a checkout flattened them.

    A checkout without symlinks (git's core.symlinks=false, as `../shared/osbuild-191` here) leaves each
    as a small file holding its target's name: osbuild then cannot exec the runner it picks
    (org.osbuild.debian names org.osbuild.debian12 that way).
    """
    def flattened(path: Path) -> str | None:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 255 or os.access(path, os.X_OK):
            return None
        target = path.read_text(errors="replace").strip()
        return target if "\n" not in target and (path.parent / target).is_file() else None

    folders = [libdir / name for name in ("runners", "stages", "assemblers", "sources", "inputs", "devices",
                                           "mounts")]
    copy = root / "osbuild-lib"
    shutil.copytree(libdir, copy, symlinks=True)
    for folder in folders:
        for path in (copy / folder.name).iterdir() if folder.is_dir() else ():
            target = flattened(path)
            if target is not None:
                path.unlink()
                path.symlink_to(target)
    return copy


def tree_input(*names: str) -> dict[str, Any]:
    return {name: {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": [f"name:{name}"]}
            for name in names}


def generic_manifest() -> dict[str, Any]:
    """7 pipelines, 30 stages of osbuild's generic stages, which aosbuild bundles with osbuild's options:
    a base tree, four variants copied from it (built at the same time by aosbuild, one by one by
    osbuild), a tarball of one of them, and a bundle of two others with a tarball inside."""
    base = {"name": "base", "stages": [
        {"type": "org.osbuild.mkdir", "options": {"paths": [
            {"path": "/etc"}, {"path": "/usr/lib/sysctl.d", "parents": True}, {"path": "/data"}]}},
        {"type": "org.osbuild.hostname", "options": {"hostname": "bench"}},
        {"type": "org.osbuild.locale", "options": {"language": "C.UTF-8"}},
        {"type": "org.osbuild.machine-id", "options": {"first-boot": "yes"}},
        {"type": "org.osbuild.sysctld", "options": {"filename": "50-bench.conf",
                                                    "config": [{"key": "vm.swappiness", "value": "10"}]}},
        {"type": "org.osbuild.truncate", "options": {"filename": "data/disk.img", "size": "16M"}}]}
    variants = [{"name": f"variant{i}", "stages": [
        {"type": "org.osbuild.copy", "inputs": tree_input("base"),
         "options": {"paths": [{"from": "input://base/", "to": "tree:///"}]}},
        {"type": "org.osbuild.mkdir", "options": {"paths": [{"path": f"/data/v{i}"}]}},
        {"type": "org.osbuild.truncate", "options": {"filename": f"data/v{i}/file.img", "size": "1M"}},
        {"type": "org.osbuild.hostname", "options": {"hostname": f"variant{i}"}}]} for i in range(4)]
    tarball = {"name": "tarball", "stages": [
        {"type": "org.osbuild.mkdir", "options": {"paths": [{"path": "/out"}]}},
        {"type": "org.osbuild.tar", "inputs": {"tree": tree_input("variant0")["variant0"]},
         "options": {"filename": "out/variant0.tar"}},
        {"type": "org.osbuild.truncate", "options": {"filename": "out/pad.img", "size": "1M"}},
        {"type": "org.osbuild.hostname", "options": {"hostname": "tarball"}}]}
    bundle = {"name": "bundle", "stages": [
        {"type": "org.osbuild.copy", "inputs": tree_input("variant1", "tarball"),
         "options": {"paths": [{"from": "input://variant1/", "to": "tree:///"},
                               {"from": "input://tarball/out/variant0.tar", "to": "tree:///variant0.tar"}]}},
        {"type": "org.osbuild.mkdir", "options": {"paths": [{"path": "/extra"}]}},
        {"type": "org.osbuild.copy", "inputs": tree_input("variant2"),
         "options": {"paths": [{"from": "input://variant2/etc/hostname", "to": "tree:///extra/hostname"}]}},
        {"type": "org.osbuild.tar", "inputs": {"tree": tree_input("variant3")["variant3"]},
         "options": {"filename": "variant3.tar"}}]}
    return {"version": "2", "pipelines": [base, *variants, tarball, bundle]}


GENERIC_EXPORTS = ("base", "variant0", "variant1", "variant2", "variant3", "tarball", "bundle")


class Runner:
    """Both tools' command lines, with fresh stores and output directories under `root`."""

    def __init__(self, root: Path, libdir: Path) -> None:
        self.root = root
        self.libdir = libdir
        self._count = 0
        self.osbuild_env = {**BENCH_ENV, "PYTHONPATH": os.fspath(libdir)} if (libdir / "osbuild").is_dir() \
            else dict(BENCH_ENV)

    def fresh(self, name: str) -> Path:
        self._count += 1
        return self.root / f"{name}-{self._count}"

    def aosbuild(self, *args: str | os.PathLike[str]) -> float:
        return timed_ms([sys.executable, "-m", "aosbuild", *map(os.fspath, args)])

    def osbuild(self, *args: str | os.PathLike[str]) -> float:
        return timed_ms([SYSTEM_PYTHON, "-m", "osbuild", "--libdir", ".", *map(os.fspath, args)],
                        cwd=self.libdir, env=self.osbuild_env)

    def build(self, tool: str, manifest: Path, store: Path, *exports: str) -> float:
        args: list[str | os.PathLike[str]] = ["--store", store]
        if tool == "osbuild":
            args += ["--cache-max-size", "unlimited"]  # osbuild keeps nothing by default
            for name in exports:
                args += ["--checkpoint", name]
        if exports:
            args += ["--output-directory", self.fresh(f"{tool}-out")]
            for name in exports:
                args += ["--export", name]
        args += ["--quiet" if tool == "aosbuild" else "--monitor=NullMonitor", manifest]
        return self.aosbuild(*args) if tool == "aosbuild" else self.osbuild(*args)


def measure(runner: Runner, times: int, quick: bool) -> dict[str, list[float]]:
    noops = runner.root / "noops.json"
    noops.write_text(json.dumps(noop_manifest(NOOP_STAGES)))
    generic = runner.root / "generic.json"
    generic.write_text(json.dumps(generic_manifest()))

    def sample() -> dict[str, float]:
        result: dict[str, float] = {}
        for tool in ("aosbuild", "osbuild"):
            run = runner.aosbuild if tool == "aosbuild" else runner.osbuild
            result[f"{tool}_version_ms"] = run("--version")
            result[f"{tool}_inspect_ms"] = run("--inspect", noops)
            store = runner.fresh(f"{tool}-store")
            # exported: osbuild builds only what is exported or checkpointed
            result[f"{tool}_noops_ms"] = runner.build(tool, noops, store, "noop")
            shutil.rmtree(store, ignore_errors=True)
            if not quick:
                store = runner.fresh(f"{tool}-store")
                result[f"{tool}_generic_cold_ms"] = runner.build(tool, generic, store, *GENERIC_EXPORTS)
                result[f"{tool}_generic_cached_ms"] = runner.build(tool, generic, store, *GENERIC_EXPORTS)
                shutil.rmtree(store, ignore_errors=True)
        return result

    sample()  # untimed: .pyc files and the page cache
    return repeat(times, sample)


ROWS = [("version", "`--version`"),
        ("inspect", f"`--inspect` of {NOOP_STAGES} `org.osbuild.noop` stages"),
        ("noops", f"build of {NOOP_STAGES} `org.osbuild.noop` stages, exported"),
        ("generic_cold", "7 pipelines, 30 generic stages, all exported, empty store"),
        ("generic_cached", "the same again, store filled (osbuild: `--checkpoint` of every pipeline)")]


def table(s: dict[str, Summary]) -> list[str]:
    lines = ["### aosbuild next to osbuild 191 (same commands, same run)", "",
             "| command | aosbuild ms (min-max) | osbuild 191 ms (min-max) | aosbuild / osbuild |",
             "|---|---|---|---|"]
    for key, label in ROWS:
        if f"aosbuild_{key}_ms" not in s:
            continue
        ours, theirs = s[f"aosbuild_{key}_ms"], s[f"osbuild_{key}_ms"]
        lines.append(f"| {label} | {ours.cell()} | {theirs.cell()} | {ours.median / theirs.median:.2f}x |")
    return lines


def run(root: Path, times: int, quick: bool) -> Section:
    libdir = osbuild_libdir()
    if libdir is None:
        return Section(name="osbuild", samples={}, table=["### aosbuild next to osbuild 191", "",
                                                          "(skipped: no osbuild library found)"])
    os.makedirs("/etc/containers", exist_ok=True)  # osbuild bind-mounts it for every host build root
    raw = measure(Runner(root, prepared_copy(libdir, root)), times, quick)
    s = summarise(raw)
    headline = {f"{key}_ratio": s[f"aosbuild_{key}_ms"].median / s[f"osbuild_{key}_ms"].median
                for key, _ in ROWS if f"aosbuild_{key}_ms" in s}
    return Section(name="osbuild", samples=raw, table=table(s), headline=headline,
                   settings={"libdir": os.fspath(libdir), "noop_stages": NOOP_STAGES,
                             "generic_manifest": generic_manifest()})
