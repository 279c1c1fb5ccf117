"""The subprocess module: streamed output, exit explanations, and no process outliving a cancel."""

from __future__ import annotations

import os
import signal

import anyio
import pytest

from aosbuild import process


def test_explain_status() -> None:
    assert process.explain_status(-9) == "was killed by SIGKILL"
    assert process.explain_status(127) == "exited with status 127 (command not found)"
    assert process.explain_status(3) == "exited with status 3"


def test_line_splitter_bounds_long_lines() -> None:
    lines: list[str] = []
    splitter = process.LineSplitter(lines.append)
    splitter.feed(b"one\ntw")
    splitter.feed("o\n\u00e9".encode()[:-1])  # a UTF-8 sequence cut in half
    splitter.feed("\u00e9".encode()[-1:] + b"x" * (process.MAX_LINE + 10))
    splitter.close()
    assert lines[:2] == ["one\n", "two\n"]
    assert lines[2].startswith("\u00e9x")
    assert len(lines[2]) == process.MAX_LINE
    assert "".join(lines[2:]) == "\u00e9" + "x" * (process.MAX_LINE + 10)


async def test_run_streams_output() -> None:
    lines: list[str] = []
    code = await process.run_streaming(["sh", "-c", "echo out; echo err >&2; exit 4"], on_line=lines.append)
    assert code == 4
    assert sorted(lines) == ["err\n", "out\n"]


async def test_command_error_says_why() -> None:
    with pytest.raises(process.CommandError, match="exited with status 127"):
        await process.run(["sh", "-c", "exec /nonexistent-command"])


async def test_cancel_stops_a_process_that_ignores_sigterm() -> None:
    pids: list[int] = []

    def on_line(line: str) -> None:
        pids.append(int(line))

    with anyio.move_on_after(1):
        # the shell ignores SIGTERM, so the grace period ends in SIGKILL
        await process.run_streaming(["sh", "-c", "trap '' TERM; echo $$; while :; do sleep 0.1; done"],
                                    on_line=on_line, grace=0.5)
    assert pids
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)


def test_signal_names() -> None:
    assert process.explain_status(-signal.SIGTERM) == "was killed by SIGTERM"
