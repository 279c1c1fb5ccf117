"""osbuild's stage-side contract, for stages, assemblers and runners that come from an osbuild library.

A module from a library laid out as osbuild's (`<libdir>/osbuild`, the Python package, beside `stages/`,
`runners/`, ...) was written against osbuild, not aosbuild: it reads `/run/osbuild/api/arguments`,
writes its metadata to `/run/osbuild/meta`, reports exceptions over the `osbuild` API socket
(`/run/osbuild/api/osbuild`: jsoncomm, one JSON document per `SOCK_SEQPACKET` packet, descriptors with
`SCM_RIGHTS`), asks for loop devices over `/run/osbuild/api/remoteloop`, imports `osbuild` from
`/run/osbuild/lib`, and is started by that library's own runner. This module is the engine's side of it:
the files and sockets the sandbox binds in, and the servers behind the sockets. aosbuild's own stages
keep aosbuild's JSON-RPC channel (`aosbuild.rpc`); one build can mix both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from .errors import AosbuildError, SandboxError
from .library import split_runner_name
from .loop import LoopServer
from .sandboxside.stageapi import receive_packet, send_message

API_DIR = "/run/osbuild/api"
META = "/run/osbuild/meta"
# jsoncomm's marker for a payload too large for one packet: the JSON is in a memfd, passed as fds[0]
VIA_FD = b"<args-via-fd>"
RUNNER_NAME_MAX = 255

log = structlog.get_logger(__name__)


def osbuild_package(root: Path) -> Path | None:
    """The `osbuild` package the sandbox gets at /run/osbuild/lib/osbuild when `root`'s own folder is
    empty: the one this Python imports (osbuild's own rule); None when the library has it or none exists."""
    if any((root / "osbuild").iterdir()):
        return None
    spec = importlib.util.find_spec("osbuild")
    if spec is None or spec.origin is None:
        raise SandboxError(f"the osbuild library {root} has an empty osbuild/ folder and no osbuild package "
                           "is installed: its stages cannot import osbuild")
    return Path(spec.origin).parent


runner_version = split_runner_name  # `org.osbuild.fedora38` -> ("org.osbuild.fedora", 38)


def _follow_text_link(path: Path) -> Path:
    """A runner that is a one-line file naming another runner beside it is that runner: it is how a checkout
    without symlinks (git's `core.symlinks=false`, a copy that flattened them) leaves osbuild's aliases."""
    for _ in range(8):
        if os.access(path, os.X_OK) or path.stat().st_size > RUNNER_NAME_MAX:
            return path
        target = path.read_text(errors="replace").strip()
        if "/" in target or not target.startswith("org.") or not (path.parent / target).is_file():
            return path
        path = path.parent / target
    return path


def library_runner(root: Path, wanted: str) -> tuple[str, Path]:
    """osbuild's choice of runner in its own library: the same distribution, the highest version not above
    the wanted one (`org.osbuild.debian12` on Debian 12 is `org.osbuild.debian`); its name (what the
    sandbox calls it, as osbuild does) and the file that runs."""
    distro, version = runner_version(wanted)
    folder = root / "runners"
    candidates = sorted((runner_version(p.name)[1], p) for p in folder.iterdir()
                        if p.is_file() and runner_version(p.name)[0] == distro) if folder.is_dir() else []
    for candidate_version, path in reversed(candidates):
        if candidate_version <= version:
            return path.name, _follow_text_link(path)
    raise SandboxError(f"No suitable runner for {distro} in the osbuild library {root}"
                       f" (wanted {wanted}): its runners/ has none of that distribution at or below that version")


def write_arguments(directory: Path, arguments: dict[str, Any]) -> Path:
    """The arguments file, as the stage reads it with `osbuild.api.arguments()`."""
    path = directory / "arguments"
    path.write_text(json.dumps(arguments))
    return path


def read_metadata(path: Path) -> dict[str, Any]:
    """What the module wrote to /run/osbuild/meta (`osbuild.api.metadata()`): a JSON object, or nothing."""
    text = path.read_text()
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SandboxError(f"the stage wrote metadata that is not JSON to {META}: {exc}") from exc
    if not isinstance(data, dict):
        raise SandboxError(f"the stage wrote metadata that is not a JSON object to {META}")
    return data


def _decode(data: bytes, fds: list[int]) -> tuple[Any, list[int]]:
    if data == VIA_FD and fds:
        memfd, fds = fds[0], fds[1:]
        with os.fdopen(memfd, "rb") as f:
            data = f.read()
    return json.loads(data), fds


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiSockets:
    """Where the endpoints are on the host; the sandbox binds them to /run/osbuild/api/<endpoint>."""

    osbuild: Path
    remoteloop: Path


class RemoteLoop:
    """osbuild's `remoteloop` endpoint: a loop device over a descriptor the module passes, its node made
    in the /dev directory the module passes too; detached with the stage's other loop devices."""

    def __init__(self, loops: LoopServer) -> None:
        self.loops = loops

    async def attach(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        backing, dev_dir = fds[int(msg["fd"])], fds[int(msg["dir_fd"])]
        device = await self.loops.attach(
            backing, offset=int(msg.get("offset") or 0), size=int(msg.get("sizelimit") or 0),
            sector_size=int(msg.get("sector_size", 512)), read_only=bool(msg.get("read_only")),
            partscan=bool(msg.get("partscan")), lock=bool(msg.get("lock")))
        nodes = [(device.name, device.major, device.minor), *device.partitions]
        for name, major, minor in nodes:
            try:
                os.mknod(name, 0o600 | stat.S_IFBLK, os.makedev(major, minor), dir_fd=dev_dir)
            except FileExistsError:
                pass
        return {"devname": device.name}


class Endpoint:
    """One listening socket and the connections it accepted; each packet is one message to `handle`."""

    def __init__(self, path: Path, handle: Callable[[dict[str, Any], list[int]], Awaitable[Any]]) -> None:
        self.handle = handle
        self.clients: list[socket.socket] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            # through the directory's descriptor: a store's scratch path may pass sun_path's 108 bytes
            dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self.listener.bind(f"/proc/self/fd/{dir_fd}/{path.name}")
            finally:
                os.close(dir_fd)
            self.listener.listen(64)
            self.listener.setblocking(False)
        except BaseException:
            self.listener.close()
            raise

    def close(self) -> None:
        for sock in [*self.clients, self.listener]:
            sock.close()
        self.clients.clear()

    def _accept(self) -> socket.socket | None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return None
        client.setblocking(False)
        self.clients.append(client)
        return client

    async def _one(self, sock: socket.socket) -> bool:
        """Handle one waiting packet; False at the end of the connection or when none is waiting."""
        try:
            packet = receive_packet(sock)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            packet = None
        if packet is None:
            if sock in self.clients:
                self.clients.remove(sock)
            sock.close()
            return False
        fds: list[int] = []
        try:
            msg, fds = _decode(*packet)
            reply = await self.handle(msg, fds) if isinstance(msg, dict) else None
        except (ValueError, KeyError, TypeError, IndexError, AosbuildError, OSError) as exc:
            # what osbuild's servers do with a failed request: an exception message back to the client
            log.warning("osbuild_api.bad_message", error=repr(exc))
            reply = {"method": "exception",
                     "exception": {"type": type(exc).__name__, "value": str(exc), "traceback": ""}}
        finally:
            for fd in fds:
                os.close(fd)
        if reply is not None:
            with contextlib.suppress(OSError):
                send_message(sock, reply)
        return True

    async def _serve_client(self, sock: socket.socket) -> None:
        while sock in self.clients:
            await anyio.wait_readable(sock)
            await self._one(sock)

    async def serve(self) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                await anyio.wait_readable(self.listener)
                client = self._accept()
                if client is not None:
                    tg.start_soon(self._serve_client, client)

    async def drain(self) -> None:
        """Handle what the module sent before it exited: connections not yet accepted, packets not yet read."""
        while self._accept() is not None:
            pass
        for sock in list(self.clients):
            while sock in self.clients and await self._one(sock):
                pass


class OsbuildApi:
    """The running endpoints of one stage; `drain()` once the stage has exited, before they close."""

    def __init__(self, sockets: ApiSockets, endpoints: list[Endpoint]) -> None:
        self.sockets = sockets
        self._endpoints = endpoints

    async def drain(self) -> None:
        for endpoint in self._endpoints:
            await endpoint.drain()


@asynccontextmanager
async def open_api(directory: Path, *, on_exception: Callable[[dict[str, Any]], None],
                   loops: LoopServer) -> AsyncIterator[OsbuildApi]:
    """Serve the `osbuild` and `remoteloop` endpoints from sockets in `directory` until the stage is done.

    `osbuild` takes `{"method": "exception", "exception": {type, value, traceback}}` (what osbuild's
    `api.exception_handler()` sends, from a stage or a runner); `remoteloop` attaches loop devices.
    """
    os.makedirs(directory, exist_ok=True)
    sockets = ApiSockets(osbuild=directory / "osbuild", remoteloop=directory / "remoteloop")
    remote = RemoteLoop(loops)

    async def osbuild(msg: dict[str, Any], fds: list[int]) -> None:
        if msg.get("method") == "exception" and isinstance(msg.get("exception"), dict):
            on_exception(dict(msg["exception"]))
        else:
            log.debug("osbuild_api.ignored", method=msg.get("method"))

    async def remoteloop(msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return await remote.attach(msg, fds)

    endpoints: list[Endpoint] = []
    try:
        endpoints.append(Endpoint(sockets.osbuild, osbuild))
        endpoints.append(Endpoint(sockets.remoteloop, remoteloop))
        async with anyio.create_task_group() as tg:
            for endpoint in endpoints:
                tg.start_soon(endpoint.serve)
            try:
                yield OsbuildApi(sockets, endpoints)
            finally:
                tg.cancel_scope.cancel()
    finally:
        for endpoint in endpoints:
            endpoint.close()
