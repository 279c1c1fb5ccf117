"""Remote cache scenario: the README's sample pulled from a registry into an empty store, next to building it.

Setup, untimed: `aosbuild sample debian`, its sources fetched into a template store, and a registry of the
bench's own (Debian's docker-registry on 127.0.0.1, htpasswd auth: tests/registry.py), fresh for every
repetition so that every push is a real one. Then, back to back:

- cold: `--export qcow2` on a copy of the template (sources present, no objects): the build to beat;
- cold and push: the same on another copy with `--cache-remote` (`--cache-push pipelines`): what pushing
  adds to a build (writing the layers and uploading them);
- pulled: `--export qcow2 --cache-remote` on an empty store (no sources either): an empty machine of the
  fleet. It pulls the qcow2 pipeline alone (its tree is what it exports; nothing else is needed);
- bytes: what went to the registry (the blobs in its storage) and what came back (the pull's log line).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

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

sys.path.insert(0, os.fspath(REPO))
from tests.registry import run_registry, write_auth_file  # the tests' registry, as they run it

REPOSITORY = "aosbuild/bench"
SIZE = re.compile(r"\(\d+ layers, ([0-9.]+) (B|KiB|MiB|GiB) pulled\)")
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def pulled_bytes(output: str) -> float:
    return sum(float(n) * UNITS[unit] for n, unit in SIZE.findall(output))


def storage_bytes(storage: Path) -> int:
    return sum(p.stat().st_size for p in storage.rglob("data") if p.is_file() and "blobs" in p.parts)


def run(root: Path, times: int, quick: bool) -> Section:
    manifest = root / "debian.json"
    template = root / "template"
    write_sample(manifest)
    sources_store(template, manifest)
    counter = itertools.count()

    def sample() -> dict[str, float]:
        n = next(counter)
        work = root / f"remote-{n}"
        work.mkdir()
        try:
            with run_registry(work / "registry") as registry:
                auth = write_auth_file(work / "auth.json", registry.host)
                env = dict(BENCH_ENV, REGISTRY_AUTH_FILE=os.fspath(auth))
                ref = f"{registry.host}/{REPOSITORY}"
                for name in ("cold", "push"):
                    subprocess.run(["cp", "-a", "--reflink=auto", template, work / name], check=True)
                cold = timed_ms([*aosbuild("--store", work / "cold", "-q", "--export", "qcow2", "--output-directory",
                                           work / "out-cold"), os.fspath(manifest)], env=env)
                push = timed_ms([*aosbuild("--store", work / "push", "-q", "--export", "qcow2", "--output-directory",
                                           work / "out-push", "--cache-remote", ref), os.fspath(manifest)], env=env)
                pushed = storage_bytes(registry.storage)
                start = time.perf_counter()
                proc = subprocess.run([*aosbuild("--store", work / "pull", "--monitor", "log", "--export", "qcow2",
                                                 "--output-directory", work / "out-pull", "--cache-remote", ref),
                                       os.fspath(manifest)], env=env, cwd=REPO, capture_output=True, text=True)
                pull = (time.perf_counter() - start) * 1000
                if proc.returncode != 0 or "remote cache hit" not in proc.stdout:
                    raise SystemExit(f"the pull failed or pulled nothing:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
                if ": 0 stages built" not in proc.stderr:
                    raise SystemExit(f"the pull ran stages:\n{proc.stderr[-2000:]}")
                # the pulled image is the pushed one, byte for byte
                same = subprocess.run(["cmp", work / "out-push/qcow2/disk.qcow2", work / "out-pull/qcow2/disk.qcow2"],
                                      capture_output=True).returncode == 0
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {"cold_ms": cold, "push_ms": push, "push_cost_ms": push - cold, "pull_ms": pull,
                "pull_over_cold": pull / cold, "pushed_mib": pushed / (1 << 20),
                "pulled_mib": pulled_bytes(proc.stdout) / (1 << 20), "qcow2_differs": 0.0 if same else 1.0}

    raw = repeat(times, sample)
    shutil.rmtree(template, ignore_errors=True)
    samples = in_seconds(raw)
    s = summarise(samples)
    table = summary_table(
        "### Remote cache: `aosbuild sample debian` to qcow2 pulled from a local registry vs built cold", "",
        [("**cold: empty object store, sources present** (s)", s["cold_s"]),
         ("cold, then pushed with `--cache-remote` (s)", s["push_s"]),
         ("what the push adds (s)", s["push_cost_s"]),
         ("**pulled: empty store, no sources, `--cache-remote`** (s)", s["pull_s"]),
         ("pulled / cold", s["pull_over_cold"]),
         ("MiB pushed (blobs in the registry)", s["pushed_mib"]),
         ("MiB pulled", s["pulled_mib"])], digits=2)
    return Section(name="remote", samples=samples,
                   table=table, headline={"pull_s": s["pull_s"].median, "pull_over_cold": s["pull_over_cold"].median},
                   settings={"export": "qcow2", "push": "pipelines"})
