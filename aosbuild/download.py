"""Downloads over HTTP(S): one URL into a `VerifiedFile`, many URLs at once within limits.

`open_downloader` gives a `Downloader`, which owns the HTTP clients (httpx, which runs on anyio and so on
trio and asyncio alike) and two bounds: at most `jobs` transfers at once overall, and at most `per_host`
to any one host. One `fetch` downloads one URL and, on the way:

- hashes the bytes as they are written, and commits the file only when the checksum matches;
- retries, with exponential backoff and jitter, a broken or refused connection, a server that sends
  nothing for `timeout` seconds, and HTTP 408, 429 and 5xx (honouring `Retry-After`), up to `attempts`
  times; other 4xx are final at once, since asking again gets the same answer;
- resumes a cut transfer with a `Range` request (guarded by `If-Range`) and starts over when the server
  answers with the whole file, another range or another size;
- stops as soon as the server sends more bytes than it announced;
- raises `DownloadError` naming the URL, never an httpx exception.

httpx is imported on first use: a build that downloads nothing does not pay for it.
"""

from __future__ import annotations

import os
import platform
import random
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from . import __version__
from .checksum import VerifiedFile
from .errors import ChecksumMismatch, DownloadError

if TYPE_CHECKING:
    import ssl

    import httpx

# Mirrors throttle or ban clients that open many connections (osbuild #443 cut its parallel curls for
# that reason); 4 per host keeps one mirror from being hammered while 8 overall can still fill several.
PER_HOST = 4
JOBS = 8
TIMEOUT = 30.0          # seconds without a byte, as curl's connect-timeout and speed-limit in osbuild
ATTEMPTS = 6            # the first try and 5 retries, after at most 15.5 s of backoff in all
BACKOFF = 0.5           # the first retry's delay; doubled each time
MAX_DELAY = 60.0        # no wait between attempts is longer, whatever Retry-After says
RETRY_STATUS = frozenset({408, 429})  # and every 5xx


@dataclass(frozen=True, slots=True, kw_only=True)
class DownloadOptions:
    jobs: int = JOBS
    per_host: int = PER_HOST
    timeout: float = TIMEOUT
    attempts: int = ATTEMPTS
    backoff: float = BACKOFF


class Progress(Protocol):
    """What a download reports while it runs; sizes are of the whole file."""

    def expect(self, size: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def rewind(self, nbytes: int) -> None: ...  # bytes thrown away to start over
    def retry(self, message: str) -> None: ...


class NoProgress:
    def expect(self, size: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def rewind(self, nbytes: int) -> None: ...
    def retry(self, message: str) -> None: ...


class _Retry(Exception):
    """This attempt failed in a way that another attempt may not."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay  # None: the usual backoff


@dataclass(slots=True)
class _Transfer:
    """What one URL's attempts have learned so far."""

    size: int | None = None         # the whole file's size, once a response said it
    validator: str | None = None    # ETag or Last-Modified, for If-Range
    responses: int = 0              # responses whose bytes make up the file


CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """`(first, last, size)` of a `Content-Range: bytes first-last/size` header (size None for `*`)."""
    match = CONTENT_RANGE.fullmatch((value or "").strip())
    if match is None:
        return None
    first, last, size = match.groups()
    return int(first), int(last), None if size == "*" else int(size)


def retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after", "")
    return float(value) if value.strip().isdigit() else None


def describe_transport_error(exc: Exception, timeout: float) -> str:
    import httpx

    if isinstance(exc, httpx.ConnectTimeout):
        return f"could not connect within {timeout:g}s"
    if isinstance(exc, httpx.TimeoutException):
        return f"the server sent nothing for {timeout:g}s"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {root_cause(exc)}"
    return f"connection broken: {root_cause(exc)}"


def root_cause(exc: BaseException) -> str:
    """The first non-empty message down the chain: httpx's own is empty for some errors on trio."""
    seen: BaseException | None = exc
    while seen is not None:
        if str(seen):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


def certificate_refusal(exc: BaseException) -> str | None:
    """The TLS verification failure behind a connection error, if that is what it was."""
    import ssl  # here, as httpx is: ssl is 8 ms of every command's start (the command line imports this module)

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"the server's certificate is not trusted: {seen.verify_message}"
        if "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return f"the server's certificate is not trusted: {seen}"
        seen = seen.__cause__ or seen.__context__
    return None


@asynccontextmanager
async def open_downloader(options: DownloadOptions | None = None) -> AsyncIterator[Downloader]:
    async with AsyncExitStack() as stack:
        yield Downloader(options or DownloadOptions(), stack)


class Downloader:
    """Downloads URLs into verified files; create it with `open_downloader`."""

    def __init__(self, options: DownloadOptions, stack: AsyncExitStack) -> None:
        self.options = options
        self._stack = stack
        self._slots = anyio.Semaphore(options.jobs)
        self._hosts: dict[tuple[str, str, int | None], anyio.Semaphore] = {}
        self._clients: dict[tuple[bool, str | None], httpx.AsyncClient] = {}
        self._client_lock = anyio.Lock()

    async def _client(self, insecure: bool, secrets: str | None) -> httpx.AsyncClient:
        async with self._client_lock:
            client = self._clients.get((insecure, secrets))
            if client is None:
                # loading the CA bundle takes a good part of a second: not on the event loop
                client = await anyio.to_thread.run_sync(make_client, self.options, insecure, secrets)
                self._stack.push_async_callback(client.aclose)
                self._clients[(insecure, secrets)] = client
            return client

    @asynccontextmanager
    async def _slot(self, url: httpx.URL) -> AsyncIterator[None]:
        # the host first: a transfer waiting for its busy host must not hold one of the overall slots
        host = self._hosts.setdefault((url.scheme, url.host, url.port), anyio.Semaphore(self.options.per_host))
        async with host, self._slots:
            yield

    async def fetch(self, url: str, out: VerifiedFile, progress: Progress | None = None, *,
                    insecure: bool = False, secrets: str | None = None) -> None:
        """Download `url` into `out` and commit it; DownloadError if that cannot be done."""
        import httpx

        progress = progress or NoProgress()
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise DownloadError(url, f"not a valid URL: {exc}; fix the source item's URL") from None
        if parsed.scheme not in ("http", "https"):
            raise DownloadError(url, "aosbuild downloads http:// and https:// URLs only: serve the file over "
                                "HTTP(S), or put a small one in the manifest as an org.osbuild.inline item")
        if parsed.port is not None and not 0 < parsed.port < 65536:  # asking again cannot help
            raise DownloadError(url, f"invalid port {parsed.port} in the URL (ports are 1 to 65535); "
                                "fix the source item's URL")
        if secrets not in (None, "org.osbuild.mtls"):
            raise DownloadError(url, f"aosbuild has no secrets provider '{secrets}': use org.osbuild.mtls or "
                                "leave `secrets` out")
        try:
            client = await self._client(insecure, secrets)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise DownloadError(url, f"cannot set up TLS: {exc}; check the files OSBUILD_SOURCES_CURL_SSL_* name"
                                ) from None
        transfer = _Transfer()
        attempt = 0
        started_over = False
        while True:
            attempt += 1
            try:
                async with self._slot(parsed):
                    await self._attempt(client, url, out, progress, transfer)
                out.commit()
                return
            except _Retry as exc:
                if attempt >= self.options.attempts:
                    raise DownloadError(url, f"{exc.reason} (gave up after {attempt} attempts)") from None
                delay = self._delay(attempt) if exc.delay is None else min(exc.delay, MAX_DELAY)
                progress.retry(f"{exc.reason}; attempt {attempt + 1} of {self.options.attempts} "
                               f"in {delay:.1f}s")
                await anyio.sleep(delay)
            except ChecksumMismatch as exc:
                # bytes pieced together from several responses may come from two versions of the file:
                # one whole download decides
                if transfer.responses <= 1 or started_over:
                    raise DownloadError(url, str(exc)) from None
                started_over = True
                progress.rewind(out.size)
                out.rewind()
                transfer.responses = 0

    def _delay(self, attempt: int) -> float:
        # jitter, so transfers that failed together do not all come back together
        delay: float = min(self.options.backoff * 2.0 ** (attempt - 1), MAX_DELAY)
        return delay * random.uniform(0.5, 1.0)

    async def _attempt(self, client: httpx.AsyncClient, url: str, out: VerifiedFile, progress: Progress,
                       transfer: _Transfer) -> None:
        import httpx

        headers = {}
        offset = out.size
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if transfer.validator:
                headers["If-Range"] = transfer.validator
        try:
            async with client.stream("GET", url, headers=headers) as response:
                end = self._accept(response, url, out, progress, transfer, offset)
                transfer.responses += 1
                await self._receive(response, url, out, progress, end)
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.TooManyRedirects) as exc:
            raise DownloadError(url, str(exc)) from None
        except httpx.ConnectError as exc:
            refusal = certificate_refusal(exc)
            if refusal is not None:  # asking again gets the same certificate
                raise DownloadError(url, f"{refusal} (an item with \"insecure\": true is not verified)") from None
            raise _Retry(describe_transport_error(exc, self.options.timeout)) from None
        except httpx.TransportError as exc:
            raise _Retry(describe_transport_error(exc, self.options.timeout)) from None
        if end is not None and out.size < end:
            raise _Retry(f"the connection closed after {out.size} of {end} bytes")

    @staticmethod
    async def _receive(response: httpx.Response, url: str, out: VerifiedFile, progress: Progress,
                       end: int | None) -> None:
        failure: Exception | None = None
        # httpx's body is a chain of async generators, and leaving the loop early would leave the inner
        # ones suspended (encode/httpx#3686). To stop, cancel instead: the next network read raises
        # Cancelled inside the innermost generator, which then closes them all on its way out.
        with anyio.CancelScope() as stop:
            async for chunk in response.aiter_raw():
                if failure is not None:
                    continue
                try:
                    if end is not None and out.size + len(chunk) > end:
                        raise DownloadError(url, f"the server sent more than the {end} bytes it announced")
                    out.write(chunk)
                except (DownloadError, OSError) as exc:
                    failure = exc
                    stop.cancel()
                else:
                    progress.advance(len(chunk))
        if failure is not None:
            raise failure

    @staticmethod
    def _accept(response: httpx.Response, url: str, out: VerifiedFile, progress: Progress,
                transfer: _Transfer, offset: int) -> int | None:
        """Check a response's status and headers; the size the file must have at its end, if known."""
        status = response.status_code
        what = f"HTTP {status} {response.reason_phrase}".rstrip()
        if status in RETRY_STATUS or status >= 500:
            raise _Retry(what, retry_after(response.headers))
        if status == 416 and offset:
            progress.rewind(offset)
            out.rewind()
            raise _Retry(f"{what} for bytes {offset}-; starting over", delay=0)
        if status >= 400:
            raise DownloadError(url, f"{what} (not retried: asking again gets the same answer)")
        if status == 206:
            content_range = parse_content_range(response.headers.get("content-range"))
            first, last, size = content_range or (-1, -1, None)
            if first != offset or (size is not None and transfer.size not in (None, size)):
                progress.rewind(offset)
                out.rewind()
                raise _Retry(f"the server answered with another range "
                             f"({response.headers.get('content-range')}); starting over", delay=0)
            transfer.size = size if size is not None else transfer.size
            if transfer.size is not None:
                progress.expect(transfer.size)
            return last + 1
        if status != 200:
            raise DownloadError(url, f"{what}: not a file")
        if offset:  # the whole file again, not the rest of it
            progress.rewind(offset)
            out.rewind()
            transfer.responses = 0
        length = response.headers.get("content-length", "")
        if length.isdigit():
            transfer.size = int(length)
        validator = response.headers.get("etag", "")
        transfer.validator = None if validator.startswith("W/") else validator or \
            response.headers.get("last-modified")
        if transfer.size is not None:
            progress.expect(transfer.size)
        return transfer.size


def make_client(options: DownloadOptions, insecure: bool, secrets: str | None) -> httpx.AsyncClient:
    """An HTTP client as osbuild's curl is set up: redirects followed, bytes as served, its proxy."""
    import httpx

    verify: bool | ssl.SSLContext = mtls_context(insecure) if secrets == "org.osbuild.mtls" else not insecure
    return httpx.AsyncClient(
        verify=verify, follow_redirects=True, proxy=os.environ.get("OSBUILD_SOURCES_CURL_PROXY") or None,
        timeout=httpx.Timeout(options.timeout, pool=None),
        limits=httpx.Limits(max_connections=options.jobs, max_keepalive_connections=options.jobs),
        # identity: the checksum is of the file as stored on the server, not of a decoded body
        headers={"User-Agent": f"aosbuild/{__version__} (Linux.{platform.machine()})",
                 "Accept-Encoding": "identity"})


def mtls_context(insecure: bool) -> ssl.SSLContext:
    """Client certificate from osbuild's environment variables for `org.osbuild.mtls` items."""
    import ssl

    key = os.environ.get("OSBUILD_SOURCES_CURL_SSL_CLIENT_KEY")
    cert = os.environ.get("OSBUILD_SOURCES_CURL_SSL_CLIENT_CERT")
    if not key or not cert:
        raise ValueError("org.osbuild.mtls needs OSBUILD_SOURCES_CURL_SSL_CLIENT_KEY and "
                         "OSBUILD_SOURCES_CURL_SSL_CLIENT_CERT: set them to the client's key and certificate files")
    context = ssl.create_default_context(cafile=os.environ.get("OSBUILD_SOURCES_CURL_SSL_CA_CERT"))
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(cert, key)
    return context
