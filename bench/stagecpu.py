"""CPU and wall time per stage of one or more aosbuild trees side by side, against bare bwrap, interleaved.

CPU is `perf stat`'s task-clock over every process of a run (the sandbox's too, which getrusage misses:
bwrap never reaps them); per stage = (21-stage build - 1-stage build) / 20, each on an empty store on
tmpfs; the floor is 20 bare `bwrap ... python3 -S -c pass` (the stage's namespaces) from one shell. Ratios
are taken per repetition, then the median. Wall time is taken from the same runs (the issue's must-hold
is in wall time: (20-stage - 1-stage) / 19 against a bare run; 21 and 1 here, the same thing). Compare a
change against its base in one run, e.g. with the base extracted by `git archive BASE | tar -x -C /dev/shm/base`:

    .venv/bin/python bench/stagecpu.py --repeat 5 /dev/shm/base .
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import FAST_TMP, timed_cpu_ms
from engine import BWRAP_ARGV, noop_manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("trees", nargs="+", type=Path, help="checkouts to run `python -m aosbuild` in")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aosbuild-stagecpu-", dir=FAST_TMP))
    manifests = {}
    for n in (1, 21):
        manifests[n] = root / f"noop-{n}.json"
        manifests[n].write_text(json.dumps(noop_manifest(n)))
    builds = 0

    def build(tree: Path, n: int) -> tuple[float, float]:
        nonlocal builds
        builds += 1
        store = root / f"store-{builds}"
        try:
            return timed_cpu_ms([sys.executable, "-m", "aosbuild", "--store", os.fspath(store), "-q",
                                 os.fspath(manifests[n])], cwd=tree.resolve())
        finally:
            shutil.rmtree(store, ignore_errors=True)

    bare: dict[str, list[float]] = {"wall": [], "CPU": []}
    per: dict[Path, dict[str, list[tuple[float, float]]]] = {tree: {"wall": [], "CPU": []} for tree in args.trees}
    try:
        for tree in args.trees:  # untimed: bytecode, page cache
            build(tree, 1)
        for _ in range(args.repeat):
            floor = [t / 20 for t in timed_cpu_ms(["sh", "-c", " && ".join([shlex.join(BWRAP_ARGV)] * 20)])]
            for kind, value in zip(bare, floor, strict=True):
                bare[kind].append(value)
            for tree in args.trees:
                many, one = build(tree, 21), build(tree, 1)
                for i, kind in enumerate(per[tree]):
                    stage = (many[i] - one[i]) / 20
                    per[tree][kind].append((stage, stage / floor[i]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for kind, values in bare.items():
        print(f"bare bwrap, {kind} per run: median {statistics.median(values):.2f} ms "
              f"({', '.join(f'{b:.1f}' for b in values)})")
    for tree, kinds in per.items():
        for kind, samples in kinds.items():
            print(f"{tree}: {kind} per stage median {statistics.median(s for s, _ in samples):.2f} ms, "
                  f"/ bare median {statistics.median(r for _, r in samples):.2f}x "
                  f"({', '.join(f'{r:.2f}' for _, r in samples)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
