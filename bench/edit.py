"""Edit scenario: the loop people live in, change one thing in the manifest and rebuild the image.

`aosbuild sample debian` is built cold (to qcow2, sources present), then rebuilt after each of three
edits, each from a copy of that cold store: (a) the hostname, (b) the user's password, (c) the package
list (one package fewer: the install stage and everything after it run again, the build root does not).
Every stage is a layer in the store, so a rebuild resumes at the first stage the edit changed. The store
is on tmpfs (`FAST_TMP`) and, with `--disk`-like settings (`store_dir`), on the root disk.

The cold build is also timed with `AOSBUILD_FLAT=1` (trees in one plain directory, as before layers), in
the same run, so that what layers cost a cold build shows. With `AOSBUILD_BENCH_BASELINE=DIR` (a copy of
an earlier commit's tree, e.g. `git archive COMMIT | tar x -C DIR`) each repetition also times the cold
build, layered, with the aosbuild of DIR (run from there, with the same interpreter), between the two.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    BENCH_ENV,
    REPO,
    Section,
    aosbuild,
    in_seconds,
    repeat,
    sources_store,
    summarise,
    summary_table,
    timed_ms,
    write_sample,
)

DROPPED_PACKAGE = "libnss-myhostname"  # (c): the image without it still builds and boots
BASELINE_ENV = "AOSBUILD_BENCH_BASELINE"


def stage_of(manifest: dict[str, Any], pipeline: str, type_: str) -> dict[str, Any]:
    stages = next(p for p in manifest["pipelines"] if p["name"] == pipeline)["stages"]
    found: dict[str, Any] = next(s for s in stages if s["type"] == type_)
    return found


def password_hash(password: str) -> str:
    from aosbuild.samples import password_hash as sample_hash

    return sample_hash(password)


def edits(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The three edited manifests, by name."""
    hostname = copy.deepcopy(manifest)
    stage_of(hostname, "os", "org.osbuild.hostname")["options"]["hostname"] = "edited"
    password = copy.deepcopy(manifest)
    users = stage_of(password, "os", "org.osbuild.users")["options"]["users"]
    for user in users.values():
        user["password"] = password_hash("edited")
    packages = copy.deepcopy(manifest)
    names = stage_of(packages, "os", "org.aosbuild.debian.install")["options"]["packages"]
    names.remove(DROPPED_PACKAGE)
    return {"hostname": hostname, "password": password, "packages": packages}


def run_in(store_dir: Path, times: int, quick: bool) -> Section:
    """The scenario with its stores in `store_dir`."""
    root = Path(tempfile.mkdtemp(prefix="aosbuild-bench-edit-", dir=store_dir))
    try:
        return _run(root, times, quick, where="tmpfs" if str(store_dir).startswith("/dev/shm") else "root disk")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(root: Path, times: int, quick: bool, *, where: str) -> Section:
    manifest_path, template = root / "debian.json", root / "template"
    write_sample(manifest_path)
    sources_store(template, manifest_path)
    manifest = json.loads(manifest_path.read_text())
    edited = {}
    for name, m in edits(manifest).items():
        edited[name] = root / f"{name}.json"
        edited[name].write_text(json.dumps(m))
    counter = itertools.count()

    baseline = Path(os.environ[BASELINE_ENV]).resolve() if os.environ.get(BASELINE_ENV) else None

    def build(store: Path, path: Path, out: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> float:
        return timed_ms([*aosbuild("--store", store, "-q", "--export", "qcow2", "--output-directory",
                                   root / out), path], env=env, cwd=cwd)

    def sample() -> dict[str, float]:
        n = next(counter)
        cold_store, flat_store = root / f"cold-{n}", root / f"flat-{n}"
        results: dict[str, float] = {}
        try:
            subprocess.run(["cp", "-a", "--reflink=auto", template, flat_store], check=True)
            results["cold_flat_ms"] = build(flat_store, manifest_path, f"out-{n}-flat",
                                            env=dict(BENCH_ENV, AOSBUILD_FLAT="1"))
            shutil.rmtree(flat_store)
            if baseline is not None:
                base_store = root / f"base-{n}"
                subprocess.run(["cp", "-a", "--reflink=auto", template, base_store], check=True)
                results["cold_baseline_ms"] = build(base_store, manifest_path, f"out-{n}-base", cwd=baseline)
                shutil.rmtree(base_store)
            subprocess.run(["cp", "-a", "--reflink=auto", template, cold_store], check=True)
            results["cold_ms"] = build(cold_store, manifest_path, f"out-{n}-cold")
            results["cached_ms"] = build(cold_store, manifest_path, f"out-{n}-cached")
            for name, path in edited.items():
                store = root / f"{name}-{n}"
                subprocess.run(["cp", "-a", "--reflink=auto", cold_store, store], check=True)
                try:
                    results[f"{name}_ms"] = build(store, path, f"out-{n}-{name}")
                finally:
                    shutil.rmtree(store, ignore_errors=True)
        finally:
            for path in root.glob(f"*-{n}*"):
                shutil.rmtree(path, ignore_errors=True)
        return results

    raw = in_seconds(repeat(times, sample))
    # what layers cost a cold build, per repetition (its runs were back to back), then summarised
    raw["cold_over_flat_x"] = [c / f for c, f in zip(raw["cold_s"], raw["cold_flat_s"], strict=True)]
    if baseline is not None:
        raw["baseline_over_flat_x"] = [b / f for b, f in zip(raw["cold_baseline_s"], raw["cold_flat_s"], strict=True)]
    s = summarise(raw)
    table = summary_table(
        f"### Edit and rebuild `aosbuild sample debian` to qcow2, store on {where}", "s",
        [("cold: empty object store, sources present (layers)", s["cold_s"]),
         ("cold, `AOSBUILD_FLAT=1` (one plain directory per pipeline, as before layers)", s["cold_flat_s"]),
         *([(f"cold, layers, the aosbuild of {BASELINE_ENV}", s["cold_baseline_s"])] if baseline else []),
         ("cold layers / cold flat, per repetition (x)", s["cold_over_flat_x"]),
         *([(f"cold layers of {BASELINE_ENV} / cold flat, per repetition (x)", s["baseline_over_flat_x"])]
           if baseline else []),
         ("cached: the same build again", s["cached_s"]),
         ("**(a) hostname changed**, from the cold store", s["hostname_s"]),
         ("**(b) the user's password changed**, from the cold store", s["password_s"]),
         (f"**(c) the package list changed** (without {DROPPED_PACKAGE}), from the cold store", s["packages_s"])],
        digits=2)
    key = "" if where == "tmpfs" else "_disk"
    return Section(name=f"edit{key}", samples=raw, table=table,
                   headline={f"hostname{key}_s": s["hostname_s"].median, f"password{key}_s": s["password_s"].median,
                             f"packages{key}_s": s["packages_s"].median, f"cold{key}_s": s["cold_s"].median,
                             f"cold_over_flat{key}_x": s["cold_over_flat_x"].median,
                             f"cold_flat{key}_s": s["cold_flat_s"].median},
                   settings={"store": where, "dropped": DROPPED_PACKAGE,
                             "baseline": str(baseline) if baseline else None})


def run(root: Path, times: int, quick: bool) -> Section:
    """On tmpfs (`root`, the suite's temporary directory)."""
    return _run(root, times, quick, where="tmpfs")


def run_disk(root: Path, times: int, quick: bool) -> Section:
    """With the stores on the root disk (a directory under /var/tmp)."""
    return run_in(Path("/var/tmp"), times, quick)


SCENARIOS: dict[str, Callable[[Path, int, bool], Section]] = {"edit": run, "edit-disk": run_disk}
