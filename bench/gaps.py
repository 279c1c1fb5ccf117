"""The gaps between consecutive stages of each pipeline in `aosbuild report --format json` files.

    python3 bench/gaps.py bench/results/gap-*.json
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from typing import Any


def gaps(report: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(pipeline, the stage after the gap, gap in ms) for every pair of consecutive stages."""
    found = []
    for pipeline in report["pipelines"]:
        stages = pipeline["stages"]
        for before, after in itertools.pairwise(stages):
            found.append((pipeline["name"], after["type"], (after["start"] - before["end"]) * 1000))
    return found


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path) as f:
            found = gaps(json.load(f))
        largest = max(found, key=lambda g: g[2])
        others = [g[2] for g in found if g is not largest]
        print(f"{path}: largest {largest[2]:.1f} ms before {largest[0]}/{largest[1]}; "
              f"others max {max(others):.1f} ms, median {statistics.median(others):.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
