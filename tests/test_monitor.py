"""Monitors: osbuild's JSON-seq record format, and the log monitor's plain layout."""

from __future__ import annotations

import json
import os
from typing import Any

from aosbuild.manifest import Pipeline, Source, make_stage
from aosbuild.monitor import JsonSeqMonitor, LogMonitor, omitempty, tail
from aosbuild.results import StageResult
from aosbuild.sources import ItemResult, SourceProgress

from .conftest import check_jsonseq


def two_pipelines() -> tuple[Pipeline, Pipeline]:
    def one(name: str) -> Pipeline:
        stage = make_stage(type_="org.osbuild.noop", build=None, base=None, options={"name": name},
                           source_epoch=None, inputs={}, devices={}, mounts=())
        return Pipeline(name=name, stages=(stage,))

    return one("a"), one("b")


def result_of(pipeline: Pipeline, output: str = "out\n") -> StageResult:
    stage = pipeline.stages[0]
    return StageResult(id=stage.id, type=stage.type, success=True, output=output, duration=0.5,
                       metadata={"k": 1})


def capture(run: object) -> bytes:
    read_end, write_end = os.pipe()
    run(write_end)  # type: ignore[operator]
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        return f.read()


def parse_records(stream: bytes) -> list[dict[str, Any]]:
    """The JSON records of a captured jsonseq stream (each line is RS, then the record)."""
    return [json.loads(line[1:]) for line in stream.split(b"\n") if line]


def interleaved(monitor: JsonSeqMonitor | LogMonitor) -> None:
    a, b = two_pipelines()
    monitor.build_started("m.json", sources=0, pipelines=2)
    monitor.pipeline_started(a, build_root="<host>", runner="org.osbuild.linux")
    monitor.pipeline_started(b, build_root="<host>", runner="org.osbuild.linux")
    monitor.stage_started(a, a.stages[0])
    monitor.stage_started(b, b.stages[0])
    monitor.stage_output(b, b.stages[0], "from b\n")
    monitor.stage_output(a, a.stages[0], "from a\n")
    monitor.stage_progress(a, a.stages[0], 1, 2, "half")
    monitor.stage_finished(b, b.stages[0], result_of(b))
    monitor.pipeline_finished(b, success=True)
    monitor.stage_finished(a, a.stages[0], result_of(a))
    monitor.pipeline_finished(a, success=True)
    monitor.build_finished("m.json", success=True)


def test_jsonseq_interleaved_pipelines_pass_the_checker() -> None:
    stream = capture(lambda fd: interleaved(JsonSeqMonitor(fd)))
    assert "pipelines=2 stages=2 failed_stages=0 final_done=2/2 ok" in check_jsonseq(stream)
    records = parse_records(stream)
    contexts = {}
    for record in records:
        if "origin" in record["context"]:
            contexts[record["context"]["id"]] = record["context"]
    by_message = {r.get("message"): contexts[r["context"]["id"]] for r in records}
    assert by_message["from a\n"]["pipeline"]["name"] == "a"
    assert by_message["from b\n"]["pipeline"]["name"] == "b"
    assert by_message["from b\n"]["origin"] == "stages/org.osbuild.noop"
    # each record carries its own pipeline's progress, not the last one started
    progress = {r.get("message"): r["progress"] for r in records}
    assert progress["from b\n"]["progress"]["name"] == "pipeline: b"
    assert progress["half"]["progress"]["progress"] == {"name": "stage: org.osbuild.noop", "done": 1, "total": 2}
    finished = [r for r in records if r.get("message") == "Finished module org.osbuild.noop"]
    assert finished[0]["result"]["output"] == "out\n"
    assert finished[0]["options"] == {"name": "b"}
    assert finished[0]["metadata"] == {"k": 1}
    assert records[-1]["message"] == "manifest m.json finished successfully\n"


def test_context_sent_in_full_once() -> None:
    stream = capture(lambda fd: interleaved(JsonSeqMonitor(fd)))
    full_ids = [json.loads(line[1:])["context"]["id"] for line in stream.split(b"\n")
                if line and "origin" in json.loads(line[1:])["context"]]
    assert len(full_ids) == len(set(full_ids))


def test_omitempty_and_output_tail() -> None:
    assert omitempty({"a": None, "b": "", "c": {"d": None, "e": {}}, "f": [None]}) == {"c": {"e": {}}, "f": [None]}
    long = "x" * 40000
    assert tail(long).startswith("[...9000 bytes hidden...]\n")
    assert len(tail(long)) < 31100


def test_log_monitor_plain_lines_prefix_parallel_output() -> None:
    text = capture(lambda fd: interleaved(LogMonitor(fd, tty=False))).decode()
    assert "\x1b" not in text  # no escapes off a terminal
    assert "starting m.json\n" in text
    assert "Pipeline a: " in text
    assert "Pipeline b: " in text
    assert "b| from b\n" in text
    assert "a| from a\n" in text
    assert "Duration: 0.50s" in text
    assert text.endswith("manifest m.json finished successfully\n")


def test_log_monitor_status_line_on_a_terminal() -> None:
    text = capture(lambda fd: interleaved(LogMonitor(fd, tty=True))).decode()
    assert "running: a (org.osbuild.noop 1/1), b (org.osbuild.noop 1/1)" in text
    assert text.endswith("\r\x1b[K")  # the status line is cleared at the end


def sources_run(monitor: JsonSeqMonitor | LogMonitor) -> None:
    """A curl source of 10 items downloading beside a pipeline, as the engine reports it."""
    a, _ = two_pipelines()
    source = Source(type="org.osbuild.curl", items={f"sha256:{i:064x}": f"http://h/{i}" for i in range(10)})
    monitor.build_started("m.json", sources=1, pipelines=1)
    monitor.source_started(source)
    monitor.pipeline_started(a, build_root="<host>", runner="org.osbuild.linux")
    for i in range(10):
        monitor.source_progress(source, SourceProgress(items_total=10, items_done=i, items_failed=0,
                                                       bytes_done=i * 1024 * 1024 + 512 * 1024,
                                                       bytes_total=(i + 1) * 1024 * 1024, sized=i + 1))
        monitor.source_log(source, f"Downloaded http://h/{i}\n")
    monitor.source_progress(source, SourceProgress(items_total=10, items_done=10, items_failed=0,
                                                   bytes_done=10 << 20, bytes_total=10 << 20, sized=10))
    results = [ItemResult(checksum=c, cached=False, size=1 << 20) for c in source.items]
    monitor.source_finished(source, results, success=True)
    monitor.stage_started(a, a.stages[0])
    monitor.stage_finished(a, a.stages[0], result_of(a))
    monitor.pipeline_finished(a, success=True)
    monitor.build_finished("m.json", success=True)


def test_jsonseq_source_records_as_osbuild() -> None:
    stream = capture(lambda fd: sources_run(JsonSeqMonitor(fd)))
    assert "pipelines=2 stages=1 failed_stages=0 final_done=2/2 ok" in check_jsonseq(stream)
    records = parse_records(stream)
    lines = [r for r in records if "Downloaded" in r.get("message", "")]
    assert len(lines) == 10  # one per item; byte progress is not streamed
    assert lines[0]["message"] == "source/org.osbuild.curl (org.osbuild.curl): Downloaded http://h/0\n"
    assert lines[0]["context"]["origin"] == "org.osbuild"
    assert lines[0]["context"]["pipeline"]["name"] == "source org.osbuild.curl"
    assert lines[0]["progress"] == {"name": "pipelines/sources", "total": 2, "done": 0}
    finished = next(r for r in records if r.get("message") == "Finished module source org.osbuild.curl")
    assert len(finished["result"]["results"]) == 10


def test_log_monitor_source_progress_off_a_terminal() -> None:
    text = capture(lambda fd: sources_run(LogMonitor(fd, tty=False))).decode()
    assert "\x1b" not in text
    assert "source/org.osbuild.curl (org.osbuild.curl): Downloaded http://h/3\n" in text
    assert "source org.osbuild.curl: 1/10 items, 1.5 MiB/2.0 MiB+\n" in text
    assert "source org.osbuild.curl: 9/10 items, 9.5 MiB/10.0 MiB\n" in text  # every size known
    assert "10/10 items" not in text  # the last tenth is the finished line
    assert "source org.osbuild.curl: done: 10 fetched (10.0 MiB), 0 cached\n" in text


def test_log_monitor_source_progress_bar_on_a_terminal() -> None:
    text = capture(lambda fd: sources_run(LogMonitor(fd, tty=True))).decode()
    assert "org.osbuild.curl [##########----------] 5/10 items, 5.5 MiB/6.0 MiB+" in text
    assert "org.osbuild.curl [####################] 10/10 items, 10.0 MiB/10.0 MiB" in text
    assert text.endswith("\r\x1b[K")
