"""The engine side of the kill drill (tests/test_engine_death.py): builds that are SIGKILLed as a stage starts.

Run as `python -m tests.enginekill`: it imports aosbuild once, then for each line on stdin
(`MODE DIRECTORY NTH DELAY_MS`) forks a child that builds a few noop stages on `DIRECTORY/store` and
SIGKILLs itself `DELAY_MS` after its NTH bwrap is about to start (an audit hook sees `subprocess.Popen`
before the fork; a delay of 0 kills in the hook itself), and answers with how the child ended. MODE
`cli` is `aosbuild`'s command line in the main thread; `thread` is `aosbuild worker`'s engine: the
worker plugin's `build`, trio in a thread that is not the main one.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from aosbuild import cli, worker

STAGES = 3
MANIFEST = {"version": "2", "pipelines": [
    {"name": "noop", "stages": [{"type": "org.osbuild.noop", "options": {}} for _ in range(STAGES)]}]}


def kill_at(nth: int, delay: float) -> None:
    """SIGKILL this process `delay` seconds after its `nth` bwrap is about to start."""
    go = threading.Event()

    def killer() -> None:
        go.wait()
        time.sleep(delay)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=killer, daemon=True).start()
    seen = 0

    def hook(event: str, args: tuple[object, ...]) -> None:
        nonlocal seen
        if event == "subprocess.Popen" and list(args[1])[:1] == ["bwrap"]:  # type: ignore[call-overload]
            seen += 1
            if seen == nth:
                if delay == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
                go.set()

    sys.addaudithook(hook)


def build(mode: str, directory: Path) -> None:
    store = directory / "store"
    if mode == "cli":
        path = directory / "manifest.json"
        path.write_text(json.dumps(MANIFEST))
        cli.main(["--store", os.fspath(store), "-q", os.fspath(path)])
        return
    plugin = worker.AosbuildWorker(store=store, libdirs=(), remotes=(), label="drill")
    plugin.remote_options = dict  # type: ignore[method-assign]  # no remote cache: the local store only
    spec = {"pipeline": "noop", "label": "drill", "manifest": json.dumps(MANIFEST)}
    thread = threading.Thread(target=plugin.build, args=(spec, "noop"), name="drill-task")
    thread.start()
    thread.join()


def child(mode: str, directory: Path, nth: int, delay: float) -> None:
    try:
        log = os.open(directory / "engine.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)  # stdout answers the drill
        os.dup2(log, 2)
        kill_at(nth, delay)
        build(mode, directory)
    finally:
        os._exit(0)  # the kill came too late: the build had ended


def main() -> None:
    for line in sys.stdin:
        mode, directory, nth, delay_ms = line.split()
        pid = os.fork()
        if pid == 0:
            child(mode, Path(directory), int(nth), float(delay_ms) / 1000)
        _, status = os.waitpid(pid, 0)
        ended = f"killed {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exited {os.WEXITSTATUS(status)}"
        print(ended, flush=True)


if __name__ == "__main__":
    main()
