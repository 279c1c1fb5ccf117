"""`aosbuild report --last`: the store keeps its recent builds' streams, so a plain build is enough."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aosbuild.history import KEEP_BUILDS, History

from .conftest import Aosbuild, manifest, pipeline, stage
from .png import colored_pixels

QUICK = manifest(pipeline("a", stage("org.aosbuild.test.sleep", seconds=0.3, marker="a")),
                 pipeline("b", stage("org.aosbuild.test.sleep", seconds=0.2, marker="b"),
                          stage("org.osbuild.mkdir", paths=[{"path": "/etc"}])))


def report(aosbuild: Aosbuild, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aosbuild", "report", *args], capture_output=True, text=True,
                          timeout=60, cwd=aosbuild.workdir)


def test_report_last_after_a_plain_build(aosbuild: Aosbuild) -> None:
    assert aosbuild(QUICK).returncode == 0  # no --monitor jsonseq: the log layout
    result = report(aosbuild, "--last", "--store", str(aosbuild.store), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert '"name": "b"' in result.stdout
    assert '"success": true' in result.stdout
    # the default store is .osbuild in the current directory, and --store alone means the last build
    assert report(aosbuild, "--store", str(aosbuild.store)).returncode == 0
    missing = report(aosbuild, "--last")
    assert missing.returncode == 1
    assert "keeps no build yet: build a manifest with `aosbuild --store .osbuild MANIFEST` first" in missing.stderr


def test_history_is_bounded_by_count_and_bytes(tmp_path: Path) -> None:
    history = History(tmp_path)
    for i in range(5):
        fd = history.new_stream()
        with open(fd, "w") as f:
            f.write("x" * (100 * (i + 1)))
    assert history.prune(keep=3) == 2
    assert [p.stat().st_size for p in history.streams()] == [300, 400, 500]
    assert history.prune(keep=10, keep_bytes=600) == 2  # the newest is kept even when alone too large
    assert [p.stat().st_size for p in history.streams()] == [500]
    assert history.last_stream() == history.streams()[-1]


def test_durations_are_remembered_by_id_then_type(tmp_path: Path) -> None:
    history = History(tmp_path)
    history.record({"s1": ("t", 2.0), "s2": ("t", 4.0)})
    durations = history.durations()
    assert durations.expect("s1", "t") == 2.0
    assert durations.expect("new", "t") == 3.0  # the type's mean
    assert durations.expect("new", "other") is None
    (tmp_path / "history" / "durations.json").write_text("{not json")
    assert history.durations().expect("s1", "t") is None  # a damaged record only loses estimates


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_last_html_shows_the_gantt_chart_in_chromium(aosbuild: Aosbuild) -> None:
    assert aosbuild(QUICK).returncode == 0
    page = aosbuild.workdir / "report.html"
    result = report(aosbuild, "--last", "--store", str(aosbuild.store), "--format", "html", "--output", str(page))
    assert result.returncode == 0, result.stderr
    blank = aosbuild.workdir / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body><pre>no chart here</pre></body></html>")

    def screenshot(html: Path) -> Path:
        png = html.with_suffix(".png")
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                        f"--user-data-dir={aosbuild.workdir / 'chromium'}", f"--screenshot={png}",
                        "--window-size=1000,700", html.as_uri()], capture_output=True, timeout=120, check=True)
        return png

    bars = colored_pixels(screenshot(page))
    assert colored_pixels(screenshot(blank)) == 0
    assert bars > 2000, f"only {bars} coloured pixels: no chart drawn"


def test_store_prune_bounds_the_saved_streams(aosbuild: Aosbuild) -> None:
    assert aosbuild(QUICK).returncode == 0
    history = History(aosbuild.store)
    newest = history.last_stream()
    for _ in range(KEEP_BUILDS + 5):  # older builds' streams, as if many builds had run before
        fd = history.new_stream()
        os.close(fd)
    assert newest is not None
    os.rename(newest, history.builds / "99999999999999999999-newest.jsonseq")  # it stays the newest
    result = subprocess.run([sys.executable, "-m", "aosbuild", "store", "prune", "--to", "1GiB",
                             "--store", str(aosbuild.store)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "history: removed 6 saved build streams beyond the bound" in result.stdout
    assert len(history.streams()) == KEEP_BUILDS
    assert report(aosbuild, "--last", "--store", str(aosbuild.store)).returncode == 0  # the real one
