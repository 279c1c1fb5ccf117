"""osbuild's host services: the library's host modules aosbuild has no native version of, run as osbuild runs them.

A host service is the module's executable, started as `<module> --service-id <id> --service-fd <fd>` with
one end of a `SOCK_SEQPACKET` socketpair (jsoncomm framing, as `aosbuild.osbuild_api`), `PYTHONPATH` at
the library's `osbuild` package and its output as log lines `<id> (<module>): <line>`. The engine calls
`{"type": "method", "data": {"name", "args"}}` and gets `{"type": "reply", "data": {"reply"}}` (or
`"signal"` events before it, or `"exception"` with `name`, `value`, `backtrace`). A service ignores
SIGINT and SIGTERM and tears down what it made (unmount, close) when its socket closes, then exits.

So that happens whatever ends the build: the engine closes the socket first and waits for the service,
shielded from cancellation; a killed engine's socket closes too (services are not killed with the
engine, unlike stages, for that reason); only a service that does not exit in time is killed.

Kinds run this way, each where aosbuild has no native implementation of the type: inputs (`map`, with
osbuild's `store` endpoint for reading pipeline trees and the sources directory), devices (`open`, then
`close` when the service stops), mounts (`mount`, `umount` on stop) and sources (`download`, run before
the stages that use their items, into the store's `sources/<content type>/`). Mount services work on the
stage's tree on the host, so a layered tree is mounted there for them (`open_host_tree`).
"""

from __future__ import annotations

import array
import json
import os
import posixpath
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import anyio

from . import process
from .confine import resolve_inside
from .errors import AosbuildError, SandboxError
from .manifest import Device, Input, Mount
from .moduleinfo import ModuleInfo
from .osbuild_api import Endpoint
from .sandbox import INPUTS, MOUNTS, Bind
from .sandboxside.runnerlib import MNT_DETACH, umount
from .sandboxside.stageapi import receive_packet
from .store import layers as overlay
from .store.pins import TreeView

STOP_SECONDS = 30.0  # a service unmounting a large filesystem syncs it first
VIA_FD = b"<args-via-fd>"
MAX_INLINE = 64000  # osbuild's fallback for wmem_max: larger messages go in a memfd


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
        fds: list[int] = []
        if len(data) > MAX_INLINE:  # a source's many items: in a memfd, as osbuild's jsoncomm sends them
            memfd = os.memfd_create("aosbuild-host-call", os.MFD_CLOEXEC)
            os.write(memfd, data)
            os.lseek(memfd, 0, os.SEEK_SET)
            data, fds = VIA_FD, [memfd]
        try:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            while True:
                try:
                    self.sock.sendmsg([data], ancillary)
                    break
                except BlockingIOError:
                    await anyio.wait_writable(self.sock)
        finally:
            for fd in fds:
                os.close(fd)
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
async def open_service(module: ModuleInfo, uid: str, on_line: Callable[[str], None], *,
                       labelled: bool = True) -> AsyncIterator[ServiceClient]:
    """Start the module as a host service; on exit close its socket and wait for it to tear down and exit.
    Its lines go to `on_line` as `<uid> (<module>): <line>`, or bare if not `labelled` (a source's, which
    the monitor labels so itself)."""
    if module.path is None:
        raise SandboxError(f"{module.kind.lower()} {module.name} has no host service in {module.root}")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.set_inheritable(True)
    name = module.path.name
    argv = [os.fspath(module.path), "--service-id", uid, "--service-fd", str(theirs.fileno())]
    exited = anyio.Event()

    def line(text: str) -> None:
        on_line(f"{uid} ({name}): {text}" if labelled else text)

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


def split_mounts(mounts: Sequence[Mount], native: Callable[[str], bool]) -> tuple[list[Mount], list[Mount]]:
    """The stage's mounts made by host services (on the host, before the sandbox starts) and those made
    natively (in the sandbox, after): a type aosbuild lacks goes to its service, the others stay native,
    as long as that keeps the manifest's order, i.e. every service mount comes before every native one.
    Otherwise (a bind of `mount://` after an ext4, a service mount below a native one) all of them go
    through services, so each is made on top of the ones before it, as in osbuild."""
    kinds = [native(m.type) for m in mounts]
    if any(kinds[i] and not kinds[j] for i in range(len(kinds)) for j in range(i + 1, len(kinds))):
        return list(mounts), []
    return ([m for m, ours in zip(mounts, kinds, strict=True) if not ours],
            [m for m, ours in zip(mounts, kinds, strict=True) if ours])


LOCATIONS = ("tree://", "mount://")


def check_locations(mount: Mount, *, root: Path, tree: Path) -> None:
    """Refuse a mount whose target or `tree://`/`mount://` options lead out of the tree or the mounts
    (through a symlink an earlier stage planted, `/etc -> /` say): osbuild's services resolve them on
    the host, with the host's `/`, in the host's mount namespace (`mount --rbind TREE/etc ...`).
    Nothing changes the tree or the mounts between this check and the service's call: the stage has
    not started, and the services before it only mounted."""
    places = [mount.target, *(v for v in mount.options.values() if isinstance(v, str) and v.startswith(LOCATIONS))]
    for place in places:
        if not isinstance(place, str):
            continue
        base, relatives = root, [place]
        if place.startswith(LOCATIONS):
            url = urlparse(place)
            base = tree if url.scheme == "tree" else root
            relatives = [url.netloc, url.netloc + url.path]  # osbuild's bind takes the netloc alone
        for relative in relatives:
            if resolve_inside(base, relative.lstrip("/")) is None:
                raise SandboxError(f"mount '{mount.name}': {place} resolves outside the stage's "
                                   f"{'tree' if base == tree else 'mounts'}")


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
            check_locations(mount, root=root, tree=tree)
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


# -- the stage's tree, for mount services --------------------------------------------------------------------

# Mounts the stage's overlay (paths relative to the store, $1) at $2 with options $3, as the sandbox's own
# mount namespace does (retrying while the previous stage's sandbox still holds its upper dir, a failed
# try's volatile mark in the workdir $5 cleared before the next: `layers.clear_volatile_mark`), says so,
# then waits for the engine's end of the pipe $4 to close (the engine is done, or dead) and unmounts it. It
# ignores SIGINT and SIGTERM for the same reason host services do: its unmount must happen. bash, not sh:
# dash redirects only one-digit descriptors.
TREE_HOLDER = (
    'trap "" INT TERM; cd "$1" || exit 125; n=0; '
    'until mount -t overlay aosbuild -o "$3" "$2" 2>/dev/null; do n=$((n+1)); rm -rf "$5/work/incompat/volatile"; '
    'if [ $n -ge 100 ]; then mount -t overlay aosbuild -o "$3" "$2"; exit 125; fi; sleep 0.05; done; '
    'echo mounted; read -r _ <&"$4"; umount --lazy "$2"')
MOUNTED = "mounted"


@asynccontextmanager
async def open_host_tree(tree: overlay.Overlay, store_root: Path,
                         on_line: Callable[[str], None]) -> AsyncIterator[Path]:
    """The stage's merged tree (its new layer over the layers below), mounted on the host at
    `tree.target` for as long as the context lasts: osbuild's mount services work in the engine's mount
    namespace, and read and mount into the tree the stage sees (a bind of `tree://etc`, a disk bound over
    `tree://`), which the layered store otherwise mounts only inside the stage's own namespace.

    A holder process makes the mount and takes it down when its pipe from the engine closes, so a killed
    engine leaves it nowhere either (the services' mounts below it go first, or with its lazy unmount)."""
    read_end, write_end = os.pipe()
    mounted, exited = anyio.Event(), anyio.Event()
    argv = ["bash", "-c", TREE_HOLDER, "aosbuild-tree", os.fspath(store_root), os.fspath(tree.target),
            tree.options(store_root), str(read_end), os.fspath(tree.work or "/nonexistent")]

    def line(text: str) -> None:
        if text.strip() == MOUNTED:
            mounted.set()
        else:
            on_line(f"tree ({tree.target.name}): {text}")

    def started() -> None:
        os.close(read_end)

    try:
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope(shield=True)  # only the engine ends it, once its pipe is closed

            async def hold() -> None:
                with scope:
                    await process.run_streaming(argv, on_line=line, pass_fds=[read_end], on_started=started,
                                                death_signal=False)
                exited.set()
                mounted.set()

            tg.start_soon(hold)
            try:
                await mounted.wait()
                if exited.is_set():
                    raise SandboxError(f"cannot mount the stage's tree for its mount services at {tree.target}")
                yield tree.target
            finally:
                os.close(write_end)
                write_end = -1
                with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_SECONDS):
                    await exited.wait()
                scope.cancel()  # still running: SIGTERM (ignored), grace, SIGKILL
    finally:
        if write_end >= 0:
            os.close(write_end)


# -- inputs ---------------------------------------------------------------------------------------------------

class StoreApi:
    """osbuild's `store` endpoint, which input services call: `read-tree` (a pipeline's tree), `read-tree-at`
    (that tree bind-mounted, read-only, at a target below the stage's scratch space), `mkdtemp` (a directory
    there) and `source` (the store's directory for one content type). A tree of layers is shown through a
    read-only overlay of them, mounted on the host for the services. Its mounts go when `release`d: once the
    sandbox has them (it keeps its own copies) and when the stage is done."""

    def __init__(self, *, view_of: Callable[[str], TreeView], store_root: Path, empty: Path, sources: Path,
                 scratch: Path) -> None:
        self.view_of = view_of
        self.store_root = store_root
        self.empty = empty  # the bottom of every overlay stack
        self.sources = sources
        self.scratch = scratch
        self.binds: list[str] = []  # every mount made, in order
        self._shown: dict[tuple[Path, ...], Path] = {}

    async def _run(self, argv: list[str]) -> str | None:
        """Run a mount command; its error, or None."""
        done = await anyio.run_process(argv, check=False, cwd=self.store_root)
        if done.returncode != 0:
            return (done.stderr or done.stdout).decode(errors="replace").strip() or f"{argv[0]} failed"
        return None

    async def _tree(self, object_id: str) -> Path | None:
        try:
            view = self.view_of(object_id)
        except (KeyError, AosbuildError):
            return None
        if view.flat:
            return view.layers[0]
        if view.layers not in self._shown:
            target = self.scratch / "store-views" / str(len(self._shown))
            target.mkdir(parents=True)
            options = overlay.Overlay(target=target, lowers=view.layers, empty=self.empty).options(self.store_root)
            error = await self._run(["mount", "-t", "overlay", "aosbuild", "-o", options, os.fspath(target)])
            if error is not None:
                raise SandboxError(f"cannot show tree {object_id} to an input service: {error}")
            self.binds.append(os.fspath(target))
            self._shown[view.layers] = target
        return self._shown[view.layers]

    async def handle(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        method = msg.get("method")
        if method == "read-tree":
            tree = await self._tree(str(msg["object-id"]))
            return {"path": os.fspath(tree) if tree else None}
        if method == "read-tree-at":
            tree = await self._tree(str(msg["object-id"]))
            if tree is None:
                return {"path": None}
            target = Path(msg["target"]).resolve()  # noqa: ASYNC240 (a path the service made, in scratch)
            if not target.is_relative_to(self.scratch.resolve()):
                return {"error": f"{target} is not in the stage's scratch space"}
            source = resolve_inside(tree, str(msg.get("subtree") or "/").lstrip("/"))
            if source is None:  # a symlink in the tree, followed here on the host
                return {"error": f"subtree {msg.get('subtree')} of {msg['object-id']} resolves outside its tree"}
            # as osbuild's: recursive, private, read-only
            error = await self._run(["mount", "--rbind", "--make-rprivate", "-o", "ro", os.fspath(source),
                                     os.fspath(target)])
            if error is not None:
                return {"error": error}
            self.binds.append(os.fspath(target))
            return {"path": os.fspath(target)}
        if method == "mkdtemp":
            return {"path": tempfile.mkdtemp(suffix=msg.get("suffix"), prefix=msg.get("prefix"), dir=self.scratch)}
        if method == "source":
            return {"path": os.fspath(self.sources / str(msg["name"]))}
        raise ValueError(f"the store endpoint has no method {method!r}")

    def release(self) -> None:
        for target in reversed(self.binds):
            try:
                umount(target, MNT_DETACH)
            except OSError:
                pass  # gone with a parent mount already
        self.binds.clear()
        self._shown.clear()


@asynccontextmanager
async def open_store_api(directory: Path, store: StoreApi) -> AsyncIterator[Path]:
    """Serve `store` from a socket in `directory` while the stage's inputs are mapped and used; its path."""
    os.makedirs(directory, exist_ok=True)
    endpoint = Endpoint(directory / "store", store.handle)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(endpoint.serve)
            try:
                yield directory / "store"
            finally:
                tg.cancel_scope.cancel()
    finally:
        endpoint.close()
        store.release()


@asynccontextmanager
async def open_host_inputs(inputs: Sequence[Input], *, find: Callable[[str], ModuleInfo | None], store_api: Path,
                           root: Path, on_line: Callable[[str], None]
                           ) -> AsyncIterator[tuple[list[Bind], dict[str, Any]]]:
    """Map each input with its module's host service into `root/<name>`, as osbuild does: the binds that
    show them at /run/osbuild/inputs/<name> and the stage's `inputs` arguments (the service's reply, its
    path re-rooted). Services stop (unmap) in reverse order on exit."""
    binds: list[Bind] = []
    arguments: dict[str, Any] = {}
    async with AsyncExitStack() as stack:
        for inp in inputs:
            module = find(inp.type)
            if module is None or module.path is None:
                raise SandboxError(f"input '{inp.name}': no library has a host service for {inp.type}")
            target = root / inp.name
            target.mkdir(parents=True)
            client = await stack.enter_async_context(open_service(module, f"input/{inp.name}", on_line))
            reply = await client.call("map", {"origin": inp.origin, "refs": inp.refs, "target": os.fspath(target),
                                              "options": inp.options, "api": {"store": os.fspath(store_api)}})
            if not isinstance(reply, dict) or not isinstance(reply.get("path"), str):
                raise SandboxError(f"input '{inp.name}': {inp.type} answered map without a path")
            try:
                relative = PurePosixPath(posixpath.normpath(reply["path"])).relative_to(target)
            except ValueError:
                raise SandboxError(f"input '{inp.name}': {inp.type} mapped it at {reply['path']}, "
                                   f"outside {target}") from None
            binds.append(Bind(target, f"{INPUTS}/{inp.name}"))
            arguments[inp.name] = {**reply, "path": posixpath.normpath(f"{INPUTS}/{inp.name}/{relative}")}
        yield binds, arguments


# -- devices --------------------------------------------------------------------------------------------------

async def open_host_device(stack: AsyncExitStack, device: Device, module: ModuleInfo, *, dev: Path, tree: Path,
                           parent: str | None, on_line: Callable[[str], None]) -> dict[str, Any]:
    """Open a device with its module's host service (its node made in `dev`, the stage's /dev); the
    service closes it when it stops, which `stack` does. The reply: `path` relative to /dev, `node`."""
    client = await stack.enter_async_context(open_service(module, f"device/{device.name}", on_line))
    reply = await client.call("open", {"dev": os.fspath(dev), "tree": os.fspath(tree), "parent": parent,
                                       "options": device.options})
    if not isinstance(reply, dict) or not isinstance(reply.get("path"), str):
        raise SandboxError(f"device '{device.name}': {device.type} answered open without a path")
    return reply


# -- sources --------------------------------------------------------------------------------------------------

async def download_with_service(module: ModuleInfo, source_type: str, items: dict[str, Any], options: dict[str, Any],
                                cache: Path, on_line: Callable[[str], None]) -> list[dict[str, Any]]:
    """Fetch a source's items with its module's host service (its `fetch_all`), into `cache/<content type>/`
    as osbuild does; the item results (`success`, `metadata` with `checksum` and `cached`, `error`)."""
    async with open_service(module, f"source/{source_type}", on_line, labelled=False) as client:
        reply = await client.call("download", {"items": items, "options": options, "cache": os.fspath(cache),
                                               "output": None, "checksums": []})
    if not isinstance(reply, dict) or not isinstance(reply.get("results"), list):
        raise SandboxError(f"source {source_type}: its host service answered download without results")
    return list(reply["results"])
