"""The report as text for a terminal and as JSON for programs.

Times are seconds since the build's first record, so two reports line up whatever the clock said.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from .analysis import Analysis
from .timeline import PipelineRun, StageRun

ARROW = " \u2192 "


def seconds(value: float) -> str:
    """`0.42ms`, `312ms`, `1.23s`, `2m03.40s`, `1h02m03s`."""
    if value < 0.01:
        return f"{value * 1000:.2f}ms"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 60:
        return f"{value:.2f}s"
    minutes, rest = divmod(value, 60)
    if minutes < 60:
        return f"{int(minutes)}m{rest:05.2f}s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)}h{int(minutes):02d}m{int(rest):02d}s"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def outcome(analysis: Analysis) -> str:
    success = analysis.timeline.success
    return "the stream ends before the build did" if success is None else \
        "finished successfully" if success else "failed"


def title(analysis: Analysis) -> str:
    started = datetime.fromtimestamp(analysis.timeline.start, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{analysis.timeline.label or 'build'}: {outcome(analysis)}, started {started}"


def _table(rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip() for row in rows]


def _pipeline_row(analysis: Analysis, p: PipelineRun) -> tuple[str, ...]:
    mark = "*" if p.name in analysis.critical_path else " "
    status = p.status + (f" (resumed, {p.resumed} stages from the store)" if p.resumed else "")
    if p.start is None or p.end is None:
        return (f"{mark} {p.name}", "", "", "", "", status, (p.id or "")[:12])
    t0 = analysis.timeline.start
    return (f"{mark} {p.name}", seconds(p.start - t0), seconds(p.end - t0), seconds(p.duration),
            seconds(analysis.waits.get(p.name, 0.0)), status, (p.id or "")[:12])


def _stage_row(analysis: Analysis, s: StageRun) -> tuple[str, ...]:
    t0 = analysis.timeline.start
    return (f"    {s.type}", seconds(s.start - t0), seconds(s.end - t0), seconds(s.duration), "", s.status,
            (s.id or "")[:12])


def render_text(analysis: Analysis) -> str:
    timeline = analysis.timeline
    rows: list[tuple[str, ...]] = [("  PIPELINE / STAGE", "START", "END", "DURATION", "WAIT", "STATUS", "ID")]
    for p in timeline.pipelines:
        rows.append(_pipeline_row(analysis, p))
        rows += [_stage_row(analysis, s) for s in p.stages]
    ran = [p for p in timeline.pipelines if p.ran]
    span = analysis.span
    saved = f"{seconds(analysis.saving)} ({analysis.saving / span:.0%})" if span > 0 else "nothing"
    path = (f"{ARROW.join(analysis.critical_path)} (marked *): the slowest chain of dependent pipelines"
            if analysis.critical_path else "none: nothing ran")
    summary = [
        ("wall time", seconds(analysis.wall), "from the build's first record to its last"),
        ("busy time", seconds(analysis.busy), f"the durations of the {plural(len(ran), 'pipeline')} that ran, summed"),
        ("parallelism", f"{analysis.parallelism:.2f}", "busy time / wall time"),
        ("critical path", seconds(analysis.critical_length), path),
        ("perfect schedule", seconds(analysis.critical_length),
         f"with unbounded slots, against {seconds(span)} from the first start to the last end: saves {saved}"),
    ]
    cached = [p.name for p in timeline.pipelines if p.status == "cached"]
    if cached:
        summary.append(("cached", str(len(cached)), f"in the store already, not built: {', '.join(cached)}"))
    if analysis.not_in_stream:
        summary.append(("not in the stream", str(len(analysis.not_in_stream)),
                        f"in the manifest, never mentioned (in the store, not needed, or after the stream's end): "
                        f"{', '.join(analysis.not_in_stream)}"))
    label_width = max(len(label) for label, _, _ in summary)
    value_width = max(len(value) for _, value, _ in summary)
    lines = [title(analysis), "", *_table(rows, right={1, 2, 3, 4}), ""]
    lines += [f"{label.ljust(label_width)}  {value.rjust(value_width)}  {note}" for label, value, note in summary]
    lines += ["", f"DAG: {analysis.dag.how}."]
    if timeline.skipped:
        lines.append(f"Skipped {plural(timeline.skipped, 'line')} of the stream that held no record.")
    return "\n".join(lines) + "\n"


def _t(value: float) -> float:
    return round(value, 6)


def as_json(analysis: Analysis) -> dict[str, Any]:
    timeline = analysis.timeline
    t0 = timeline.start

    def stage(s: StageRun) -> dict[str, Any]:
        return {"type": s.type, "id": s.id, "start": _t(s.start - t0), "end": _t(s.end - t0),
                "duration": _t(s.duration),
                "reported_duration": _t(s.reported) if s.reported is not None else None, "status": s.status}

    def pipeline(p: PipelineRun) -> dict[str, Any]:
        ran = p.start is not None and p.end is not None
        return {"name": p.name, "id": p.id, "kind": p.kind, "status": p.status,
                "start": _t(p.start - t0) if p.start is not None else None,
                "end": _t(p.end - t0) if p.end is not None else None,
                "duration": _t(p.duration) if ran else None,
                "wait": _t(analysis.waits[p.name]) if p.name in analysis.waits else None,
                "critical": p.name in analysis.critical_path, "resumed_stages": p.resumed,
                "stages": [stage(s) for s in p.stages]}

    return {
        "label": timeline.label, "success": timeline.success, "started_at": timeline.start,
        "wall": _t(analysis.wall), "busy": _t(analysis.busy), "parallelism": round(analysis.parallelism, 4),
        "span": _t(analysis.span),
        "critical_path": {"pipelines": list(analysis.critical_path), "duration": _t(analysis.critical_length),
                          "saving": _t(analysis.saving)},
        "dependencies": {"inferred": analysis.dag.inferred, "how": analysis.dag.how,
                         "edges": {name: list(deps) for name, deps in analysis.dag.edges.items()}},
        "cached": [p.name for p in timeline.pipelines if p.status == "cached"],
        "not_in_stream": list(analysis.not_in_stream),
        "pipelines": [pipeline(p) for p in timeline.pipelines],
        "records": timeline.records, "skipped": timeline.skipped,
    }


def render_json(analysis: Analysis) -> str:
    return json.dumps(as_json(analysis), indent=2) + "\n"
