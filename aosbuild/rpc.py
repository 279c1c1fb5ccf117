"""The engine's end of the stage channel: JSON-RPC 2.0 over an AF_UNIX/SOCK_SEQPACKET socketpair.

One packet is one message; descriptors travel with SCM_RIGHTS. The wire format is shared with the stage
side (`aosbuild.stageapi`), which is why the framing helpers live there, in standard-library-only code.
Requests get a reply (a result or a JSON-RPC error); notifications (`log`, `progress`, `exception`) do not.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import structlog

from .sandboxside.stageapi import decode_packet, receive_packet, send_message

# A handler takes the params and the received descriptors; it returns a result and descriptors to send.
Handler = Callable[[dict[str, Any], list[int]], Awaitable[tuple[Any, list[int]]]]

METHOD_NOT_FOUND = -32601
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
SERVER_ERROR = -32000

log = structlog.get_logger(__name__)


def open_socketpair() -> tuple[socket.socket, socket.socket]:
    """A (engine, stage) pair; the stage end is inheritable so it can be passed into the sandbox."""
    engine, stage = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    engine.setblocking(False)
    stage.set_inheritable(True)
    return engine, stage


class HandlerError(Exception):
    """Raised by a handler to answer with a JSON-RPC error the stage will see as its message."""


async def _send(sock: socket.socket, message: dict[str, Any], fds: list[int]) -> bool:
    """Send a reply; False if the stage has gone (killed, say, while its request was being answered).

    A closed peer is the end of the conversation, not an error: as a BrokenPipeError it would reach the
    CLI, which takes that for its own closed standard output.
    """
    while True:
        try:
            send_message(sock, message, fds)
            return True
        except BlockingIOError:
            await anyio.wait_writable(sock)
        except (BrokenPipeError, ConnectionResetError):
            return False


async def _receive(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    while True:
        await anyio.wait_readable(sock)
        try:
            return receive_packet(sock)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            return None


async def serve(sock: socket.socket, handlers: Mapping[str, Handler]) -> None:
    """Answer the stage until it closes its end of the channel."""
    while True:
        packet = await _receive(sock)
        if packet is None:
            return
        fds: list[int] = []
        try:
            message, fds = decode_packet(*packet)
        except ValueError as exc:
            log.warning("rpc.bad_packet", error=str(exc))
            continue
        method = message.get("method")
        request_id = message.get("id")
        handler = handlers.get(method) if isinstance(method, str) else None
        try:
            if handler is None:
                error = {"code": METHOD_NOT_FOUND, "message": f"unknown method {method!r}"}
                reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "error": error}
                reply_fds: list[int] = []
            else:
                try:
                    params = message.get("params") or {}
                    if not isinstance(params, dict):
                        raise TypeError(f"params must be an object, not {type(params).__name__}")
                    result, reply_fds = await handler(dict(params), fds)
                    reply = {"jsonrpc": "2.0", "id": request_id, "result": result}
                except HandlerError as exc:
                    reply = {"jsonrpc": "2.0", "id": request_id,
                             "error": {"code": SERVER_ERROR, "message": str(exc)}}
                    reply_fds = []
                except (KeyError, TypeError, ValueError, OverflowError) as exc:
                    # a stage's bad params are the stage's error, never the engine's crash
                    log.warning("rpc.bad_params", method=method, error=repr(exc))
                    reply = {"jsonrpc": "2.0", "id": request_id,
                             "error": {"code": INVALID_PARAMS, "message": f"invalid params for {method}: {exc!r}"}}
                    reply_fds = []
            if request_id is not None and not await _send(sock, reply, reply_fds):
                return
        finally:
            for fd in fds:
                os.close(fd)
