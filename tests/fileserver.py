"""A real HTTP file server on 127.0.0.1 for download tests, which misbehaves on request.

Each path serves a body; a list of faults is used up one per request, in order, then the path behaves:

- `drop`: announce the whole length, send half of it, close the connection
- `stall`: send half of the body, then nothing until the test ends (the client must time out)
- `503`, `429`, `404`, `500`: answer with that status
- `wrong`: the right length, other bytes
- `toomany`: announce the length but send more, chunked (a proxy that ignored Content-Length)
- `endless`: no length, and more bytes than the file has, until the connection closes

Range requests are honoured unless `ranges=False`. A `gate` holds a path's responses until the test sets
it. Every request is recorded with its headers, and `barrier` makes requests wait for each other, so
a test can show how many run at the same time without sleeping.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOLD_LIMIT = 30.0  # no response is held longer than this, so a broken test fails instead of hanging


class Hold(threading.Event):
    """A gate for every route that counts the requests held at it, so the test can wait for them."""

    def __init__(self) -> None:
        super().__init__()
        self.held = 0
        self.changed = threading.Condition()

    def wait(self, timeout: float | None = None) -> bool:
        with self.changed:
            self.held += 1
            self.changed.notify_all()
        try:
            return super().wait(timeout)
        finally:
            with self.changed:
                self.held -= 1

    def peak(self, floor: int, window: float) -> int:
        """Wait until `floor` requests are held, then up to `window` seconds for more; how many are held."""
        with self.changed:
            assert self.changed.wait_for(lambda: self.held >= floor, timeout=HOLD_LIMIT - 10), self.held
            self.changed.wait_for(lambda: self.held > floor, timeout=window)
            return self.held


@dataclass
class Route:
    body: bytes
    faults: list[str] = field(default_factory=list)
    ranges: bool = True
    gate: threading.Event | None = None


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


class FileServer:
    """Serves HTTP, or HTTPS with `tls=(certificate file, key file)`."""

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[Seen] = []
        self.arrived: dict[str, threading.Event] = {}
        self.stalled: dict[str, threading.Event] = {}  # set once a `stall` response has sent its half
        self.barrier: threading.Barrier | None = None
        self.active = 0
        self.most_active = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
            self.scheme = "https"
        self._httpd.daemon_threads = True
        self._httpd.files = self  # type: ignore[attr-defined]  # how handlers find their server's routes

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def add(self, path: str, body: bytes, *faults: str, ranges: bool = True,
            gate: threading.Event | None = None) -> str:
        self.routes[path] = Route(body=body, faults=list(faults), ranges=ranges, gate=gate)
        self.arrived[path] = threading.Event()
        self.stalled[path] = threading.Event()
        return self.url(path)

    def count(self, path: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path == path)

    def seen(self, path: str) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    @contextmanager
    def running(self) -> Iterator[FileServer]:
        thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stopping.set()
            for route in self.routes.values():
                if route.gate is not None:
                    route.gate.set()
            if self.barrier is not None:
                self.barrier.abort()
            self._httpd.shutdown()
            self._httpd.server_close()
            thread.join()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet: tests read requests, not logs
        pass

    def do_GET(self) -> None:
        files: FileServer = self.server.files  # type: ignore[attr-defined]
        route = files.routes.get(self.path)
        with files._lock:
            files.requests.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}))
            fault = route.faults.pop(0) if route and route.faults else None
            files.active += 1
            files.most_active = max(files.most_active, files.active)
        try:
            if route is not None:
                files.arrived[self.path].set()
                if route.gate is not None:
                    route.gate.wait(HOLD_LIMIT)
            if files.barrier is not None:
                files.barrier.wait(HOLD_LIMIT)
            self._respond(files, route, fault)
        finally:
            with files._lock:
                files.active -= 1

    def _simple(self, status: int, headers: dict[str, str] | None = None) -> None:
        body = f"{status}\n".encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _respond(self, files: FileServer, route: Route | None, fault: str | None) -> None:
        if route is None:
            self._simple(404)
            return
        if fault in ("503", "500", "404"):
            self._simple(int(fault))
            return
        if fault == "429":
            self._simple(429, {"Retry-After": "0"})
            return
        body = route.body
        if fault == "wrong":
            body = bytes(b ^ 0xFF for b in body)
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and route.ranges and int(match.group(1)) < len(body):
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("ETag", '"v1"')
        rest = body[start:]
        if fault == "toomany":
            extra = rest + b"and then some more"
            self.send_header("Content-Length", str(len(rest)))
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(extra), extra))
            return
        if fault == "endless":
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self.wfile.write(rest * 3)
            return
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        if fault in ("drop", "stall"):
            self.wfile.write(rest[: len(rest) // 2])
            self.wfile.flush()
            if fault == "stall":
                files.stalled[self.path].set()
                files.stopping.wait(HOLD_LIMIT)
            self.close_connection = True
            return
        self.wfile.write(rest)
