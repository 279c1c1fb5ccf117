"""`engine.build()` returns what the build did, collected from the monitor's events (real sandboxes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aosbuild import engine
from aosbuild.buildreport import BUILT, CACHED, FAILED, BuildReport, what_was_made
from aosbuild.errors import StageError
from aosbuild.library import Library
from aosbuild.loading import load_file
from aosbuild.monitor import Monitor
from aosbuild.store import Store

from .conftest import TEST_LIBDIR, manifest, pipeline, stage

TWO = manifest(pipeline("a", stage("org.osbuild.mkdir", paths=[{"path": "/etc"}]),
                        stage("org.osbuild.hostname", hostname="h")),
               pipeline("b", stage("org.aosbuild.test.sleep", seconds=0, marker="m")))


async def build(store: Path, description: dict[str, Any], exports: tuple[str, ...] = (),
                output_directory: Path | None = None) -> BuildReport:
    library = Library([TEST_LIBDIR])
    loaded = load_file("m.json", json.dumps(description), library, build=True)
    request = engine.Request(label="m.json", exports=exports, output_directory=output_directory)
    prepared = engine.prepare(loaded, request, store=Store.open(store), library=library, monitor=Monitor())
    return await engine.build(prepared, request)


async def test_report_of_a_build_then_of_the_same_build_from_the_store(workdir: Path) -> None:
    out = workdir / "out"
    first = await build(workdir / "store", TWO, exports=("a",), output_directory=out)
    assert first.success
    assert first.error is None
    assert {p.name: p.status for p in first.pipelines} == {"a": BUILT}  # only what the export needs
    assert [r.type for r in first.logs["a"]] == ["org.osbuild.mkdir", "org.osbuild.hostname"]
    assert first.count(cached=False) == 2
    assert first.count(cached=True) == 0
    assert [(e.name, e.path) for e in first.exports] == [("a", out / "a")]
    assert first.exports[0].size == len("h\n")  # /etc/hostname, the one file
    assert [kind for kind, _ in first.timed().values()] == ["org.osbuild.mkdir", "org.osbuild.hostname"]

    again = await build(workdir / "store", TWO)
    assert {p.name: p.status for p in again.pipelines} == {"a": CACHED, "b": BUILT}
    assert again.cached == ("a",)
    assert again.count(cached=True) == 2  # a's stages, reported from the store
    assert again.count(cached=False) == 1
    assert again.timed().keys() == {again.logs["b"][0].id}  # what was run, not what was reused
    summary = what_was_made(again, "aosbuild report --last")
    assert summary.startswith("m.json built in ")
    assert ": 1 stage built, 2 cached\n" in summary
    assert "--export NAME --output-directory DIR copies one out" in summary  # nothing was exported
    assert "copies one out" not in what_was_made(first, "x")


async def test_report_of_a_failed_build(workdir: Path) -> None:
    failing = manifest(pipeline("a", stage("org.osbuild.mkdir", paths=[{"path": "/etc"}]),
                                stage("org.aosbuild.test.fail", lines=2)))
    report = await build(workdir / "store", failing)
    assert not report.success
    assert isinstance(report.error, StageError)
    assert report.failed is not None
    assert report.failed.type == "org.aosbuild.test.fail"
    assert "line 1 of the failing stage" in report.failed.output
    assert report.pipelines[0].status == FAILED
    assert [r.success for r in report.logs["a"]] == [True, False]
    assert "m.json failed after " in what_was_made(report, "x")
