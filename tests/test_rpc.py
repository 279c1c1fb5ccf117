"""The JSON-RPC channel between engine and stage, over a real SOCK_SEQPACKET socketpair."""

from __future__ import annotations

import os
import socket
from typing import Any

import anyio
import pytest

from aosbuild import rpc
from aosbuild.sandboxside import stageapi


def stage_side(sock: socket.socket, calls: list[tuple[str, dict[str, Any] | None]]) -> list[Any]:
    """Run stage-side calls (blocking, as a stage would) and collect the results."""
    channel = stageapi.Channel(sock)
    results = []
    for method, params in calls:
        if method.startswith("notify:"):
            channel.notify(method.removeprefix("notify:"), params)
        else:
            try:
                results.append(channel.call(method, params)[0])
            except stageapi.RpcError as exc:
                results.append(f"error: {exc}")
    sock.close()
    return results


async def exchange(calls: list[tuple[str, dict[str, Any] | None]],
                   handlers: dict[str, rpc.Handler]) -> list[Any]:
    engine, stage = rpc.open_socketpair()
    with engine:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rpc.serve, engine, handlers)
            results = await anyio.to_thread.run_sync(stage_side, stage, calls)
    return results


async def test_requests_notifications_and_errors() -> None:
    seen: list[tuple[str, Any]] = []

    async def arguments(params: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        return {"tree": "/run/osbuild/tree"}, []

    async def log(params: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        seen.append(("log", params["message"]))
        return None, []

    async def refuse(params: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        raise rpc.HandlerError("not today")

    results = await exchange(
        [("arguments", None), ("notify:log", {"message": "hi"}), ("refuse", {}), ("missing", None)],
        {"arguments": arguments, "log": log, "refuse": refuse})
    assert results == [{"tree": "/run/osbuild/tree"}, "error: not today", "error: unknown method 'missing'"]
    assert seen == [("log", "hi")]


async def test_large_messages_travel_through_a_memfd() -> None:
    big = "x" * (4 * stageapi.MAX_INLINE)

    async def echo(params: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        return {"size": len(params["data"]), "data": params["data"]}, []

    (result,) = await exchange([("echo", {"data": big})], {"echo": echo})
    assert result == {"size": len(big), "data": big}


async def test_descriptors_are_passed() -> None:
    read_end, write_end = os.pipe()
    engine, stage = rpc.open_socketpair()
    received: list[bytes] = []

    async def take(params: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        received.append(os.read(fds[0], 100))
        return len(fds), []

    def call() -> Any:
        os.write(write_end, b"through the socket")
        result = stageapi.Channel(stage).call("take", {}, fds=[read_end])[0]
        stage.close()
        return result

    with engine:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rpc.serve, engine, {"take": take})
            assert await anyio.to_thread.run_sync(call) == 1
    os.close(read_end)
    os.close(write_end)
    assert received == [b"through the socket"]


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_channel_on_both_backends(backend: str) -> None:
    async def arguments(params: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        return {"backend": backend}, []

    calls: list[tuple[str, dict[str, Any] | None]] = [("arguments", None)]
    handlers: dict[str, rpc.Handler] = {"arguments": arguments}
    results = anyio.run(exchange, calls, handlers, backend=backend)
    assert results == [{"backend": backend}]
