"""Downloads scenario: `aosbuild --sources-only` at several `--download-jobs` against `apt-get download`.

Each `--download-jobs N` run also sets `--download-jobs-per-host N`, since the set comes from one or two
hosts and the per-host default (4) would otherwise cap N; one more run keeps both defaults.
The package set (minbase plus systemd, about 100 .debs) is depsolved once, untimed, against the mirror of
this host's apt configuration; every timed run then starts from an empty store or directory.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
from common import REPO, Section, Summary, repeat, summarise, timed_ms

from aosbuild.depsolve import AptRoot, DepsolveRequest, DepsolveResult, default_cache, depsolve, open_apt_root

JOBS = (1, 4, 8, 16)
QUICK_JOBS = (1, 8)
PACKAGES = ("systemd",)
VARIANT = "minbase"
STORE_ITEMS = Path("sources") / "org.osbuild.files"  # where a store keeps org.osbuild.curl items


def run_timed(argv: Sequence[str], *, cwd: Path = REPO, env: dict[str, str] | None = None) -> float:
    """Wall seconds of one command; a failure aborts the benchmark."""
    return timed_ms(argv, cwd=cwd, env=env) / 1000


def manifest(result: DepsolveResult) -> dict[str, Any]:
    """The pinned set as a user's manifest has it: curl items, used by an install stage's input."""
    return {"version": "2", "sources": result.sources(), "pipelines": [{"name": "os", "stages": [{
        "type": "org.aosbuild.debian.install",
        "inputs": {"packages": {"type": "org.osbuild.files", "origin": "org.osbuild.source",
                                "references": {p.checksum: {} for p in result.packages}}},
        "options": {}}]}]}


async def prepare(cache: Path | None) -> tuple[DepsolveResult, AptRoot]:
    result = await depsolve(DepsolveRequest(packages=PACKAGES, variant=VARIANT, cache=cache))
    async with open_apt_root(cache or default_cache(), result.repositories, result.architecture) as root:
        return result, root


class Workspace:
    """A temp dir on tmpfs; every timed run gets a fresh subdirectory, removed afterwards, outside the timing."""

    def __init__(self, root: Path, manifest_path: Path, result: DepsolveResult, apt_root: AptRoot) -> None:
        self.root = root
        self.manifest = manifest_path
        self.result = result
        self.apt_root = apt_root
        self._runs = 0

    def fresh(self, name: str) -> Path:
        self._runs += 1
        path = self.root / f"{name}-{self._runs}"
        path.mkdir()
        return path

    def aosbuild(self, jobs: int | None, store: Path) -> float:
        """One `--sources-only` run; `jobs` sets both limits, overall and per host; None keeps the defaults."""
        limits = [] if jobs is None else ["--download-jobs", str(jobs), "--download-jobs-per-host", str(jobs)]
        argv = [sys.executable, "-m", "aosbuild", "--store", os.fspath(store), "-q", "--sources-only",
                *limits, os.fspath(self.manifest)]
        elapsed = run_timed(argv)
        items = store / STORE_ITEMS
        found = {p.name for p in items.iterdir()} if items.is_dir() else set()
        missing = {p.checksum for p in self.result.packages} - found
        if missing:
            raise SystemExit(f"aosbuild --sources-only exited 0 but {len(missing)} items are not in {items}")
        return elapsed

    def aosbuild_fresh(self, jobs: int | None) -> float:
        store = self.fresh(f"store-j{jobs or 'default'}")
        try:
            return self.aosbuild(jobs, store)
        finally:
            shutil.rmtree(store, ignore_errors=True)

    def aosbuild_cached(self) -> float:
        """A run with every item already in the store: aosbuild's fixed cost (start, load, check)."""
        store = self.fresh("store-cached")
        try:
            self.aosbuild(None, store)
            return self.aosbuild(None, store)
        finally:
            shutil.rmtree(store, ignore_errors=True)

    def apt_get_download(self) -> float:
        target = self.fresh("apt")
        try:
            names = [f"{p.name}={p.version}" for p in self.result.packages]
            elapsed = run_timed(["apt-get", "download", "-q", *names], cwd=target, env=self.apt_root.env())
            got = len(list(target.glob("*.deb")))
            if got != len(names):
                raise SystemExit(f"apt-get download fetched {got} of {len(names)} packages")
            return elapsed
        finally:
            shutil.rmtree(target, ignore_errors=True)


def measure(ws: Workspace, times: int, jobs: Sequence[int]) -> dict[str, list[float]]:
    def sample() -> dict[str, float]:
        # interleaved, so a mirror or network that slows down hits every method alike
        result = {"apt_get_download_s": ws.apt_get_download()}
        for n in jobs:
            result[f"aosbuild_j{n}_s"] = ws.aosbuild_fresh(n)
        result["aosbuild_default_s"] = ws.aosbuild_fresh(None)
        result["aosbuild_cached_s"] = ws.aosbuild_cached()
        return result

    return repeat(times, sample)


def table(s: dict[str, Summary], jobs: Sequence[int], total_bytes: int, count: int) -> list[str]:
    apt = s["apt_get_download_s"]
    rows = [("`apt-get download` (one keep-alive connection per host)", "apt_get_download_s")]
    rows += [(f"aosbuild `--sources-only --download-jobs {n} --download-jobs-per-host {n}`", f"aosbuild_j{n}_s")
             for n in jobs]
    rows.append(("aosbuild `--sources-only`, default limits (8 overall, 4 per host)", "aosbuild_default_s"))
    lines = [f"### Downloading {count} packages, {total_bytes / 1e6:.1f} MB, from an empty cache", "",
             "| method | wall s, median (min-max) | MB/s (median) | speed-up vs apt-get |", "|---|---|---|---|"]
    for label, key in rows:
        lines.append(f"| {label} | {s[key].cell(2)} | {total_bytes / 1e6 / s[key].median:.1f} | "
                     f"{apt.median / s[key].median:.2f}x |")
    cached = s["aosbuild_cached_s"]
    lines.append(f"| aosbuild, every item already in the store (fixed cost) | {cached.cell(2)} | - | - |")
    return lines


def run(root: Path, times: int, quick: bool) -> Section:
    jobs = QUICK_JOBS if quick else JOBS
    result, apt_root = anyio.run(prepare, None, backend="trio")
    total = sum(p.size for p in result.packages)
    path = root / "manifest.json"
    path.write_text(json.dumps(manifest(result)))
    ws = Workspace(root, path, result, apt_root)
    ws.aosbuild_fresh(None)  # untimed: .pyc files, the page cache and the resolver warm up
    raw = measure(ws, times, jobs)
    # counted, never named: no mirror address goes into the repository, results included
    hosts = {urlsplit(p.url).netloc for p in result.packages}
    s = summarise(raw)
    apt, default = s["apt_get_download_s"], s["aosbuild_default_s"]
    return Section(name="downloads", samples=raw, table=table(s, jobs, total, len(result.packages)),
                   headline={"apt_get_s": apt.median, "aosbuild_default_s": default.median,
                             "speedup_default": apt.median / default.median},
                   settings={"jobs": list(jobs), "variant": VARIANT, "packages": list(PACKAGES),
                             "count": len(result.packages), "bytes": total,
                             "repositories": len(result.repositories), "hosts": len(hosts)})
