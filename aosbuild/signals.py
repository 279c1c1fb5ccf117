"""Running a command's async work so that SIGINT, SIGTERM and SIGHUP cancel it cleanly.

The signal cancels the work's scope; every resource is released on the way out (processes stopped, loop
devices detached, staging entries removed), and only then is `Interrupted` raised for the CLI to turn
into exit code 130, 143 or 129.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

T = TypeVar("T")

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


class Interrupted(Exception):
    """The work was cancelled by a signal; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signal.Signals(signum), 128 + signum)
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


async def run_until_signalled(work: Callable[[], Awaitable[T]]) -> T:
    """Await `work()`; SIGINT, SIGTERM or SIGHUP (the terminal closed) cancel it, then raise Interrupted.

    The work's own exception is re-raised as it is, not wrapped in an exception group.
    """
    received: list[int] = []
    result: T | None = None
    error: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            with anyio.open_signal_receiver(*EXIT_CODES) as signals:
                async for signum in signals:
                    received.append(signum)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        try:
            result = await work()
        except Exception as exc:  # re-raised below, outside the task group
            error = exc
        tg.cancel_scope.cancel()
    if received:
        raise Interrupted(received[0])
    if error is not None:
        raise error
    return result  # type: ignore[return-value]  # set whenever work() returned
