"""The timeline as a Gantt chart: hand-written SVG, alone or in an HTML page with the text report.

One row per pipeline (sources too), in the order they started, cached ones last. A pipeline's bar spans
its start to its end; its stages are the darker segments inside, so the pale rest is time the pipeline
spent outside its stages (waiting for sources, restoring, committing). The critical path's pipelines are
outlined and joined by arrows. Every bar has a tooltip with its exact times.
"""

from __future__ import annotations

import itertools
import math
from html import escape

from .analysis import Analysis
from .render import ARROW, render_text, seconds, title
from .timeline import PipelineRun, StageRun

WIDTH = 1000
ROW = 30
BAR = 22
STAGE = 16
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
CHAR = 7.0      # the mean width of a 12px character, for fitting labels
BOLD = 7.8
NAME_ROOM = 82   # the label column beside the name: margins and the duration
STAGE_COLORS = ("#3b6ea5", "#5b8fc7")  # alternating, so neighbouring stages stay apart
COLORS = {"failed": "#d62f2f", "unfinished": "#9e9e9e",
          "pipeline": "#dfe7f1", "source": "#9cc98a", "critical": "#e8590c", "grid": "#e6e6e6",
          "text": "#222222", "muted": "#6b6b6b"}
PREFIXES = ("org.osbuild.", "org.aosbuild.")


def ticks(total: float, target: int = 10) -> tuple[float, list[float]]:
    """A round step (1, 2 or 5 times a power of ten, or whole minutes) giving about `target` ticks over [0, total]."""
    raw = max(total, 1e-3) / target
    if raw > 30:  # whole minutes: 1, 2, 5, 10, 15, 30, 60, ...
        minutes = (1, 2, 5, 10, 15, 30, 60, 120, 240, 480, 960)
        step = 60.0 * next((m for m in minutes if 60 * m >= raw), math.ceil(raw / 57600) * 960)
    else:
        magnitude = 10 ** math.floor(math.log10(raw))
        step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return step, [i * step for i in range(int(total / step + 1e-9) + 1)]


def tick_label(value: float, step: float) -> str:
    """`0 s`, `2.5 s`, `10 min`, or in milliseconds for steps under 0.1 s."""
    if step >= 60:
        return f"{value / 60:g} min"
    unit, scale = ("ms", 1000.0) if step < 0.1 else ("s", 1.0)
    digits = max(0, -math.floor(math.log10(step * scale) + 1e-9))
    return f"{value * scale:.{digits}f} {unit}"


def short(stage_type: str) -> str:
    for prefix in PREFIXES:
        if stage_type.startswith(prefix):
            return stage_type.removeprefix(prefix)
    return stage_type


def _text(x: float, y: float, text: str, *, size: float = 12, anchor: str = "start", fill: str = COLORS["text"],
          weight: str = "normal", style: str = "normal", cls: str = "") -> str:
    attribute = f' class="{cls}"' if cls else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}" '
            f'font-weight="{weight}" font-style="{style}"{attribute}>{escape(text)}</text>')


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split(" "):
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


class _Chart:
    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        self.t0 = analysis.timeline.start
        self.rows = analysis.timeline.pipelines
        names = max((len(p.name) for p in self.rows), default=4)
        # the label column: the name (bold on the critical path), then the duration, right-aligned
        self.x0 = min(320.0, max(120.0, NAME_ROOM + BOLD * names))
        self.x1 = WIDTH - 24.0
        self.total = max(analysis.wall, max((p.end or 0.0) - self.t0 for p in self.rows) if self.rows else 0.0,
                         1e-3)
        self.notes = _wrap(f"DAG: {analysis.dag.how}.", int(WIDTH / 6.2))
        self.top = 74 + 14 * len(self.notes)   # the time axis' labels sit above the first row
        self.out: list[str] = []

    def x(self, t: float) -> float:
        return self.x0 + (t - self.t0) / self.total * (self.x1 - self.x0)

    def y(self, index: int) -> float:
        """The centre line of row `index`."""
        return self.top + 12 + ROW * index + ROW / 2

    def header(self) -> None:
        a = self.analysis
        self.out.append(_text(12, 24, title(a), size=15, weight="bold"))
        summary = (f"parallelism {a.parallelism:.2f} (busy {seconds(a.busy)} / wall {seconds(a.wall)})  \u00b7  "
                   f"critical path {ARROW.join(a.critical_path) or '-'}: {seconds(a.critical_length)}  \u00b7  "
                   f"a perfect scheduler saves {seconds(a.saving)}")
        self.out.append(_text(12, 44, summary))
        for i, line in enumerate(self.notes):
            self.out.append(_text(12, 62 + 14 * i, line, size=11, fill=COLORS["muted"]))

    def axis(self, bottom: float) -> None:
        step, values = ticks(self.total)
        for value in values:
            x = self.x(self.t0 + value)
            self.out.append(f'<line x1="{x:.1f}" y1="{self.top + 4}" x2="{x:.1f}" y2="{bottom:.1f}" '
                            f'stroke="{COLORS["grid"]}"/>')
            label = tick_label(value, step)
            self.out.append(_text(x, self.top, label, size=11, anchor="middle", fill=COLORS["muted"]))
            self.out.append(_text(x, bottom + 14, label, size=11, anchor="middle", fill=COLORS["muted"]))
        self.out.append(f'<line x1="{self.x0:.1f}" y1="{self.top + 4}" x2="{self.x0:.1f}" y2="{bottom:.1f}" '
                        f'stroke="{COLORS["muted"]}"/>')

    def row(self, index: int, p: PipelineRun) -> None:
        y = self.y(index)
        critical = p.name in self.analysis.critical_path
        color = COLORS["critical"] if critical else COLORS["text"]
        room = round((self.x0 - NAME_ROOM) / BOLD)
        name = p.name if len(p.name) <= room else p.name[: room - 1] + "\u2026"
        self.out.append(_text(12, y + 4, name, weight="bold" if critical else "normal", fill=color, cls="pipeline"))
        if p.start is None or p.end is None:
            self.out.append(_text(self.x0 - 8, y + 4, "cached", size=11, anchor="end", fill=COLORS["muted"],
                                  style="italic"))
            self.out.append(f'<rect x="{self.x0 + 2:.1f}" y="{y - BAR / 2:.1f}" width="{self.x1 - self.x0 - 2:.1f}" '
                            f'height="{BAR}" fill="url(#cached)" stroke="#c8c8c8"><title>'
                            f'{escape(p.name)}: cached, in the store already; not built</title></rect>')
            self.out.append(_text(self.x0 + 10, y + 4, "cached: in the store, not built", size=11,
                                  fill=COLORS["muted"], style="italic"))
            return
        self.out.append(_text(self.x0 - 8, y + 4, seconds(p.duration), size=11, anchor="end",
                              fill=COLORS["muted"]))
        x, w = self.x(p.start), max(self.x(p.end) - self.x(p.start), 1.5)
        fill = COLORS["source"] if p.kind == "source" else COLORS["pipeline"]
        stroke = (f'stroke="{COLORS["critical"]}" stroke-width="2.5"' if critical
                  else 'stroke="#8b9bb0" stroke-width="1"')
        wait = self.analysis.waits.get(p.name, 0.0)
        tip = (f"{p.name} ({p.kind}, {p.status}): {seconds(p.start - self.t0)} \u2192 {seconds(p.end - self.t0)}, "
               f"{seconds(p.duration)}; waited {seconds(wait)}" + ("; on the critical path" if critical else ""))
        self.out.append(f'<rect x="{x:.1f}" y="{y - BAR / 2:.1f}" width="{w:.1f}" height="{BAR}" rx="3" '
                        f'fill="{fill}" {stroke}><title>{escape(tip)}</title></rect>')
        if wait > self.total / 200:  # ready (its dependencies done) before it started: it waited for a slot
            ready = self.x(p.start - wait)
            self.out.append(f'<line x1="{ready:.1f}" y1="{y:.1f}" x2="{x:.1f}" y2="{y:.1f}" stroke="{COLORS["muted"]}" '
                            f'stroke-dasharray="2 3"/>')
            self.out.append(f'<line x1="{ready:.1f}" y1="{y - 5:.1f}" x2="{ready:.1f}" y2="{y + 5:.1f}" '
                            f'stroke="{COLORS["muted"]}"/>')
        for i, stage in enumerate(p.stages):
            self.stage(y, i, stage)
        if p.resumed:
            self.out.append(_text(x + w + 4, y + 4, f"resumed after {p.resumed} stored stages", size=10,
                                  fill=COLORS["muted"]))

    def stage(self, y: float, i: int, s: StageRun) -> None:
        x, w = self.x(s.start), max(self.x(s.end) - self.x(s.start), 1.0)
        fill = STAGE_COLORS[i % 2] if s.status == "ok" else COLORS[s.status]
        dash = ' stroke="#555" stroke-dasharray="3 2"' if s.status == "unfinished" else ""
        tip = (f"{s.type} {s.id or ''}: {seconds(s.start - self.t0)} \u2192 {seconds(s.end - self.t0)}, "
               f"{seconds(s.duration)}, {s.status}")
        self.out.append(f'<rect x="{x:.1f}" y="{y - STAGE / 2:.1f}" width="{w:.1f}" height="{STAGE}" '
                        f'fill="{fill}"{dash}><title>{escape(tip)}</title></rect>')
        label = short(s.type) + (" \u2717" if s.status == "failed" else "")
        if len(label) * 6.2 + 6 <= w:
            self.out.append(_text(x + w / 2, y + 4, label, size=10.5, anchor="middle", fill="#ffffff"))

    def arrows(self) -> None:
        index = {p.name: i for i, p in enumerate(self.rows)}
        path = self.analysis.critical_path
        for a, b in itertools.pairwise(path):
            pa, pb = self.rows[index[a]], self.rows[index[b]]
            if pa.end is None or pb.start is None:
                continue
            xa, ya = self.x(pa.end), self.y(index[a])
            xb, yb = self.x(pb.start), self.y(index[b])
            yb += -BAR / 2 if yb > ya else BAR / 2      # to the near edge of the next bar
            ya += BAR / 2 if yb > ya else -BAR / 2
            mid = (ya + yb) / 2
            self.out.append(f'<path d="M{xa:.1f},{ya:.1f} C{xa:.1f},{mid:.1f} {xb:.1f},{mid:.1f} {xb:.1f},{yb:.1f}" '
                            f'fill="none" stroke="{COLORS["critical"]}" stroke-width="1.5" '
                            f'marker-end="url(#arrow)"/>')

    def legend(self, y: float) -> None:
        rows = self.rows
        stages = [s.status for p in rows for s in p.stages]
        items = [(STAGE_COLORS[0], "stage"), (STAGE_COLORS[1], "next stage"),
                 (COLORS["pipeline"], "pipeline, outside its stages")]
        items += [(COLORS["failed"], "failed stage")] if "failed" in stages else []
        items += [(COLORS["unfinished"], "unfinished")] if "unfinished" in stages else []
        items += [(COLORS["source"], "source")] if any(p.kind == "source" for p in rows) else []
        items += [("url(#cached)", "cached")] if any(p.status == "cached" for p in rows) else []
        x = 12.0
        for fill, label in items:
            self.out.append(f'<rect x="{x:.1f}" y="{y - 10:.1f}" width="14" height="12" fill="{fill}" '
                            f'stroke="#8b9bb0" stroke-width="0.5"/>')
            self.out.append(_text(x + 19, y, label, size=11))
            x += 19 + len(label) * 6.4 + 18
        self.out.append(f'<line x1="{x:.1f}" y1="{y - 4:.1f}" x2="{x + 22:.1f}" y2="{y - 4:.1f}" '
                        f'stroke="{COLORS["muted"]}" stroke-dasharray="2 3"/>')
        self.out.append(_text(x + 27, y, "ready, not started yet", size=11))
        x += 27 + 22 * 6.4 + 18
        self.out.append(f'<rect x="{x:.1f}" y="{y - 10:.1f}" width="14" height="12" fill="none" '
                        f'stroke="{COLORS["critical"]}" stroke-width="2.5"/>')
        self.out.append(_text(x + 19, y, "critical path", size=11, fill=COLORS["critical"]))

    def render(self) -> str:
        bottom = self.top + 12 + ROW * len(self.rows) + 4
        height = bottom + 50
        self.out.append(f'<rect width="{WIDTH}" height="{height:.0f}" fill="#ffffff"/>')
        self.header()
        for i in range(1, len(self.rows), 2):  # stripes behind every other row
            if i % 2:
                self.out.append(f'<rect x="0" y="{self.y(i) - ROW / 2:.1f}" width="{WIDTH}" height="{ROW}" '
                                'fill="#f7f7f7"/>')
        self.axis(bottom)
        for i, p in enumerate(self.rows):
            self.row(i, p)
        self.arrows()
        self.legend(bottom + 38)
        defs = ('<defs><pattern id="cached" width="6" height="6" patternUnits="userSpaceOnUse" '
                'patternTransform="rotate(45)"><rect width="6" height="6" fill="#f0f0f0"/>'
                '<line x1="0" y1="0" x2="0" y2="6" stroke="#cfcfcf" stroke-width="2"/></pattern>'
                f'<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
                f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{COLORS["critical"]}"/></marker>'
                '</defs>')
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0f}" '
                f'viewBox="0 0 {WIDTH} {height:.0f}" font-family="{FONT}">\n'
                f'<title>{escape(title(self.analysis))}</title>\n{defs}\n' + "\n".join(self.out) + "\n</svg>\n")


def render_svg(analysis: Analysis) -> str:
    return _Chart(analysis).render()


def render_html(analysis: Analysis) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title(analysis))}</title>"
            "<style>body{font-family:sans-serif;margin:1.5em} pre{font-size:13px}</style></head><body>\n"
            + render_svg(analysis) + f"<pre>{escape(render_text(analysis))}</pre>\n</body></html>\n")
