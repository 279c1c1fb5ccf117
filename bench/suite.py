"""aosbuild's benchmark suite: every scenario, each next to its baseline, with the history of past runs.

    .venv/bin/python bench/suite.py                     # everything, about 25 minutes on 2 CPUs
    .venv/bin/python bench/suite.py --only overhead,rebuild --repeat 3
    .venv/bin/python bench/suite.py --quick             # smoke run of every scenario
    .venv/bin/python bench/suite.py --update-readme     # also rewrite bench/README.md's results

Prints one Markdown table per scenario and writes every sample, with the commit and the machine, to
bench/results/suite-<UTC timestamp>.json. `--update-readme` puts this run's tables into bench/README.md and
rebuilds its history table from every suite-*.json there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import baseline
import debian
import dispatch
import downloads
import edit
import engine
import remote
import store
from common import BENCH, FAST_TMP, REPO, RESULTS, Section, machine

# name -> (run(root, repetitions, quick), default repetitions); in the order they run
SCENARIOS: dict[str, tuple[Callable[[Path, int, bool], Section], int]] = {
    "overhead": (engine.overhead, 5),
    "concurrency": (engine.concurrency, 5),
    "rebuild": (store.rebuild, 5),
    "commit": (store.commit_export, 5),
    "downloads": (downloads.run, 5),
    "debian": (debian.run, 3),  # a cold build takes minutes
    "cached-sample": (debian.cached, 7),  # one untimed cold build, then cached rebuilds
    "osbuild": (baseline.run, 3),  # osbuild 191 takes about 12 s for the generic manifest
    "edit": (edit.run, 3),      # a cold build (layered and flat) and three rebuilds per repetition
    "edit-disk": (edit.run_disk, 3),
    "remote": (remote.run, 3),  # three cold builds of the sample per repetition
    "dispatch": (dispatch.run, 3),  # N sleeping pipelines on 1, 2, 3 Dask workers
}
README = BENCH / "README.md"
LATEST = ("<!-- latest run: written by bench/suite.py --update-readme -->", "<!-- end of latest run -->")
HISTORY = ("<!-- history: written by bench/suite.py --update-readme -->", "<!-- end of history -->")
# (scenario, headline key, column title, format) for the history table
COLUMNS = [
    ("overhead", "startup_ms", "startup ms", "{:.0f}"),
    ("overhead", "overhead_per_stage_ms", "per stage ms", "{:.0f}"),
    ("overhead", "per_stage_ratio", "per stage / bare bwrap", "{:.2f}x"),
    ("overhead", "cpu_per_stage_ratio", "CPU per stage / bare bwrap", "{:.2f}x"),
    ("concurrency", "speedup_n4", "4 pipelines speed-up", "{:.2f}x"),
    ("rebuild", "cached_over_startup_ms", "cached rebuild - startup ms", "{:.0f}"),
    ("commit", "commit_ms", "commit 1 GiB ms", "{:.0f}"),
    ("commit", "cp_a_ms", "`cp -a` 1 GiB ms", "{:.0f}"),
    ("downloads", "speedup_default", "downloads vs apt-get", "{:.2f}x"),
    ("debian", "cold_s", "Debian cold s", "{:.1f}"),
    ("debian", "mmdebstrap_s", "mmdebstrap s", "{:.1f}"),
    ("debian", "warm_s", "Debian warm s", "{:.2f}"),
    ("cached-sample", "same_over_startup_ms", "sample cached, same outdir - startup ms", "{:.0f}"),
    ("osbuild", "version_ratio", "`--version` / osbuild", "{:.2f}x"),
    ("osbuild", "inspect_ratio", "`--inspect` / osbuild", "{:.2f}x"),
    ("osbuild", "noops_ratio", "20 noops / osbuild", "{:.2f}x"),
    ("osbuild", "generic_cold_ratio", "generic cold / osbuild", "{:.2f}x"),
    ("edit", "hostname_s", "edit hostname s", "{:.1f}"),
    ("edit", "password_s", "edit password s", "{:.1f}"),
    ("edit", "packages_s", "edit packages s", "{:.1f}"),
    ("remote", "pull_s", "sample pulled s", "{:.1f}"),
    ("remote", "pull_over_cold", "pulled / cold", "{:.2f}x"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", default=",".join(SCENARIOS), metavar="LIST",
                        help=f"scenarios to run, comma-separated (default: all of {', '.join(SCENARIOS)})")
    parser.add_argument("--repeat", type=int, default=None, metavar="N",
                        help="repetitions of every scenario (default: 5, 3 for debian; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 repetitions, smaller inputs")
    parser.add_argument("--update-readme", action="store_true",
                        help="write this run's tables and the history into bench/README.md")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; there are {', '.join(SCENARIOS)}")
    if args.repeat is not None and args.repeat < 1:
        parser.error("repetitions must be at least 1")
    return args


def repetitions(args: argparse.Namespace, name: str) -> int:
    if args.repeat is not None:
        return int(args.repeat)
    return 2 if args.quick else SCENARIOS[name][1]


def describe(info: dict[str, Any]) -> str:
    return (f"{info['cpu_model']}, {info['cpus']} CPUs, kernel {info['kernel']}, Python {info['python']}, "
            f"commit {(info['commit'] or 'unknown')[:12]}{' (dirty)' if info['dirty'] else ''}, "
            f"load average at the start {info['load_average'][0]:g}")


def render(report: dict[str, Any]) -> list[str]:
    """This run's tables, headed by where and when they were measured."""
    lines = [f"Run {report['started']} (`bench/results/suite-{report['started']}.json`, "
             f"{report['duration_s'] / 60:.0f} min{', quick' if report['quick'] else ''}); "
             f"{describe(report['machine'])}. Median (min-max) over the repetitions given per scenario."]
    for section in report["scenarios"].values():
        lines += ["", *section["table"], "", f"({section['repetitions']} repetitions)"]
    return lines


def history_table() -> list[str]:
    """One row per full suite run in bench/results/, oldest first: how the headline numbers moved."""
    lines = ["| run | commit | " + " | ".join(title for _, _, title, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for path in sorted(RESULTS.glob("suite-*.json")):
        report = json.loads(path.read_text())
        if report.get("quick"):
            continue
        cells = []
        for scenario, key, _, fmt in COLUMNS:
            value = report["scenarios"].get(scenario, {}).get("headline", {}).get(key)
            cells.append("-" if value is None else fmt.format(value))
        commit = (report["machine"]["commit"] or "unknown")[:7] + ("+" if report["machine"]["dirty"] else "")
        lines.append(f"| {report['started']} | {commit} | " + " | ".join(cells) + " |")
    return lines


def replace_block(text: str, markers: tuple[str, str], lines: list[str]) -> str:
    start, end = text.index(markers[0]), text.index(markers[1])
    return text[:start] + markers[0] + "\n" + "\n".join(lines) + "\n" + text[end:]


def update_readme(report: dict[str, Any]) -> None:
    text = README.read_text()
    text = replace_block(text, LATEST, render(report))
    text = replace_block(text, HISTORY, history_table())
    README.write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    info = machine()  # before the run: the load average says how busy the machine was when it began
    clock = time.perf_counter()
    scenarios: dict[str, Any] = {}
    for name in args.only:
        run, _ = SCENARIOS[name]
        times = repetitions(args, name)
        print(f"running {name} ({times} repetitions)", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=FAST_TMP, prefix=f"aosbuild-bench-{name}-") as tmp:
            section = run(Path(tmp), times, args.quick)
        scenarios[name] = {"repetitions": times, "table": section.table, "headline": section.headline,
                           "settings": section.settings, "samples": section.samples,
                           "summary": {k: asdict(v) for k, v in section.summaries().items()}}
    report = {"started": started, "machine": info, "quick": args.quick,
              "duration_s": round(time.perf_counter() - clock, 1), "scenarios": scenarios}
    print("\n".join(render(report)))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"suite-{started}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nraw results: {path.relative_to(REPO)}", file=sys.stderr)
    if args.update_readme:
        update_readme(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
