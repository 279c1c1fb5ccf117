"""Sources: concurrent, locked, verified fetching into the store, and the CLI around it (builds, --sources-only).

Every download goes to a real HTTP server on 127.0.0.1 started by the test (tests/fileserver.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from aosbuild.download import DownloadOptions
from aosbuild.manifest import Source
from aosbuild.monitor import Monitor
from aosbuild.sources import CONTENT_TYPE, ItemResult, SourceProgress, Sources
from aosbuild.store import Store, sourcecache

from .conftest import Aosbuild, check_jsonseq, manifest, pipeline, stage
from .fileserver import FileServer, sha256

FAST = DownloadOptions(backoff=0, timeout=5)
CURL = "org.osbuild.curl"
DOWNLOADED = f"source/{CURL} ({CURL}): Downloaded "
WAITING = f"source/{CURL} ({CURL}): Waiting for another aosbuild process"


def blob(name: str, size: int = 100_000) -> bytes:
    return (name.encode() * size)[:size]


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer().running() as files:
        yield files


class Recorder(Monitor):
    """Remembers the source events; `waiting` is set when an item waits for another process."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.progress: list[SourceProgress] = []
        self.finished: list[tuple[Sequence[ItemResult], bool]] = []
        self.waiting = anyio.Event()

    def source_log(self, source: Source, message: str) -> None:
        self.lines.append(message)
        if message.startswith("Waiting for another aosbuild process"):
            self.waiting.set()

    def source_progress(self, source: Source, progress: SourceProgress) -> None:
        self.progress.append(progress)

    def source_finished(self, source: Source, results: Sequence[ItemResult], success: bool) -> None:
        self.finished.append((results, success))


def items_in(store: Path) -> list[str]:
    """What the store's files directory holds: items, and (there must be none) partial or lock files."""
    directory = store / "sources" / CONTENT_TYPE
    return sorted(os.listdir(directory)) if directory.exists() else []


# -- the orchestration, in process ---------------------------------------------------------------------------


async def test_a_pipeline_waits_only_for_its_own_items(server: FileServer, tmp_path: Path) -> None:
    slow, fast = blob("slow"), blob("fast")
    gate = threading.Event()
    items = {sha256(slow): server.add("/slow", slow, gate=gate), sha256(fast): {"url": server.add("/fast", fast)}}
    store = Store.open(tmp_path / "store")
    sources = Sources(store, [Source(type=CURL, items=items)], Recorder(), download=FAST)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sources.fetch_all)
        with anyio.fail_after(10):
            await sources.wait_for([sha256(fast)])  # while the slow one is held by the server
        assert not sources.path(sha256(slow)).exists()
        gate.set()
        with anyio.fail_after(10):
            await sources.wait_for([sha256(slow)])
    assert sources.path(sha256(slow)).read_bytes() == slow
    assert sources.results[CURL] == [ItemResult(checksum=sha256(slow), cached=False, size=len(slow)),
                                     ItemResult(checksum=sha256(fast), cached=False, size=len(fast))]


async def test_items_in_the_store_are_not_fetched_again(server: FileServer, tmp_path: Path) -> None:
    data = blob("a")
    store = Store.open(tmp_path / "store")
    path = store.source_path(CONTENT_TYPE, sha256(data))
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    monitor = Recorder()
    await Sources(store, [Source(type=CURL, items={sha256(data): server.url("/a")})], monitor,
                  download=FAST).fetch_all()
    assert server.requests == []
    assert monitor.finished == [([ItemResult(checksum=sha256(data), cached=True, size=len(data))], True)]
    assert monitor.progress[-1] == SourceProgress(items_total=1, items_done=1, items_failed=0,
                                                  bytes_done=len(data), bytes_total=len(data), sized=1)


async def test_two_fetchers_on_one_store_download_once(server: FileServer, tmp_path: Path) -> None:
    data = blob("shared")
    gate = threading.Event()
    items = {sha256(data): server.add("/shared", data, gate=gate)}
    first, second = Recorder(), Recorder()
    store = Store.open(tmp_path / "store")
    async with anyio.create_task_group() as tg:
        tg.start_soon(Sources(store, [Source(type=CURL, items=items)], first, download=FAST).fetch_all)
        await anyio.to_thread.run_sync(server.arrived["/shared"].wait, 10)
        tg.start_soon(Sources(store, [Source(type=CURL, items=items)], second, download=FAST).fetch_all)
        with anyio.fail_after(10):
            await second.waiting.wait()
        gate.set()
    assert server.count("/shared") == 1
    assert first.finished[0][0][0].cached is False
    assert second.finished[0][0][0].cached is True  # found in place once the lock was free
    assert items_in(store.root) == [sha256(data)]


def test_item_lock_excludes_and_leaves_no_lock_file(tmp_path: Path) -> None:
    """One protocol for fetching (`item_lock`) and `store verify` (`try_lock`): each excludes the other."""
    item = tmp_path / sha256(b"x")
    fd = sourcecache.take_lock(item)
    assert fd is not None
    with sourcecache.try_lock(item) as held:
        assert held is False
    assert sourcecache.take_lock(item) is None
    sourcecache.release_lock(item, fd)
    assert os.listdir(tmp_path) == []
    with sourcecache.try_lock(item) as held:
        assert held is True
        assert sourcecache.take_lock(item) is None
    assert os.listdir(tmp_path) == []


async def test_a_failed_item_fails_the_build_at_once(server: FileServer, tmp_path: Path) -> None:
    good = blob("good")
    items = {sha256(good): server.add("/good", good, gate=threading.Event()), sha256(b"x"): server.url("/missing")}
    store = Store.open(tmp_path / "store")
    monitor = Recorder()
    with anyio.fail_after(10), pytest.raises(Exception) as raised:  # noqa: PT011  # a group; checked below
        await Sources(store, [Source(type=CURL, items=items)], monitor, download=FAST).fetch_all()
    errors = raised.value.exceptions if isinstance(raised.value, ExceptionGroup) else [raised.value]
    assert [str(e) for e in errors] == [
        f"{CURL}: {sha256(b'x')}: {server.url('/missing')}: HTTP 404 Not Found "
        "(not retried: asking again gets the same answer)"]
    assert monitor.finished[0][1] is False
    assert items_in(store.root) == []  # the held download was cancelled, its partial file removed


async def test_keep_going_fetches_the_rest_and_reports_every_failure(server: FileServer, tmp_path: Path) -> None:
    good = blob("good")
    items = {sha256(b"x"): server.url("/missing"), sha256(good): server.add("/good", good),
             sha256(b"y"): server.add("/wrong", b"not y")}
    store = Store.open(tmp_path / "store")
    monitor = Recorder()
    sources = Sources(store, [Source(type=CURL, items=items)], monitor, download=FAST, keep_going=True)
    with pytest.raises(ExceptionGroup):
        await sources.fetch_all()
    results = sources.results[CURL]
    assert [(r.checksum, r.error is None) for r in results] == [
        (sha256(b"x"), False), (sha256(good), True), (sha256(b"y"), False)]
    assert f"expected {sha256(b'y')}, got {sha256(b'not y')}" in str(results[2].error)
    assert items_in(store.root) == [sha256(good)]
    assert monitor.progress[-1].items_failed == 2
    assert monitor.progress[-1].bytes_done == len(good)


async def test_progress_counts_items_and_bytes(server: FileServer, tmp_path: Path) -> None:
    datas = [blob(str(i), 200_000) for i in range(3)]
    items = {sha256(d): server.add(f"/{i}", d) for i, d in enumerate(datas)}
    monitor = Recorder()
    await Sources(Store.open(tmp_path / "store"), [Source(type=CURL, items=items)], monitor,
                  download=FAST).fetch_all()
    done = [p.items_done for p in monitor.progress]
    assert done == sorted(done)
    assert monitor.progress[-1] == SourceProgress(items_total=3, items_done=3, items_failed=0,
                                                  bytes_done=600_000, bytes_total=600_000, sized=3)
    assert sorted(line for line in monitor.lines) == sorted(f"Downloaded {server.url(f'/{i}')}\n" for i in range(3))


# -- through the command line -------------------------------------------------------------------------------


def copy_items(name: str, *checksums: str) -> dict[str, Any]:
    """A pipeline that copies source items into its tree, each under its checksum's hex digest."""
    inputs = {"files": {"type": "org.osbuild.files", "origin": "org.osbuild.source",
                        "references": {c: {} for c in checksums}}}
    paths = [{"from": f"input://files/{c}", "to": f"tree:///{c.split(':')[1]}"} for c in checksums]
    return pipeline(name, {**stage("org.osbuild.copy", paths=paths), "inputs": inputs})


def curl_manifest(items: dict[str, Any], *pipelines: dict[str, Any]) -> dict[str, Any]:
    return manifest(*pipelines, sources={CURL: {"items": items}})


def messages(records: list[dict[str, Any]]) -> list[str]:
    return [str(r.get("message", "")) for r in records]


def test_build_with_curl_items_end_to_end(aosbuild: Aosbuild, server: FileServer) -> None:
    a, b = blob("a"), hashlib.sha256(b"b").digest() * 1000
    items = {sha256(a): server.add("/a", a, "503"), sha256(b): {"url": server.add("/b", b), "insecure": False}}
    m = curl_manifest(items, copy_items("tree", sha256(a), sha256(b)))
    first = aosbuild(m, "--monitor", "jsonseq", "--export", "tree", "--output-directory", str(aosbuild.output))
    assert first.returncode == 0, first.stderr
    assert "pipelines=2 stages=1" in check_jsonseq(first.stdout)
    assert (aosbuild.output / "tree" / sha256(a).split(":")[1]).read_bytes() == a
    assert (aosbuild.output / "tree" / sha256(b).split(":")[1]).read_bytes() == b
    said = messages(first.jsonseq())
    order = [said.index(f"Starting pipeline source {CURL}"), said.index(f"{DOWNLOADED}{server.url('/a')}\n"),
             said.index(f"Finished module source {CURL}"), said.index(f"Finished pipeline {CURL}")]
    assert order == sorted(order)
    assert f"{DOWNLOADED}{server.url('/b')}\n" in said
    assert any(m.startswith(f"source/{CURL} ({CURL}): Retrying {server.url('/a')}: HTTP 503") for m in said)
    result = next(r["result"] for r in first.jsonseq() if r.get("message") == f"Finished module source {CURL}")
    assert result == {"name": f"source {CURL}", "source_type": CURL, "success": True,
                      "output": f"source {CURL} finished successfully",
                      "results": [  # omitempty leaves lists alone: osbuild's records have the empty error too
                          {"success": True, "metadata": {"checksum": sha256(a), "cached": False}, "error": ""},
                          {"success": True, "metadata": {"checksum": sha256(b), "cached": False}, "error": ""}]}
    requests = len(server.requests)

    second = aosbuild(m, "--json")
    assert second.returncode == 0, second.stderr
    assert len(server.requests) == requests  # nothing fetched again
    assert json.loads(second.stdout)["sources"] == {
        "success": True, CURL: [{"cached": True, "checksum": sha256(a)}, {"cached": True, "checksum": sha256(b)}]}
    assert items_in(aosbuild.store) == sorted([sha256(a), sha256(b)])


def test_wrong_checksum_fails_clearly_and_stores_nothing(aosbuild: Aosbuild, server: FileServer) -> None:
    good, wanted = blob("good"), blob("wanted")
    url = server.add("/wanted", b"something else")
    m = curl_manifest({sha256(good): server.add("/good", good), sha256(wanted): url},
                      copy_items("tree", sha256(wanted)))
    result = aosbuild(m, "--json")
    assert result.returncode == 1
    error = f"{url}: checksum mismatch: expected {sha256(wanted)}, got {sha256(b'something else')}"
    assert result.stderr == (f"Error: {CURL}: {sha256(wanted)}: {error}\nWhat to do: check the item's URL and "
                             "checksum in the manifest's `sources`; `--sources-only` fetches and verifies the "
                             "sources without building.\n")
    document = json.loads(result.stdout)
    assert document["error"] == {"type": "org.osbuild.error.source",
                                 "details": {"source": {"type": CURL, "output": f"{CURL}: {sha256(wanted)}: {error}"}}}
    assert document["success"] is False
    assert document["sources"]["success"] is False
    assert {"cached": False, "checksum": sha256(wanted), "error": f"{CURL}: {sha256(wanted)}: {error}"} \
        in document["sources"][CURL]
    assert sha256(wanted) not in items_in(aosbuild.store)
    assert not [name for name in items_in(aosbuild.store) if name.startswith(".")]
    assert not (aosbuild.store / "objects").exists() or not os.listdir(aosbuild.store / "objects")


def test_sources_only_summary_and_exit_codes(aosbuild: Aosbuild, server: FileServer) -> None:
    a, b = blob("a", 300_000), blob("b", 200_000)
    items = {sha256(a): server.add("/a", a), sha256(b): server.add("/b", b, "drop")}
    m = curl_manifest(items, copy_items("tree", sha256(a), sha256(b)))
    result = aosbuild(m, "--sources-only")
    assert result.returncode == 0, result.stderr
    assert "items:          2\n" in result.stdout
    assert "bytes:          500000 (488.3 KiB)\n" in result.stdout
    assert "downloaded:     2 (488.3 KiB)\n" in result.stdout
    assert "already cached: 0\n" in result.stdout
    assert "failed:         0\n" in result.stdout
    assert f"{DOWNLOADED}{server.url('/a')}\n" in result.stdout
    assert f"source {CURL}: done: 2 fetched (488.3 KiB), 0 cached\n" in result.stdout
    assert os.listdir(aosbuild.store / "objects") == []  # no stage ran

    c = blob("c")
    items[sha256(c)] = server.add("/c", c)
    items[sha256(b"gone")] = server.url("/gone")
    failed = aosbuild(curl_manifest(items, copy_items("tree", *items)), "--sources-only")
    assert failed.returncode == 1
    assert "items:          4\n" in failed.stdout
    assert "downloaded:     1 (97.7 KiB)\n" in failed.stdout
    assert "already cached: 2\n" in failed.stdout
    assert "failed:         1\n" in failed.stdout
    assert failed.stderr == (f"Error: {CURL}: {sha256(b'gone')}: {server.url('/gone')}: HTTP 404 Not Found "
                             "(not retried: asking again gets the same answer)\n"
                             "What to do: check those items' URLs and checksums in the manifest's `sources`, then "
                             "run `--sources-only` again (the items it fetched are kept).\n")
    assert "Traceback" not in failed.stderr
    assert items_in(aosbuild.store) == sorted([sha256(a), sha256(b), sha256(c)])


def test_sources_only_export_takes_what_the_export_needs(aosbuild: Aosbuild, server: FileServer) -> None:
    used, unused, build = blob("used"), blob("unused"), blob("build")
    items = {sha256(used): server.add("/used", used), sha256(unused): server.add("/unused", unused),
             sha256(build): server.add("/build", build)}
    m = curl_manifest(items, copy_items("build", sha256(build)), copy_items("other", sha256(unused)),
                      {**copy_items("tree", sha256(used)), "build": "name:build"})
    result = aosbuild(m, "--sources-only", "--export", "tree", "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(r.path for r in server.requests) == ["/build", "/used"]
    document = json.loads(result.stdout)
    assert document["success"] is True
    assert sorted(i["checksum"] for i in document["sources"][CURL]) == sorted([sha256(used), sha256(build)])


def test_v1_files_source_is_curl(aosbuild: Aosbuild, server: FileServer) -> None:
    data = blob("v1")
    m = {"pipeline": {"stages": [{"name": "org.osbuild.noop", "options": {}}]},
         "sources": {"org.osbuild.files": {"urls": {sha256(data): {"url": server.add("/v1", data)}}}}}
    result = aosbuild(m, "--sources-only", "--export", "tree", "--monitor", "jsonseq")
    assert result.returncode == 0, result.stderr
    check_jsonseq(result.stdout)
    assert items_in(aosbuild.store) == [sha256(data)]


class Lines:
    """A process's stdout, read line by line by a thread, so the test can wait for a line with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put("")

    def until(self, text: str, timeout: float = 30) -> None:
        while True:
            line = self.lines.get(timeout=timeout)
            assert line, f"the process ended before printing {text!r}"
            self.seen.append(line)
            if text in line:
                return

    def rest(self) -> str:
        self._thread.join(30)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)


def test_a_pipeline_without_sources_does_not_wait_for_downloads(aosbuild: Aosbuild, server: FileServer) -> None:
    slow = blob("slow")
    gate = threading.Event()
    m = curl_manifest({sha256(slow): server.add("/slow", slow, gate=gate)},
                      pipeline("free", stage("org.osbuild.noop")), copy_items("tree", sha256(slow)))
    with started(aosbuild, m, "--monitor", "jsonseq") as (proc, stream):
        stream.until('"Finished pipeline free"')  # while the server still holds the download
        gate.set()
        assert proc.wait(60) == 0
        text = stream.rest()
    check_jsonseq(text)
    said = messages([json.loads(line[1:]) for line in text.split("\n") if line])  # not splitlines: RS is one
    assert said.index("Finished pipeline free") < said.index(f"{DOWNLOADED}{server.url('/slow')}\n") \
        < said.index("Finished pipeline tree")


def test_two_processes_download_each_item_once(aosbuild: Aosbuild, server: FileServer) -> None:
    gate = threading.Event()
    datas = {name: blob(name) for name in ("held", "x", "y", "z")}
    items = {sha256(d): server.add(f"/{n}", d, gate=gate if n == "held" else None) for n, d in datas.items()}
    m = aosbuild.write_manifest(curl_manifest(items, copy_items("tree", *items)))
    with started(aosbuild, m, "--sources-only", "-q") as (first, _):
        assert server.arrived["/held"].wait(30)
        with started(aosbuild, m, "--sources-only", "--monitor", "jsonseq") as (second, stream):
            stream.until(WAITING)
            gate.set()
            assert first.wait(60) == 0
            assert second.wait(60) == 0
    assert {path: server.count(path) for path in ("/held", "/x", "/y", "/z")} == \
        {"/held": 1, "/x": 1, "/y": 1, "/z": 1}
    assert items_in(aosbuild.store) == sorted(items)


@contextmanager
def started(aosbuild: Aosbuild, m: Path | dict[str, Any], *args: str) -> Iterator[tuple[subprocess.Popen[str], Lines]]:
    """A running aosbuild whose stdout the test reads as it comes; killed if the test fails early."""
    with subprocess.Popen(aosbuild.command(m, *args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, cwd=aosbuild.workdir) as proc:
        try:
            yield proc, Lines(proc)
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_download_leaves_nothing(aosbuild: Aosbuild, server: FileServer, signum: int,
                                             exit_code: int) -> None:
    data = blob("big", 1 << 20)
    m = curl_manifest({sha256(data): server.add("/big", data, "stall")}, copy_items("tree", sha256(data)))
    with started(aosbuild, m, "--monitor", "jsonseq") as (proc, stream):
        assert server.stalled["/big"].wait(30)
        proc.send_signal(signum)
        assert proc.wait(30) == exit_code
        check_jsonseq(stream.rest())
    assert items_in(aosbuild.store) == []  # neither the partial file nor the item's lock file
