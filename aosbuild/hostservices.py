"""osbuild's host services: the library's mount modules aosbuild has no native version of, run as osbuild runs them.

A host service is the module's executable, started as `<module> --service-id <id> --service-fd <fd>` with
one end of a `SOCK_SEQPACKET` socketpair (jsoncomm framing, as `aosbuild.osbuild_api`), `PYTHONPATH` at
the library's `osbuild` package and its output as log lines `<id> (<module>): <line>`. The engine calls
`{"type": "method", "data": {"name", "args"}}` and gets `{"type": "reply", "data": {"reply"}}` (or
`"signal"` events before it, or `"exception"` with `name`, `value`, `backtrace`). A service ignores
SIGINT and SIGTERM and tears down what it made (unmount, close) when its socket closes, then exits.

So that happens whatever ends the build: the engine closes the socket first and waits for the service,
shielded from cancellation; a killed engine's socket closes too (services are not killed with the
engine, unlike stages, for that reason); only a service that does not exit in time is killed.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import anyio

from . import process
from .errors import SandboxError
from .manifest import Mount
from .moduleinfo import ModuleInfo
from .sandbox import MOUNTS
from .sandboxside.stageapi import receive_packet

STOP_SECONDS = 30.0  # a service unmounting a large filesystem syncs it first
VIA_FD = b"<args-via-fd>"


class ServiceError(SandboxError):
    """A host service answered a call with an exception (osbuild's `RemoteError`)."""

    def __init__(self, uid: str, name: str, value: str) -> None:
        self.name, self.value = name, value
        super().__init__(f"host service {uid} failed: {name}: {value}")


def service_env(root: Path) -> dict[str, str]:
    """The engine's environment, with the `osbuild` package of the module's library importable."""
    package_parent = root if (root / "osbuild" / "__init__.py").exists() else None
    if package_parent is None:
        from .osbuild_api import osbuild_package

        package = osbuild_package(root)
        package_parent = package.parent if package is not None else root
    return {**os.environ, "PYTHONPATH": os.fspath(package_parent), "PYTHONUNBUFFERED": "1"}


class ServiceClient:
    """The engine's end of one running host service."""

    def __init__(self, uid: str, sock: socket.socket) -> None:
        self.uid = uid
        self.sock = sock

    async def call(self, method: str, args: Any) -> Any:
        data = json.dumps({"type": "method", "data": {"name": method, "args": args}}).encode()
        if len(data) > 64000:
            raise SandboxError(f"host service {self.uid}: the arguments of {method} are too large")
        while True:
            try:
                self.sock.sendmsg([data])
                break
            except BlockingIOError:
                await anyio.wait_writable(self.sock)
        while True:
            await anyio.wait_readable(self.sock)
            try:
                packet = receive_packet(self.sock)
            except BlockingIOError:
                continue
            if packet is None:
                raise SandboxError(f"host service {self.uid} ended before it answered {method}")
            payload, fds = packet
            if payload == VIA_FD and fds:
                with os.fdopen(fds.pop(0), "rb") as f:
                    payload = f.read()
            for fd in fds:
                os.close(fd)
            msg = json.loads(payload)
            kind, body = msg.get("type"), msg.get("data") or {}
            if kind == "reply":
                return body.get("reply")
            if kind == "exception":
                raise ServiceError(self.uid, str(body.get("name")), str(body.get("value")))
            # "signal": an intermediate event, nothing the engine needs from mount services


@asynccontextmanager
async def open_service(module: ModuleInfo, uid: str, on_line: Callable[[str], None]) -> AsyncIterator[ServiceClient]:
    """Start the module as a host service; on exit close its socket and wait for it to tear down and exit."""
    if module.path is None:
        raise SandboxError(f"{module.kind.lower()} {module.name} has no host service in {module.root}")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.set_inheritable(True)
    name = module.path.name
    argv = [os.fspath(module.path), "--service-id", uid, "--service-fd", str(theirs.fileno())]
    exited = anyio.Event()

    def line(text: str) -> None:
        on_line(f"{uid} ({name}): {text}")

    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope(shield=True)  # only the engine ends it, once its socket is closed

        async def serve() -> None:
            with scope:
                await process.run_streaming(argv, on_line=line, env=service_env(module.root),
                                            pass_fds=[theirs.fileno()], on_started=theirs.close,
                                            death_signal=False)
            exited.set()

        tg.start_soon(serve)
        try:
            yield ServiceClient(uid, ours)
        finally:
            ours.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_SECONDS):
                await exited.wait()
            scope.cancel()  # still running: SIGTERM (ignored by services), grace, SIGKILL
            theirs.close()


def needs_host_services(mounts: Sequence[Mount], native: Callable[[str], bool]) -> bool:
    """Whether a stage's mounts go through osbuild's host services: when any of them has no native
    implementation, all of them do, so they are made in the manifest's order (one below another)."""
    return any(not native(mount.type) for mount in mounts)


@asynccontextmanager
async def open_host_mounts(mounts: Sequence[Mount], *, find: Callable[[str], ModuleInfo | None],
                           devices: dict[str, Any], root: Path, tree: Path,
                           on_line: Callable[[str], None]) -> AsyncIterator[dict[str, Any]]:
    """Mount each of the stage's mounts with its module's host service below `root`, as osbuild does;
    the stage's `mounts` argument. Unmounted (services stopped) in reverse order on exit."""
    arguments: dict[str, Any] = {}
    async with AsyncExitStack() as stack:
        for mount in mounts:
            module = find(mount.type)
            if module is None or module.path is None:
                raise SandboxError(f"mount '{mount.name}': no library has a host service for {mount.type}")
            source = None
            if mount.device is not None:
                name = devices[mount.device.name]["path"].removeprefix("/dev/")
                source = f"/dev/{name}" + (f"p{mount.partition}" if mount.partition else "")
            client = await stack.enter_async_context(open_service(module, f"mount/{mount.name}", on_line))
            path = await client.call("mount", {"source": source, "target": mount.target, "root": os.fspath(root),
                                               "tree": os.fspath(tree), "options": mount.options})
            if not path:
                arguments[mount.name] = {}
                continue
            try:
                relative = PurePosixPath(str(path)).relative_to(root)
            except ValueError:
                raise SandboxError(f"mount '{mount.name}': {mount.type} mounted at {path}, outside {root}") from None
            arguments[mount.name] = {"path": f"{MOUNTS}/{relative}"}
        yield arguments
