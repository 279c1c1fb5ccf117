"""The loop device server: every device it attached is detached when it closes, even one whose attach
was cancelled while the kernel was setting it up."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from aosbuild import loop
from aosbuild.loop import open_loop_server

from .leftovers import loops_backed_by


async def test_attach_and_detach(workdir: Path) -> None:
    disk = workdir / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    fd = os.open(disk, os.O_RDWR)
    try:
        async with open_loop_server() as loops:
            device = await loops.attach(fd, offset=4096, size=8192)
            assert loops_backed_by(workdir) == [device.name]
            size = await anyio.Path(f"/sys/block/{device.name}/size").read_text()
            assert size.strip() == "16"  # 8192 bytes
    finally:
        os.close(fd)
    assert loops_backed_by(workdir) == []


async def test_a_cancelled_attach_is_detached_too(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = loop.attach
    attached = threading.Event()
    cancelled = threading.Event()

    def attach_until_cancelled(*args: Any, **kwargs: Any) -> loop.LoopDevice:
        device = real(*args, **kwargs)
        attached.set()
        cancelled.wait(10)  # the kernel's part is done; the caller is cancelled before it returns
        return device

    monkeypatch.setattr(loop, "attach", attach_until_cancelled)
    disk = workdir / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    fd = os.open(disk, os.O_RDWR)
    try:
        async with open_loop_server() as loops:
            with anyio.CancelScope() as scope:

                async def cancel_once_attached() -> None:
                    await anyio.to_thread.run_sync(attached.wait)
                    scope.cancel()
                    cancelled.set()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(cancel_once_attached)
                    # a thread is not interrupted: the attach returns, the cancel strikes at the next
                    # checkpoint, and by then the server holds the device
                    await loops.attach(fd)
                    await anyio.lowlevel.checkpoint()
                    raise AssertionError("the cancel never came")
            assert scope.cancelled_caught
            assert len(loops_backed_by(workdir)) == 1  # attached, and the server knows it
    finally:
        os.close(fd)
    assert loops_backed_by(workdir) == []
