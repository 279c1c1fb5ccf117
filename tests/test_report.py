"""`aosbuild report`: reading osbuild's and aosbuild's streams back, the schedule analysis and its renderings."""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aosbuild import cli, monitor
from aosbuild.formats import load
from aosbuild.library import Library
from aosbuild.manifest import Manifest
from aosbuild.monitor import JsonSeqMonitor
from aosbuild.report import read_timeline, report
from aosbuild.report.render import as_json, render_text, seconds
from aosbuild.report.svg import render_html, render_svg, tick_label, ticks
from aosbuild.report.timeline import StreamError
from aosbuild.results import StageResult

from .conftest import SAMPLES, Aosbuild, check_jsonseq, manifest, pipeline, stage

SVG = "{http://www.w3.org/2000/svg}"


def tree_input(name: str) -> dict[str, Any]:
    return {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": [f"name:{name}"]}


def sleep(seconds: float, marker: str = "slept") -> dict[str, Any]:
    return stage("org.aosbuild.test.sleep", seconds=seconds, marker=marker)


def a_b_c(a: float = 1.0, b: float = 1.5, c: float = 1.0, d: float | None = 1.5) -> dict[str, Any]:
    """A, B (and D) independent; C copies A's tree, then sleeps: the slowest chain is A → C."""
    copy = {"type": "org.osbuild.copy", "inputs": {"a": tree_input("A")},
            "options": {"paths": [{"from": "input://a/", "to": "tree:///"}]}}
    pipelines = [pipeline("A", sleep(a)), pipeline("B", sleep(b)), pipeline("C", copy, sleep(c, "c"))]
    if d is not None:
        pipelines.append(pipeline("D", sleep(d, "d")))
    return manifest(*pipelines)


def loaded(description: dict[str, Any]) -> Manifest:
    return load(description, Library(), validate=False)


def svg_rows(svg: str) -> list[str]:
    """The pipeline names in the chart's label column, top to bottom."""
    root = ET.fromstring(svg)
    texts = [t for t in root.iter(f"{SVG}text") if t.get("class") == "pipeline"]
    return [t.text or "" for t in texts]


# osbuild's own stream and the hand-made one


def test_real_osbuild_stream() -> None:
    timeline = read_timeline((SAMPLES / "real.seq").read_text())
    assert timeline.label == "./manifest.json"
    assert timeline.success is True
    assert timeline.records == 22
    assert timeline.skipped == 0
    assert [(p.name, p.kind, p.status) for p in timeline.pipelines] == [
        ("source org.osbuild.curl", "source", "built"), ("build", "pipeline", "built"), ("os", "pipeline", "built")]
    build = timeline.by_name("build")
    assert build is not None
    assert build.id == "c3fa203fbe92b75be53910cd35e7d7b0263735458984d0953b65934c451cec52"
    assert [s.id for s in build.stages] == [
        "d5db2f89b3ab25e509b37f442c474bd6a2365014065fa2824fc6903b665882f7",
        "c3fa203fbe92b75be53910cd35e7d7b0263735458984d0953b65934c451cec52"]
    assert build.stages[0].reported == pytest.approx(0.0004421599996931036)
    assert build.stage_count == 2
    assert build.resumed == 0
    # "Finished pipeline build" carries the last stage's context, osbuild's "Starting pipeline os" the
    # previous pipeline's stage: the names come from the messages
    assert build.end == pytest.approx(1795421648.6576595)
    os_run = timeline.by_name("os")
    assert os_run is not None
    assert os_run.start == pytest.approx(1795421648.6580324, abs=1e-3)
    assert timeline.start == pytest.approx(1795421648.6547816)
    assert timeline.end == pytest.approx(timeline.pipelines[-1].end or 0, abs=1e-3)

    analysis = report(timeline)
    # osbuild runs one pipeline at a time: from the timing alone, everything may depend on what ran before
    assert analysis.dag.inferred
    assert analysis.critical_path == ("source org.osbuild.curl", "build", "os")
    assert analysis.parallelism < 1
    assert analysis.saving == pytest.approx(analysis.span - analysis.critical_length)


def test_synthetic_stream_resolves_abbreviated_contexts() -> None:
    timeline = read_timeline((SAMPLES / "synthetic.seq").read_text())
    assert timeline.label == "-"
    assert timeline.success is True
    build = timeline.by_name("build")
    assert build is not None
    assert build.status == "built"
    # both "Finished module" records carry only {"id": ...}: resolved through the stage's first record
    assert [(s.type, s.id, s.status, s.reported) for s in build.stages] == [
        ("org.osbuild.rpm", "1" * 64, "ok", 1.25), ("org.osbuild.selinux", "f" * 64, "ok", 0.5)]
    source = timeline.by_name("source org.osbuild.curl")
    assert source is not None
    assert source.kind == "source"
    assert source.status == "built"
    assert source.end is not None  # "Finished pipeline org.osbuild.curl", without the "source " prefix


def report_json(path: Path) -> dict[str, Any]:
    document = json.loads(json.dumps(as_json(report(read_timeline(path.read_text(errors="replace")))),
                                     allow_nan=False))  # strict JSON: no NaN gets through
    assert isinstance(document, dict)
    return document


# each broken sample is synthetic.seq with one thing broken; its report is synthetic.seq's but for these
BROKEN_DIFFERS: dict[str, dict[str, object]] = {
    # the pretty-printed first record is lost (its 16 lines are skipped): times count from the second
    "04-pretty-printed.seq": {"records": 14, "skipped": 16, "started_at": ..., "wall": ..., "parallelism": ...,
                              "pipelines": ...},
    # the last record ("manifest finished successfully") is cut off: the outcome is unknown
    "08a-truncated.seq": {"records": 14, "skipped": 1, "success": None, "wall": ..., "parallelism": ...},
    "10-nan-duration.seq": {"pipelines": ...},  # a stage's reported duration is NaN: null (below)
    "14-top-level-array.seq": {"skipped": 1},
    "15-null-record.seq": {"skipped": 1},
}


@pytest.mark.parametrize("path", sorted((SAMPLES / "broken").glob("*.seq")), ids=lambda p: p.name)
def test_broken_streams_are_read_as_the_good_one(path: Path) -> None:
    """Every broken sample is read, never refused: the report is the good stream's, with exactly the
    differences the breakage explains, and renders as text and SVG."""
    good = report_json(SAMPLES / "synthetic.seq")
    got = report_json(path)
    expected: dict[str, object] = BROKEN_DIFFERS.get(path.name, {})
    assert {key for key in good if got[key] != good[key]} == set(expected)
    assert {key: got[key] for key, value in expected.items() if value is not ...} == \
        {key: value for key, value in expected.items() if value is not ...}
    assert [(p["name"], p["status"]) for p in got["pipelines"]] == [("source org.osbuild.curl", "built"),
                                                                      ("build", "built")]
    if path.name == "10-nan-duration.seq":
        reported = [s["reported_duration"] for p in got["pipelines"] for s in p["stages"]]
        assert reported.count(None) == 1
    timeline = read_timeline(path.read_text(errors="replace"))
    assert "build" in render_text(report(timeline))
    ET.fromstring(render_svg(report(timeline)))


def test_not_a_stream() -> None:
    with pytest.raises(StreamError):
        read_timeline("hello\n\n")


# the analysis, on streams made by the real JSON-seq monitor on a fake clock


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


def drive(description: dict[str, Any], schedule: list[tuple[float, str, str]], monkeypatch: pytest.MonkeyPatch,
          *, success: bool = True) -> str:
    """A stream from JsonSeqMonitor for `schedule`: (time, "start"|"end"|"cached"|"fail", pipeline name)."""
    clock = Clock()
    monkeypatch.setattr(monitor, "time", SimpleNamespace(time=clock.time, monotonic=clock.monotonic))
    m = loaded(description)
    read_end, write_end = os.pipe()
    mon = JsonSeqMonitor(write_end)
    mon.build_started("test.json", sources=0, pipelines=len(m.pipelines))
    for at, event, name in schedule:
        clock.now = 1_800_000_000.0 + at
        p = m.by_name(name)
        assert p is not None
        if event == "cached":
            mon.pipeline_cached(p)
        elif event == "start":
            mon.pipeline_started(p, build_root="<host>", runner="org.osbuild.linux")
            mon.stage_started(p, p.stages[0])
            mon.stage_output(p, p.stages[0], "working\n")
        else:
            ok = event == "end"
            for s in p.stages:  # the stages share the pipeline's time: only the last one takes any
                if s is not p.stages[0]:
                    mon.stage_started(p, s)
                mon.stage_finished(p, s, StageResult(id=s.id, type=s.type, success=ok, output="", duration=0.0))
            mon.pipeline_finished(p, success=ok)
    mon.build_finished("test.json", success=success)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        return f.read().decode()


def test_parallel_schedule_with_the_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    description = a_b_c(d=None)
    stream = drive(description, [(0, "start", "A"), (0, "start", "B"), (1, "end", "A"), (1, "start", "C"),
                                 (1.5, "end", "B"), (2, "end", "C")], monkeypatch)
    check_jsonseq(stream)
    timeline = read_timeline(stream)
    analysis = report(timeline, loaded(description), "test.json")
    assert not analysis.dag.inferred
    assert dict(analysis.dag.edges) == {"A": (), "B": (), "C": ("A",)}
    assert analysis.busy == pytest.approx(3.5)
    assert analysis.wall == pytest.approx(2.0)
    assert analysis.parallelism == pytest.approx(1.75)
    assert analysis.critical_path == ("A", "C")
    assert analysis.critical_length == pytest.approx(2.0)
    assert analysis.saving == pytest.approx(0.0)
    # from the timing alone: C may have waited for A (it finished before C started), not for B
    inferred = report(timeline)
    assert inferred.dag.inferred
    assert dict(inferred.dag.edges)["C"] == ("A",)
    assert inferred.critical_path == ("A", "C")


def test_one_at_a_time_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    description = a_b_c(d=None)
    stream = drive(description, [(0, "start", "A"), (1, "end", "A"), (1, "start", "B"), (2.5, "end", "B"),
                                 (2.5, "start", "C"), (3.5, "end", "C")], monkeypatch)
    timeline = read_timeline(stream)
    analysis = report(timeline, loaded(description), "test.json")
    assert analysis.parallelism == pytest.approx(1.0)
    assert analysis.critical_path == ("A", "C")
    assert analysis.saving == pytest.approx(1.5)  # C could have run beside B
    assert analysis.waits["C"] == pytest.approx(1.5)  # ready when A finished, started after B
    assert analysis.waits["B"] == pytest.approx(1.0)
    # without the manifest, a serial build shows no room: every pipeline may have needed the one before
    inferred = report(timeline)
    assert inferred.critical_path == ("A", "B", "C")
    assert inferred.saving == pytest.approx(0.0)
    assert dict(inferred.dag.edges) == {"A": (), "B": ("A",), "C": ("B",)}  # reduced for display
    text = render_text(inferred)
    assert "inferred from the timing" in text


def test_cached_failed_and_unfinished(monkeypatch: pytest.MonkeyPatch) -> None:
    description = a_b_c()
    stream = drive(description, [(0, "cached", "A"), (0, "start", "B"), (0, "start", "D"), (1, "fail", "D")],
                   monkeypatch, success=False)
    timeline = read_timeline(stream)
    assert timeline.success is False
    assert {p.name: p.status for p in timeline.pipelines} == {"A": "cached", "B": "unfinished", "D": "failed"}
    assert [p.name for p in timeline.pipelines] == ["B", "D", "A"]  # by start; what did not run last
    analysis = report(timeline, loaded(description), "test.json")
    assert analysis.not_in_stream == ("C",)
    assert "A" not in analysis.critical_path
    document = as_json(analysis)
    assert document["cached"] == ["A"]
    a = next(p for p in document["pipelines"] if p["name"] == "A")
    assert a["start"] is None
    assert a["duration"] is None
    assert a["status"] == "cached"
    d = next(p for p in document["pipelines"] if p["name"] == "D")
    assert d["stages"][0]["status"] == "failed"
    svg = render_svg(analysis)
    assert svg_rows(svg) == ["B", "D", "A"]
    assert "cached: in the store, not built" in svg
    assert "failed stage" in svg


def test_results_repeated_from_the_store_end_no_running_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed pipeline reports its stored stages while others run stages of the same type."""
    description = a_b_c(d=None)
    clock = Clock()
    monkeypatch.setattr(monitor, "time", SimpleNamespace(time=clock.time, monotonic=clock.monotonic))
    m = loaded(description)
    a, b = m.by_name("A"), m.by_name("B")
    assert a is not None
    assert b is not None
    read_end, write_end = os.pipe()
    mon = JsonSeqMonitor(write_end)
    mon.build_started("test.json", sources=0, pipelines=2)
    mon.pipeline_started(a, build_root="<host>", runner="org.osbuild.linux")
    mon.stage_started(a, a.stages[0])
    clock.now += 1
    mon.pipeline_started(b, build_root="<host>", runner="org.osbuild.linux")
    mon.stage_finished(b, b.stages[0], StageResult(id=b.stages[0].id, type=b.stages[0].type, success=True,
                                                   output="", duration=9.0, cached=True))
    mon.pipeline_finished(b, success=True)
    clock.now += 1
    mon.stage_finished(a, a.stages[0], StageResult(id=a.stages[0].id, type=a.stages[0].type, success=True,
                                                   output="", duration=2.0))
    mon.pipeline_finished(a, success=True)
    mon.build_finished("test.json", success=True)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        timeline = read_timeline(f.read().decode())
    runs = {p.name: p for p in timeline.pipelines}
    assert runs["A"].stages[0].end - runs["A"].stages[0].start == pytest.approx(2.0)
    assert runs["B"].stages == ()


def test_a_stream_cut_short(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = drive(a_b_c(d=None), [(0, "start", "A"), (0, "start", "B"), (1, "end", "A"), (1, "start", "C"),
                                   (1.5, "end", "B"), (2, "end", "C")], monkeypatch)
    cut = stream[: stream.index("Starting pipeline C") + 40]  # in the middle of a record
    timeline = read_timeline(cut)
    assert timeline.success is None
    assert timeline.skipped == 1
    assert {p.name: p.status for p in timeline.pipelines} == {"A": "built", "B": "unfinished"}
    assert "the stream ends before the build did" in render_text(report(timeline))


def test_pipelines_of_no_duration_at_one_instant(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = drive(a_b_c(), [(0, "start", "A"), (0, "end", "A"), (0, "start", "B"), (0, "end", "B"),
                             (0, "start", "D"), (0, "end", "D")], monkeypatch)
    analysis = report(read_timeline(stream))  # one after the other, by name, and no cycle
    assert dict(analysis.dag.edges) == {"A": (), "B": ("A",), "D": ("B",)}
    assert analysis.critical_length == 0
    ET.fromstring(render_svg(analysis))


# formatting


def test_formats() -> None:
    assert [seconds(v) for v in (0.00042, 0.3124, 1.234, 123.4, 3723)] == [
        "0.42ms", "312ms", "1.23s", "2m03.40s", "1h02m03s"]
    step, values = ticks(2.5)
    assert step == 0.5
    assert [tick_label(v, step) for v in values] == [
        "0.0 s", "0.5 s", "1.0 s", "1.5 s", "2.0 s", "2.5 s"]
    step, values = ticks(1000)
    assert step == 120
    assert tick_label(values[1], step) == "2 min"
    assert tick_label(0.004, ticks(0.01)[0]) == "4 ms"


# the real thing: a build of parallel pipelines through the CLI, and its report


def run_report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["report", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_report_of_a_parallel_build(aosbuild: Aosbuild, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    manifest_path = aosbuild.write_manifest(a_b_c())
    result = aosbuild(manifest_path, "--monitor", "jsonseq")
    assert result.returncode == 0, result.stderr
    stream = aosbuild.workdir / "build.seq"
    stream.write_text(result.stdout)

    code, out, err = run_report(capsys, str(stream), "--manifest", str(manifest_path), "--format", "json")
    assert code == 0, err
    document = json.loads(out)
    assert document["success"] is True
    assert document["parallelism"] > 1.5
    assert document["critical_path"]["pipelines"] == ["A", "C"]
    assert document["critical_path"]["duration"] >= 2.0
    assert 0 <= document["critical_path"]["saving"] < 0.5
    assert document["dependencies"] == {"inferred": False, "how": document["dependencies"]["how"],
                                        "edges": {"A": [], "B": [], "C": ["A"], "D": []}}
    assert set(document) >= {"label", "started_at", "wall", "busy", "span", "cached", "not_in_stream",
                             "pipelines", "records", "skipped"}
    pipelines = {p["name"]: p for p in document["pipelines"]}
    assert set(pipelines) == {"A", "B", "C", "D"}
    c = pipelines["C"]
    assert c["critical"]
    assert c["status"] == "built"
    assert c["start"] >= pipelines["A"]["end"]
    assert [s["type"] for s in c["stages"]] == ["org.osbuild.copy", "org.aosbuild.test.sleep"]
    assert set(c["stages"][1]) == {"type", "id", "start", "end", "duration", "reported_duration", "status"}
    assert c["stages"][1]["duration"] == pytest.approx(1.0, abs=0.5)
    assert pipelines["B"]["duration"] == pytest.approx(1.5, abs=0.5)
    assert document["busy"] == pytest.approx(sum(p["duration"] for p in document["pipelines"]))

    # the same from the timing alone, read from standard input
    with stream.open() as f:
        monkeypatch.setattr(sys, "stdin", f)
        code, out, err = run_report(capsys, "-")
    assert code == 0, err
    assert "A \u2192 C (marked *)" in out
    assert "inferred from the timing" in out
    assert "PIPELINE / STAGE" in out
    assert "org.aosbuild.test.sleep" in out

    code, out, err = run_report(capsys, str(stream), "--manifest", str(manifest_path), "--format", "svg")
    assert code == 0, err
    rows = svg_rows(out)  # in the order they started: A, B and D at once, C after A
    assert sorted(rows[:3]) == ["A", "B", "D"]
    assert rows[3] == "C"
    root = ET.fromstring(out)
    assert root.tag == f"{SVG}svg"
    assert "critical path A \u2192 C" in out

    html_path = aosbuild.workdir / "report.html"
    code, _, err = run_report(capsys, str(stream), "--format", "html", "-o", str(html_path))
    assert code == 0, err
    assert "<svg" in html_path.read_text()
    assert "PIPELINE / STAGE" in html_path.read_text()

    # built again: everything is in the store
    again = aosbuild(manifest_path, "--monitor", "jsonseq")
    assert again.returncode == 0, again.stderr
    cached = aosbuild.workdir / "cached.seq"
    cached.write_text(again.stdout)
    code, out, err = run_report(capsys, str(cached), "--format", "json")
    assert code == 0, err
    assert json.loads(out)["cached"] == ["A", "B", "C", "D"]
    assert json.loads(out)["critical_path"]["pipelines"] == []


def test_report_errors(aosbuild: Aosbuild, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_report(capsys, str(aosbuild.workdir / "missing.seq"))
    assert code == 2
    assert "cannot read" in err
    empty = aosbuild.workdir / "empty.seq"
    empty.write_text("")
    code, _, err = run_report(capsys, str(empty))
    assert code == 1
    assert "--monitor jsonseq" in err
    bad = aosbuild.write_manifest({"version": "2", "pipelines": [{"name": "a"}, {"name": "a"}]}, "bad.json")
    code, _, err = run_report(capsys, str(SAMPLES / "real.seq"), "--manifest", str(bad))
    assert code == 2
    assert "bad.json" in err
    code, _, _ = run_report(capsys, str(SAMPLES / "real.seq"), "--format", "pdf")
    assert code == 2


def test_sample_parallel_manifest_loads() -> None:
    sample = Path(__file__).parents[1] / "samples" / "parallel.json"
    m = load(json.loads(sample.read_text()), Library())  # validated against the bundled stages
    assert {p.name: sorted(d.name for d in map(m.by_id, p.dependencies()) if d) for p in m.pipelines} == {
        "zeros": [], "etc": [], "gzip": ["zeros"], "xz": ["zeros"], "zstd": ["zeros"],
        "bundle": ["etc", "gzip", "xz", "zstd"]}


def test_html_embeds_the_chart(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = drive(a_b_c(d=None), [(0, "start", "A"), (1, "end", "A")], monkeypatch)
    page = render_html(report(read_timeline(stream)))
    assert page.startswith("<!DOCTYPE html>")
    assert "<svg" in page
    assert "</pre>" in page
