"""Waiting for a helper process the tests started (a registry, a Dask scheduler or worker) to be ready.

Such a process says it is ready only in its own way (an answer over HTTP, a file it writes, a line in its
log), so the wait polls that sign; it fails at once, with the process's log, if the process exits first.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

POLL = 0.05  # seconds between looks


def wait_until_ready(process: subprocess.Popen[bytes], ready: Callable[[], bool], *, what: str, log: Path,
                     timeout: float) -> None:
    """Return once `ready()` is true; raise if `process` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}: {log.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready within {timeout:g} s: {log.read_text(errors='replace')}")
        time.sleep(POLL)  # another process's readiness: there is no event to wait for
