"""The stage side of the engine's JSON-RPC channel (standard library only).

Stages and runners run on the build root's python3, inside the sandbox, so this module must not import
anything outside the standard library. The engine hands the sandbox one end of an AF_UNIX/SOCK_SEQPACKET
socketpair and names its descriptor in `AOSBUILD_RPC_FD`. Every packet is one JSON-RPC 2.0 message; a
message too large for one packet travels in a memfd passed with SCM_RIGHTS (see `wire`).

A stage is written as::

    def main(args):
        tree, options = args["tree"], args["options"]
        ...
        return 0

    if __name__ == "__main__":
        sys.exit(stageapi.run(main))
"""

from __future__ import annotations

import _socket
import os
import sys

from . import stagejson

# Every stage imports this module at its start, so it imports only what each stage needs: `socket` (with
# `selectors` and `enum`), `typing` and `traceback` took 9 ms of 14 in the sandbox, and `json` (with `re`)
# 6 ms of CPU: messages go through `stagejson`, the same C parser and escaper without them. `_socket` is what
# `socket.socket` is built on: its sockets have the same sendmsg/recvmsg, and the engine's
# `socket.socket` objects are its subclass. `traceback` is imported when a stage fails. Descriptors are
# packed as C ints by hand: `array` imports `collections.abc` (and with it `collections`), about 1 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import IO, Any

FD_ENV = "AOSBUILD_RPC_FD"
# Payloads above this go through a memfd; below the default /proc/sys/net/core/wmem_max.
MAX_INLINE = 64000
VIA_FD = b"<payload-via-fd>"
MAX_FDS = 253
INT_SIZE = 4  # sizeof(int) on Linux: SCM_RIGHTS carries an array of them


def pack_fds(fds: list[int]) -> bytes:
    return b"".join(fd.to_bytes(INT_SIZE, sys.byteorder, signed=True) for fd in fds)


def unpack_fds(payload: bytes) -> list[int]:
    whole = len(payload) - len(payload) % INT_SIZE  # a truncated trailing int is not a descriptor
    return [int.from_bytes(payload[i:i + INT_SIZE], sys.byteorder, signed=True) for i in range(0, whole, INT_SIZE)]


class RpcError(Exception):
    """The engine answered a request with a JSON-RPC error."""


def send_message(sock: _socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one JSON-RPC message, moving it into a memfd when it does not fit into one packet."""
    data = stagejson.dumps(message).encode()
    fds = list(fds)
    memfd = -1
    if len(data) > MAX_INLINE:
        memfd = os.memfd_create("aosbuild-rpc", os.MFD_CLOEXEC)
        os.write(memfd, data)
        os.lseek(memfd, 0, os.SEEK_SET)
        data, fds = VIA_FD, [memfd, *fds]
    try:
        ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, pack_fds(fds))] if fds else []
        sock.sendmsg([data], ancillary)
    finally:
        if memfd >= 0:
            os.close(memfd)


def decode_packet(data: bytes, fds: list[int]) -> tuple[dict[str, Any], list[int]]:
    """Turn one received packet (and its descriptors) back into a message."""
    if data == VIA_FD and fds:
        memfd, fds = fds[0], fds[1:]
        with os.fdopen(memfd, "rb") as f:
            data = f.read()
    message = stagejson.loads(data)
    if not isinstance(message, dict):
        raise ValueError("JSON-RPC message is not an object")
    return message, fds


def receive_packet(sock: _socket.socket) -> tuple[bytes, list[int]] | None:
    """Receive one whole packet with its descriptors; None at end of stream.

    The packet's size is learnt by peeking with a growing buffer, so no packet is ever truncated.
    """
    size = 4096
    fd_space = _socket.CMSG_SPACE(MAX_FDS * INT_SIZE)
    while True:
        data, _, flags, _ = sock.recvmsg(size, 0, _socket.MSG_PEEK)
        if not flags & _socket.MSG_TRUNC:
            break
        size *= 2
    data, ancdata, flags, _ = sock.recvmsg(size, fd_space, _socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.extend(unpack_fds(payload))
    if not data and not fds:
        return None
    return data, fds


class Channel:
    """The stage's end of the channel: requests wait for their answer, notifications do not."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self._next_id = 0

    @classmethod
    def from_environment(cls) -> Channel:
        fd = int(os.environ[FD_ENV])
        return cls(_socket.socket(fileno=fd))

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        send_message(self.sock, message)

    def call(self, method: str, params: dict[str, Any] | None = None,
             fds: list[int] | tuple[int, ...] = ()) -> tuple[Any, list[int]]:
        self._next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": self._next_id, "method": method}
        if params is not None:
            message["params"] = params
        send_message(self.sock, message, fds)
        packet = receive_packet(self.sock)
        if packet is None:
            raise RpcError(f"the engine closed the channel during '{method}'")
        reply, reply_fds = decode_packet(*packet)
        if "error" in reply:
            raise RpcError(reply["error"].get("message", "unknown error"))
        return reply.get("result"), reply_fds


_channel: Channel | None = None


def channel() -> Channel:
    global _channel  # one channel per stage process; the descriptor is process-wide anyway
    if _channel is None:
        _channel = Channel.from_environment()
    return _channel


def arguments() -> dict[str, Any]:
    """The stage's arguments: tree, options, inputs, devices, mounts, paths and meta."""
    result, _ = channel().call("arguments")
    return dict(result)


def metadata(data: dict[str, Any]) -> None:
    """Record metadata for this stage; it ends up in the store, `--json` and the monitor stream."""
    channel().call("metadata", {"metadata": data})


def progress(done: int, total: int, message: str | None = None) -> None:
    """Report how far along the stage is (shown as a third progress level)."""
    params: dict[str, Any] = {"done": done, "total": total}
    if message:
        params["message"] = message
    channel().notify("progress", params)


def log(message: str) -> None:
    """Send one log line to the engine, beside the stage's own stdout."""
    channel().notify("log", {"message": message})


def loop_attach(fd: int, *, offset: int = 0, size: int = 0, sector_size: int = 512,
                read_only: bool = False, partscan: bool = False) -> str:
    """Ask the engine for a loop device over `fd`; returns the device path inside the sandbox."""
    result, _ = channel().call("loop.attach", {
        "offset": offset, "size": size, "sector-size": sector_size,
        "read-only": read_only, "partscan": partscan}, fds=[fd])
    return str(result["path"])


def report_exception(exc: BaseException) -> None:
    """Tell the engine why the stage failed, with the traceback a person needs."""
    import traceback

    try:
        channel().notify("exception", {
            "type": type(exc).__name__,
            "value": str(exc),
            "traceback": "".join(traceback.format_exception(exc)),
        })
    except (OSError, KeyError, ValueError):
        pass  # no channel to report on: the traceback on stderr below still reaches the log


def run(main: Callable[[dict[str, Any]], int | None]) -> int:
    """Fetch the arguments, run `main(args)` and turn an exception into a reported failure."""
    try:
        return int(main(arguments()) or 0)
    except Exception as exc:
        import traceback

        report_exception(exc)
        traceback.print_exc(file=sys.stderr)
        return 1


def resolve_location(url: str, args: dict[str, Any]) -> str:
    """Turn a location from a stage's options into a path inside the sandbox.

    `tree:///p` is below the tree, `input://<name>/p` below that input, `mount://<name>/p` below that
    mount, `mount:///p` below the root of all mounts, and a plain path (absolute or not) below the tree.
    As in osbuild, a trailing slash means "the contents of": the path then ends in `/.`, which is what
    `cp -a` needs. A location that climbs out of its root through `..`, or whose directory a symlink (one
    a manifest planted in the tree, say) sends out of its root, is refused with a ValueError.
    """
    return _locate(url, args)[1]


def _locate(url: str, args: dict[str, Any]) -> tuple[str, str]:
    """The root of a location and the location's path below it, checked as `resolve_location` says."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, name, path = "tree", "", url
    else:
        name, slash, tail = rest.partition("/")
        path = slash + tail
    if not path:
        raise ValueError(f"location '{url}' names no path; use '/' for the root, e.g. '{scheme}://{name}/'")
    if scheme == "tree":
        if name:
            raise ValueError(f"location '{url}' names '{name}', but a tree location has none: use 'tree:///<path>'")
        root = args["tree"]
    elif scheme in ("input", "mount"):
        kind = scheme + "s"
        if scheme == "mount" and not name:
            root = args["paths"]["mounts"]
        else:
            entry = args.get(kind, {}).get(name)
            if not entry or not entry.get("path"):
                known = ", ".join(sorted(args.get(kind, {}))) or "none"
                raise ValueError(f"location '{url}' refers to {scheme} '{name}', which this stage does not "
                                 f"have (its {kind}: {known}); declare it under the stage's \"{kind}\"")
            root = entry["path"]
    else:
        raise ValueError(f"location '{url}' has the unsupported scheme '{scheme}'; "
                         "use tree:///<path>, input://<name>/<path>, mount://<name>/<path> or a plain path")
    root = os.path.normpath(root)
    target = os.path.normpath(os.path.join(root, path.lstrip("/")))
    if not _inside(target, root):
        raise ValueError(f"location '{url}' escapes its root '{root}' through '..'; "
                         "write the path without climbing above it")
    # the directory the location is in must stay below its root with symlinks resolved, so that nothing
    # the stage writes there lands in /proc/sys, another input or the sandbox's own /
    directory = target if target == root or path.endswith("/") else os.path.dirname(target)
    if not _inside(os.path.realpath(directory), os.path.realpath(root)):
        raise _through_symlink(url, root)
    if path.endswith("/"):
        target = os.path.join(target, ".")
    return root, target


def _through_symlink(url: str, root: str) -> ValueError:
    return ValueError(f"location '{url}' resolves outside its root '{root}' through a symlink; "
                      "the tree, inputs and mounts may hold symlinks, a location must not follow them out")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve_confined(url: str, args: dict[str, Any], *, follow_last: bool) -> str:
    """`resolve_location`, and with `follow_last` (a destination that is written through) the location
    itself must also stay below its root with symlinks resolved."""
    root, target = _locate(url, args)
    if follow_last and not _inside(os.path.realpath(target), os.path.realpath(root)):
        raise _through_symlink(url, root)
    return target


def replace_file(path: str, mode: int = 0o644, *, binary: bool = False) -> IO[Any]:
    """A new file at `path`, open for writing, in place of whatever was there.

    What is there is removed first and the file is created with O_EXCL and O_NOFOLLOW, so a symlink at
    `path` (one a manifest planted in the tree, pointing out of it) is replaced, never written through.
    """
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    return os.fdopen(fd, "wb" if binary else "w")
