"""Debian image scenario: the README's main job, cold and warm, each next to its floor.

Cold: `aosbuild --export qcow2` of `aosbuild sample debian` on a store that has the sources but no
objects (downloads are the downloads scenario's subject). Its baseline is mmdebstrap installing the
image's package set from a local repository of the same .debs, run directly on the host: the single step
no tool that installs those packages with dpkg can skip; everything aosbuild does beyond it (the build
root, configuration, the initramfs, the disk, the qcow2) shows as the difference.

Warm: the same command again on the same store, into a new output directory: every pipeline is cached and
only the qcow2 is copied out. Its baseline is aosbuild's startup on an empty manifest.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from common import (
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

ITEMS = Path("sources") / "org.osbuild.files"  # where a store keeps org.osbuild.curl items


def os_install_stage(manifest: dict[str, Any]) -> dict[str, Any]:
    """The stage that installs the image's packages: the os pipeline's first."""
    os_pipeline = next(p for p in manifest["pipelines"] if p["name"] == "os")
    stage: dict[str, Any] = os_pipeline["stages"][0]
    assert stage["type"] == "org.aosbuild.debian.install", stage["type"]
    return stage


def mmdebstrap_argv(stage: dict[str, Any], repo: Path, target: Path) -> list[str]:
    """mmdebstrap as org.aosbuild.debian.install runs it, so the baseline installs exactly the same.

    A copy on purpose (the stage is a sandbox script, not a module): when the stage's call changes, change this.
    """
    options = stage["options"]
    return ["mmdebstrap", "--mode=root", f"--variant={options['variant']}",
            f"--architectures={options['architecture']}", "--format=directory",
            "--aptopt=Acquire::Languages \"none\"", "--dpkgopt=force-unsafe-io",
            f"--include={','.join(options['packages'])}", options["suite"], os.fspath(target),
            f"deb [trusted=yes] copy://{repo} ./"]


def baseline_ms(stage: dict[str, Any], items: Path, work: Path) -> float:
    """Index the .debs as a flat repository and install them with mmdebstrap; both timed, as in the stage."""
    repo, target = work / "repo", work / "tree"
    repo.mkdir(parents=True)
    script = ['set -e; cd "$1"; shift; for deb in "$@"; do',
              '  name=$(dpkg-deb --show --showformat \'${Package}_${Version}_${Architecture}\' "$deb");',
              '  ln -s "$deb" "$(printf %s "$name" | sed s/:/%3a/g).deb"; done;',
              'apt-ftparchive packages . > Packages;',
              f'apt-ftparchive -o APT::FTPArchive::Release::Suite={stage["options"]["suite"]} '
              f'-o APT::FTPArchive::Release::Codename={stage["options"]["suite"]} release . > Release']
    debs = [os.fspath(items / checksum) for checksum in stage["inputs"]["packages"]["references"]]
    env = dict(os.environ, INITRD="No")
    try:
        index = timed_ms(["sh", "-c", " ".join(script), "index", os.fspath(repo), *debs])
        return index + timed_ms(mmdebstrap_argv(stage, repo, target), env=env)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(root: Path, times: int, quick: bool) -> Section:
    manifest_path, template = root / "debian.json", root / "template"
    write_sample(manifest_path)
    sources_store(template, manifest_path)
    manifest = json.loads(manifest_path.read_text())
    stage = os_install_stage(manifest)
    empty = root / "empty.json"
    empty.write_text(json.dumps({"version": "2"}))
    counter = itertools.count()

    def sample() -> dict[str, float]:
        n = next(counter)
        store = root / f"store-{n}"
        subprocess.run(["cp", "-a", "--reflink=auto", template, store], check=True)
        build = aosbuild("--store", store, "-q", "--export", "qcow2")
        try:
            cold = timed_ms([*build, "--output-directory", f"{root}/out-{n}-cold", os.fspath(manifest_path)])
            warm = timed_ms([*build, "--output-directory", f"{root}/out-{n}-warm", os.fspath(manifest_path)])
            startup = timed_ms(aosbuild("--store", store, "-q", empty))
        finally:
            for path in (store, root / f"out-{n}-cold", root / f"out-{n}-warm"):
                shutil.rmtree(path, ignore_errors=True)
        floor = baseline_ms(stage, template / ITEMS, root / f"mmdebstrap-{n}")
        return {"cold_ms": cold, "mmdebstrap_ms": floor, "cold_over_mmdebstrap_ms": cold - floor,
                "warm_ms": warm, "startup_ms": startup, "warm_over_startup_ms": warm - startup}

    raw = in_seconds(repeat(times, sample))
    shutil.rmtree(template, ignore_errors=True)
    s = summarise(raw)
    table = summary_table(
        f"### Debian 12 image, `aosbuild sample debian` to qcow2 ({len(stage['inputs']['packages']['references'])}"
        " packages in the image)",
        "s", [("**cold: empty object store, sources present**", s["cold_s"]),
              ("mmdebstrap of the image's packages from the same .debs (indexing included)", s["mmdebstrap_s"]),
              ("cold - mmdebstrap: everything else aosbuild does", s["cold_over_mmdebstrap_s"]),
              ("**warm: the same build again, every pipeline cached, qcow2 exported**", s["warm_s"]),
              ("aosbuild startup, empty manifest", s["startup_s"]),
              ("warm - startup", s["warm_over_startup_s"])], digits=2)
    return Section(name="debian", samples=raw, table=table,
                   headline={"cold_s": s["cold_s"].median, "mmdebstrap_s": s["mmdebstrap_s"].median,
                             "warm_s": s["warm_s"].median},
                   settings={"packages": len(stage["inputs"]["packages"]["references"]),
                             "export": "qcow2", "suite": stage["options"]["suite"]})


def cached(root: Path, times: int, quick: bool) -> Section:
    """The README's command run again: every pipeline cached, the qcow2 exported into the output directory
    that holds it from the run before (the export is kept: `exportmarks`), next to the same into a new
    output directory (the qcow2 is copied) and to start-up on an empty manifest, interleaved."""
    manifest_path, store, out = root / "debian.json", root / "store", root / "output"
    write_sample(manifest_path)
    build = aosbuild("--store", store, "-q", "--export", "qcow2")
    subprocess.run([*build, "--output-directory", out, manifest_path], check=True)  # untimed: the cold build
    empty = root / "empty.json"
    empty.write_text(json.dumps({"version": "2"}))
    counter = itertools.count()

    def sample() -> dict[str, float]:
        fresh = root / f"out-{next(counter)}"
        try:
            startup = timed_ms(aosbuild("--store", store, "-q", empty))
            same = timed_ms([*build, "--output-directory", os.fspath(out), os.fspath(manifest_path)])
            new = timed_ms([*build, "--output-directory", os.fspath(fresh), os.fspath(manifest_path)])
        finally:
            shutil.rmtree(fresh, ignore_errors=True)
        return {"startup_ms": startup, "same_ms": same, "same_over_startup_ms": same - startup,
                "new_ms": new, "new_over_startup_ms": new - startup}

    raw = repeat(times, sample)
    s = summarise(raw)
    table = summary_table(
        "### The README sample fully cached, qcow2 exported (goal: start-up + 0.2 s)", "ms",
        [("aosbuild start-up, empty manifest", s["startup_ms"]),
         ("**again into the same output directory (the export there kept)**", s["same_ms"]),
         ("same directory - start-up", s["same_over_startup_ms"]),
         ("into a new output directory (the qcow2 copied)", s["new_ms"]),
         ("new directory - start-up", s["new_over_startup_ms"])], digits=0)
    return Section(name="cached-sample", samples=raw, table=table,
                   headline={"same_over_startup_ms": s["same_over_startup_ms"].median,
                             "new_over_startup_ms": s["new_over_startup_ms"].median},
                   settings={"export": "qcow2"})
