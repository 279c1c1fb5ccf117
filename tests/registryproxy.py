"""A TCP proxy in front of a test registry that misbehaves on cue, for the remote cache's failure drills.

Once one connection has carried `after` bytes from the registry (only a layer blob is that large), or to
it with `uploads`, the proxy does `fault`: "stall" stops forwarding and holds the connection open
without a word (a registry that hangs); "stop" calls `on_stop` (the test kills the registry) and cuts
the connection (a registry stopped mid-pull or mid-push). It runs in threads of its own, stopped by `close()`
or at the end of its `with` block.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Literal, Self

Fault = Literal["stall", "stop"]


class FaultyProxy:
    def __init__(self, upstream: tuple[str, int], *, after: int, fault: Fault,
                 on_stop: Callable[[], None] = lambda: None, uploads: bool = False) -> None:
        self.upstream = upstream
        self.uploads = uploads  # count the bytes sent to the registry (a push) instead of those from it
        self.after = after
        self.fault = fault
        self.on_stop = on_stop
        self.triggered = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._start(self._accept)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _keep(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
        return sock

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = self._keep(socket.create_connection(self.upstream))
            except OSError:
                client.close()
                continue
            self._keep(client)
            self._start(self._pump, client, server, False)
            self._start(self._pump, server, client, True)

    def _pump(self, source: socket.socket, sink: socket.socket, from_registry: bool) -> None:
        carried = 0
        try:
            while data := source.recv(65536):
                if from_registry != self.uploads and not self.triggered.is_set() and carried + len(data) > self.after:
                    with self._lock:
                        first = not self.triggered.is_set()
                        self.triggered.set()
                    if first:
                        sink.sendall(data[:max(self.after - carried, 0)])
                        if self.fault == "stall":
                            self._closing.wait()  # silent, the connection held open, until the test ends
                        else:
                            self.on_stop()
                        break
                carried += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closing.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the other thread (close does not)
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in threads:
            thread.join(timeout=10)
