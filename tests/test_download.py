"""Downloads against a real HTTP server on 127.0.0.1 that injects faults: retries, resumption, limits, errors."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from aosbuild.checksum import ITEM_MODE, PARTIAL_PREFIX, VerifiedFile
from aosbuild.download import DownloadOptions, open_downloader, parse_content_range
from aosbuild.errors import ChecksumMismatch, DownloadError

from .fileserver import FileServer, Hold, sha256

DATA = bytes(range(256)) * 4096  # 1 MiB, more than one read
FAST = DownloadOptions(backoff=0, timeout=0.5)


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer().running() as files:
        yield files


class Recorder:
    """A `download.Progress` that remembers what it was told."""

    def __init__(self) -> None:
        self.expected: list[int] = []
        self.received = 0
        self.retries: list[str] = []

    def expect(self, size: int) -> None:
        self.expected.append(size)

    def advance(self, nbytes: int) -> None:
        self.received += nbytes

    def rewind(self, nbytes: int) -> None:
        self.received -= nbytes

    def retry(self, message: str) -> None:
        self.retries.append(message)


async def fetch(url: str, target: Path, checksum: str, options: DownloadOptions = FAST,
                progress: Recorder | None = None) -> None:
    async with open_downloader(options) as downloader:
        with VerifiedFile(target, checksum) as out:
            await downloader.fetch(url, out, progress)


def nothing_but(target: Path) -> list[str]:
    """Everything in the target's directory: a failed download leaves neither the file nor a partial one."""
    return sorted(os.listdir(target.parent)) if target.parent.exists() else []


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "sha256", "sha384", "sha512"])
async def test_download_verified_with_each_algorithm(server: FileServer, tmp_path: Path, algorithm: str) -> None:
    url = server.add("/f", DATA)
    checksum = f"{algorithm}:{hashlib.new(algorithm, DATA).hexdigest()}"
    target = tmp_path / checksum
    progress = Recorder()
    await fetch(url, target, checksum, progress=progress)
    assert target.read_bytes() == DATA
    assert nothing_but(target) == [checksum]
    assert progress.expected == [len(DATA)]
    assert progress.received == len(DATA)
    assert (target.stat().st_mode & 0o777) == ITEM_MODE & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def test_cut_connection_resumes_with_range(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/f", DATA, "drop")
    target = tmp_path / "item"
    progress = Recorder()
    await fetch(url, target, sha256(DATA), progress=progress)
    assert target.read_bytes() == DATA
    first, second = server.seen("/f")
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={len(DATA) // 2}-"
    assert second.headers["if-range"] == '"v1"'
    assert progress.received == len(DATA)
    assert "connection broken" in progress.retries[0]


async def test_cut_connection_without_range_support_starts_over(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/f", DATA, "drop", "drop", ranges=False)
    target = tmp_path / "item"
    progress = Recorder()
    await fetch(url, target, sha256(DATA), progress=progress)
    assert target.read_bytes() == DATA
    assert server.count("/f") == 3
    assert progress.received == len(DATA)  # the discarded halves are taken back


@pytest.mark.parametrize("fault", ["503", "429", "500"])
async def test_busy_server_is_retried(server: FileServer, tmp_path: Path, fault: str) -> None:
    url = server.add("/f", DATA, fault)
    target = tmp_path / "item"
    progress = Recorder()
    await fetch(url, target, sha256(DATA), progress=progress)
    assert target.read_bytes() == DATA
    assert server.count("/f") == 2
    assert progress.retries[0].startswith(f"HTTP {fault} ")
    assert "attempt 2 of 6" in progress.retries[0]


async def test_stalled_server_times_out_and_resumes(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/f", DATA, "stall")
    target = tmp_path / "item"
    progress = Recorder()
    with anyio.fail_after(10):
        await fetch(url, target, sha256(DATA), DownloadOptions(backoff=0, timeout=0.3), progress)
    assert target.read_bytes() == DATA
    assert server.seen("/f")[1].headers["range"] == f"bytes={len(DATA) // 2}-"
    assert progress.retries[0].startswith("the server sent nothing for 0.3s")


async def test_wrong_bytes_name_url_and_both_checksums(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/f", DATA, "wrong")
    target = tmp_path / "item"
    wrong = sha256(bytes(b ^ 0xFF for b in DATA))
    with pytest.raises(DownloadError) as raised:
        await fetch(url, target, sha256(DATA))
    assert str(raised.value) == f"{url}: checksum mismatch: expected {sha256(DATA)}, got {wrong}"
    assert server.count("/f") == 1  # the same URL gives the same bytes: not asked again
    assert nothing_but(target) == []


async def test_mismatch_after_resuming_is_decided_by_one_whole_download(server: FileServer, tmp_path: Path) -> None:
    # the first half came from one version of the file, the rest from another: try once more, whole
    url = server.add("/f", DATA, "drop", "wrong")
    target = tmp_path / "item"
    await fetch(url, target, sha256(DATA))
    assert target.read_bytes() == DATA
    assert [r.headers.get("range") for r in server.seen("/f")] == [None, f"bytes={len(DATA) // 2}-", None]


async def test_too_many_bytes_is_an_error(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/f", DATA, "toomany")
    target = tmp_path / "item"
    with pytest.raises(DownloadError, match=f"more than the {len(DATA)} bytes it announced"):
        await fetch(url, target, sha256(DATA))
    assert nothing_but(target) == []


async def test_stream_going_past_the_known_size_is_an_error(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/f", DATA, "drop", "endless", ranges=False)
    target = tmp_path / "item"
    with pytest.raises(DownloadError, match=f"{url}: the server sent more than the {len(DATA)} bytes"):
        await fetch(url, target, sha256(DATA))
    assert nothing_but(target) == []


async def test_not_found_is_not_retried(server: FileServer, tmp_path: Path) -> None:
    url = server.url("/missing")
    target = tmp_path / "item"
    with pytest.raises(DownloadError) as raised:
        await fetch(url, target, sha256(DATA))
    assert str(raised.value).startswith(f"{url}: HTTP 404 Not Found (not retried")
    assert server.count("/missing") == 1
    assert nothing_but(target) == []


async def test_persistent_failure_gives_up_after_the_attempts(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/f", DATA, *["503"] * 10)
    target = tmp_path / "item"
    with pytest.raises(DownloadError, match=r"HTTP 503 Service Unavailable \(gave up after 3 attempts\)"):
        await fetch(url, target, sha256(DATA), DownloadOptions(backoff=0, attempts=3))
    assert server.count("/f") == 3
    assert nothing_but(target) == []


async def test_unreachable_host(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/f"
    target = tmp_path / "item"
    with pytest.raises(DownloadError, match=r"cannot connect: .*\(gave up after 2 attempts\)"):
        await fetch(url, target, sha256(DATA), DownloadOptions(backoff=0, attempts=2))
    assert nothing_but(target) == []


async def test_only_http_urls(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="http:// and https:// URLs only"):
        await fetch("ftp://example.org/f", tmp_path / "item", sha256(DATA))


async def test_per_host_bound(server: FileServer, tmp_path: Path) -> None:
    # requests meet in pairs at the barrier: two at a time is shown to happen, three never happens
    server.barrier = threading.Barrier(2)
    urls = {server.add(f"/f{i}", DATA[:1000] + bytes([i])): DATA[:1000] + bytes([i]) for i in range(6)}
    await fetch_many(urls, tmp_path, DownloadOptions(jobs=8, per_host=2, backoff=0))
    assert server.most_active == 2


async def test_overall_bound_across_hosts(tmp_path: Path) -> None:
    # 4 routes on each of two hosts and a per-host bound of 4: only the overall bound of 3 keeps a fourth
    # request (and, loosened, up to 8) from being held at the shared gate at once
    hold = Hold()
    with FileServer().running() as one, FileServer().running() as two:
        urls = {s.add(f"/f{i}", DATA[:1000] + bytes([i]), gate=hold): DATA[:1000] + bytes([i])
                for i in range(4) for s in (one, two)}
        async with anyio.create_task_group() as tg:
            tg.start_soon(fetch_many, urls, tmp_path, DownloadOptions(jobs=3, per_host=4, backoff=0))
            try:
                held = await anyio.to_thread.run_sync(lambda: hold.peak(3, window=3))
            finally:
                hold.set()
        assert held == 3


async def fetch_many(urls: dict[str, bytes], directory: Path, options: DownloadOptions) -> None:
    async def one(url: str, data: bytes, target: Path) -> None:
        with VerifiedFile(target, sha256(data)) as out:
            await downloader.fetch(url, out)

    async with open_downloader(options) as downloader, anyio.create_task_group() as tg:
        for index, (url, data) in enumerate(urls.items()):
            tg.start_soon(one, url, data, directory / str(index))
    for index, data in enumerate(urls.values()):
        assert (directory / str(index)).read_bytes() == data


class FirstBytes(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.event = anyio.Event()

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        self.event.set()


async def test_cancelled_download_leaves_nothing(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/f", DATA, "stall")
    target = tmp_path / "item"
    progress = FirstBytes()
    async with open_downloader(DownloadOptions(timeout=60)) as downloader, anyio.create_task_group() as tg:
        async def run() -> None:
            with VerifiedFile(target, sha256(DATA)) as out:
                await downloader.fetch(url, out, progress)

        tg.start_soon(run)
        with anyio.fail_after(10):
            await progress.event.wait()
        assert nothing_but(target) == [PARTIAL_PREFIX + "item"]
        tg.cancel_scope.cancel()
    assert nothing_but(target) == []


def test_content_range() -> None:
    assert parse_content_range("bytes 10-19/20") == (10, 19, 20)
    assert parse_content_range("bytes 10-19/*") == (10, 19, None)
    assert parse_content_range("items 1-2/3") is None
    assert parse_content_range(None) is None


def test_verified_file_commits_only_matching_bytes(tmp_path: Path) -> None:
    target = tmp_path / "item"
    with VerifiedFile(target, sha256(b"right")) as out:
        out.write(b"wrong")
        with pytest.raises(ChecksumMismatch):
            out.commit()
        out.rewind()
        out.write(b"right")
        out.commit()
    assert target.read_bytes() == b"right"
    assert nothing_but(target) == ["item"]


def test_asyncio_backend_resumes_and_stops_early(server: FileServer, tmp_path: Path) -> None:
    resumed = server.add("/resumed", DATA, "drop")
    endless = server.add("/endless", DATA, "drop", "endless", ranges=False)

    async def both() -> None:
        await fetch(resumed, tmp_path / "resumed", sha256(DATA))
        with pytest.raises(DownloadError, match="more than the"):
            await fetch(endless, tmp_path / "endless", sha256(DATA))

    anyio.run(both, backend="asyncio")
    assert nothing_but(tmp_path / "resumed") == ["resumed"]


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[str, str]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                    "-days", "1", "-keyout", key, "-out", cert], check=True, capture_output=True)
    return str(cert), str(key)


async def test_untrusted_certificate_fails_at_once_unless_insecure(tmp_path: Path,
                                                                   self_signed: tuple[str, str]) -> None:
    with FileServer(tls=self_signed).running() as server:
        url = server.add("/f", DATA)
        target = tmp_path / "out" / "item"
        with pytest.raises(DownloadError, match=r"certificate is not trusted: self-signed.*\"insecure\": true"):
            await fetch(url, target, sha256(DATA))
        assert server.requests == []  # refused at the handshake, and not tried again
        async with open_downloader(FAST) as downloader:
            with VerifiedFile(target, sha256(DATA)) as out:
                await downloader.fetch(url, out, insecure=True)
        assert target.read_bytes() == DATA
