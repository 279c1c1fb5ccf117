"""Store scenarios: a fully cached rebuild against startup, committing and exporting a 1 GiB tree against `cp -a`.

The rebuild scenario runs the CLI as a user would; the 1 GiB scenario drives `aosbuild.store` directly,
since a build would add the time of a stage writing 1 GiB to what is measured.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from common import REPO, TEST_LIBDIR, Section, Summary, repeat, summarise, summary_table, timed_ms

sys.path.insert(0, str(REPO))
from aosbuild.store import Store, copy_tree  # the repository's, not an installed one

PIPELINES = 8
STAGES = 5
TREE_FILES = 4096
TREE_FILE_SIZE = 256 * 1024  # 4096 files of 256 KiB in 64 directories: 1 GiB
QUICK_TREE_FILES = 256


def cached_manifest() -> dict[str, Any]:
    """Eight pipelines of five stages, the last four reading the first four's trees."""
    pipelines = []
    for i in range(PIPELINES):
        stages: list[dict[str, Any]] = [
            {"type": "org.aosbuild.test.files", "options": {"seed": f"p{i}s{j}", "count": 8, "size": 65536}}
            for j in range(STAGES - 1)]
        if i >= PIPELINES // 2:
            reads = {"t": {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline",
                           "references": [f"name:p{i - PIPELINES // 2}"]}}
            stages.append({"type": "org.osbuild.tar", "inputs": {"tree": reads["t"]},
                           "options": {"filename": "tree.tar"}})
        else:
            stages.append({"type": "org.osbuild.mkdir", "options": {"paths": [{"path": "/etc"}]}})
        pipelines.append({"name": f"p{i}", "stages": stages})
    return {"version": "2", "pipelines": pipelines}


def aosbuild(store: Path, manifest: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "aosbuild", "--libdir", os.fspath(TEST_LIBDIR), "--store", os.fspath(store),
            "-q", *args, os.fspath(manifest)]


def measure_rebuild(root: Path, times: int) -> dict[str, list[float]]:
    """Startup on an empty manifest, a cold build, and the same build again, fully cached."""
    empty = root / "empty.json"
    empty.write_text(json.dumps({"version": "2"}))
    manifest = root / "cached.json"
    manifest.write_text(json.dumps(cached_manifest()))
    counter = iter(range(1 << 30))

    def sample() -> dict[str, float]:
        store = root / f"store-{next(counter)}"
        try:
            startup = timed_ms(aosbuild(store, empty))
            cold = timed_ms(aosbuild(store, manifest))
            cached = timed_ms(aosbuild(store, manifest))
        finally:
            shutil.rmtree(store, ignore_errors=True)
        return {"startup_ms": startup, "cold_ms": cold, "cached_ms": cached, "cached_over_startup_ms": cached - startup}

    return repeat(times, sample)


def write_tree(tree: Path, files: int) -> None:
    block = os.urandom(TREE_FILE_SIZE)
    for i in range(files):
        directory = tree / f"d{i % 64:02}"
        directory.mkdir(exist_ok=True)
        (directory / f"f{i}").write_bytes(block[i % 251:] + block[:i % 251])


def measure_tree(root: Path, times: int, files: int) -> dict[str, list[float]]:
    """Commit a filled staging entry, export it as a build does; and `cp -a` of the same tree.
    The two copies run in alternating order, so neither always gets the warmer caches."""
    counter = iter(range(1 << 30))

    def sample() -> dict[str, float]:
        store_dir, export, plain = root / "store", root / "export", root / "plain"
        result: dict[str, float] = {}
        cp_first = next(counter) % 2 == 1

        async def run() -> None:
            store = Store.open(store_dir, max_size=None)
            async with store.store("tree") as entry:
                write_tree(entry.tree, files)  # not timed: a stage's work
                start = time.perf_counter()
            # the block's end is the commit: sizing the tree, checking the bound, the rename
            result["commit_ms"] = (time.perf_counter() - start) * 1000
            assert entry.outcome == "stored", entry.outcome

            async def export_tree() -> None:
                start = time.perf_counter()
                await copy_tree(loaded.tree, export / "tree")  # what --export does
                result["export_ms"] = (time.perf_counter() - start) * 1000

            async def cp_a() -> None:
                start = time.perf_counter()
                await anyio.run_process(["cp", "-a", "--", os.fspath(loaded.tree), os.fspath(plain)])
                result["cp_a_ms"] = (time.perf_counter() - start) * 1000

            async with store.load("tree") as loaded:
                for copy in (cp_a, export_tree) if cp_first else (export_tree, cp_a):
                    await copy()
            store.close()

        try:
            anyio.run(run)
        finally:
            for d in (store_dir, export, plain):
                shutil.rmtree(d, ignore_errors=True)
        result["commit_and_export_ms"] = result["commit_ms"] + result["export_ms"]
        return result

    return repeat(times, sample)


def rebuild_table(s: dict[str, Summary]) -> list[str]:
    return summary_table(
        f"### Fully cached rebuild ({PIPELINES} pipelines x {STAGES} stages, 4 of them reading another's tree)",
        "ms", [("aosbuild startup, empty manifest", s["startup_ms"]),
               ("cold build, empty store", s["cold_ms"]),
               ("**the same build again, fully cached**", s["cached_ms"]),
               ("cached rebuild - startup", s["cached_over_startup_ms"])])


def tree_table(s: dict[str, Summary], files: int) -> list[str]:
    size = files * TREE_FILE_SIZE / 2**30
    return summary_table(
        f"### Committing and exporting a {size:g} GiB tree ({files} files) vs `cp -a` of it",
        "ms", [("aosbuild: commit (size walk, results, bound check, rename)", s["commit_ms"]),
               ("aosbuild: export (`cp --reflink=auto -a`)", s["export_ms"]),
               ("**aosbuild: commit + export**", s["commit_and_export_ms"]),
               ("**`cp -a` of the same tree**", s["cp_a_ms"])])


def rebuild(root: Path, times: int, quick: bool) -> Section:
    measure_rebuild(root, 1)  # warm up: .pyc files, the page cache
    raw = measure_rebuild(root, times)
    s = summarise(raw)
    return Section(name="rebuild", samples=raw, table=rebuild_table(s),
                   headline={"cached_over_startup_ms": s["cached_over_startup_ms"].median},
                   settings={"pipelines": PIPELINES, "stages": STAGES})


def commit_export(root: Path, times: int, quick: bool) -> Section:
    files = QUICK_TREE_FILES if quick else TREE_FILES
    raw = measure_tree(root, times, files)
    s = summarise(raw)
    return Section(name="commit", samples=raw, table=tree_table(s, files),
                   headline={"commit_ms": s["commit_ms"].median, "cp_a_ms": s["cp_a_ms"].median},
                   settings={"tree_files": files, "tree_file_size": TREE_FILE_SIZE})
