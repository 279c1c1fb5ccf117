"""`aosbuild report STREAM|--last`: where a build's time went, from its `--monitor jsonseq` stream.

`--last` reads the stream the store keeps of its last build, so nothing needs saving beforehand.

Per pipeline and stage: start, end, duration, cached or not; the achieved parallelism; and the critical
path through the pipelines' DAG with what a perfect scheduler could have saved. Reads osbuild's streams
as well as aosbuild's. The stream is read by `timeline`, the schedule judged by `analysis`, and shown by
`render` (text, JSON) and `svg` (a Gantt chart, alone or in an HTML page).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ManifestError
from ..formats import load
from ..library import Library
from ..loading import parse
from ..manifest import Manifest
from .analysis import Analysis, analyse, inferred_dag, manifest_dag
from .render import render_json, render_text
from .svg import render_html, render_svg
from .timeline import StreamError, Timeline, read_timeline

RENDERERS = {"text": render_text, "json": render_json, "svg": render_svg, "html": render_html}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aosbuild report",
        description="Where a build's time went: per pipeline and stage timings, parallelism and the critical "
                    "path, from a --monitor jsonseq stream of aosbuild or osbuild.")
    p.add_argument("stream", metavar="STREAM", nargs="?",
                   help="the JSON-seq stream, or - for standard input (or --last)")
    p.add_argument("--last", action="store_true",
                   help="the last build on the store, from the stream the store keeps of its recent builds")
    p.add_argument("--store", metavar="DIR",
                   help="the store whose last build --last reports (default: .osbuild); implies --last")
    p.add_argument("--manifest", metavar="MANIFEST",
                   help="the manifest that was built: its dependencies make the critical path exact "
                        "(without it they are inferred from the timing)")
    p.add_argument("--format", choices=tuple(RENDERERS), default="text",
                   help="text (default), json, svg (a Gantt chart) or html (the chart and the table)")
    p.add_argument("--output", "-o", metavar="FILE", help="write the report here instead of standard output")
    return p


def report(timeline: Timeline, manifest: Manifest | None = None, manifest_name: str = "") -> Analysis:
    dag = manifest_dag(manifest, timeline, manifest_name) if manifest else inferred_dag(timeline)
    return analyse(timeline, dag, manifest)


def read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    return Path(path).read_text(errors="replace")


def last_stream(store: str) -> str:
    """The stream of the newest build the store kept (`history.py`)."""
    from ..history import History

    path = History(Path(store)).last_stream()
    if path is None:
        raise FileNotFoundError(f"the store {store} keeps no build yet: build a manifest with "
                                f"`aosbuild --store {store} MANIFEST` first, or give a saved stream")
    return str(path)


def main(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.stream is not None and (args.last or args.store):
        p.error("give a STREAM or --last/--store, not both")
    if args.stream is None and not (args.last or args.store):
        p.error("give a STREAM file (from --monitor jsonseq), or --last for the last build on the store")
    if args.stream is None:
        try:
            args.stream = last_stream(args.store or ".osbuild")
        except FileNotFoundError as exc:
            sys.stderr.write(f"Error: {exc}\n")
            return 1
    try:
        text = read_text(args.stream)
    except OSError as exc:
        sys.stderr.write(f"Error: cannot read {args.stream}: {exc.strerror or exc}; give a stream saved "
                         "with `aosbuild --monitor jsonseq ... > FILE`, or --last for the store's last build\n")
        return 2
    manifest = None
    if args.manifest:
        try:
            # the ids and references are what matter here, so stages this library lacks are fine
            manifest = load(parse(read_text(args.manifest), args.manifest), Library(), args.manifest,
                            validate=False)
        except OSError as exc:
            sys.stderr.write(f"Error: cannot read {args.manifest}: {exc.strerror or exc}; check the path, or "
                             "leave --manifest out (the dependencies are then inferred from the timing)\n")
            return 2
        except ManifestError as exc:
            sys.stderr.write(exc.render())
            return 2
    try:
        timeline = read_timeline(text)
    except StreamError:
        sys.stderr.write(f"Error: {args.stream} holds no monitor records: make it with "
                         "`aosbuild --monitor jsonseq` (or osbuild's --monitor=JSONSeqMonitor)\n")
        return 1
    output = RENDERERS[args.format](report(timeline, manifest, args.manifest or ""))
    if args.output:
        Path(args.output).write_text(output)
    else:
        sys.stdout.write(output)
    return 0


__all__ = ["Analysis", "Timeline", "main", "read_timeline", "report"]
