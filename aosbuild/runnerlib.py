"""What every runner does inside the sandbox before the stage: mount, run, unmount (standard library only).

Mounts are made inside the sandbox's own mount namespace, so none of them can outlive the sandbox;
they are unmounted (and so written back) before the runner exits, which is before the engine detaches
the loop devices under them. Without mounts the runner simply becomes the stage.
"""

from __future__ import annotations

import os
import sys
from typing import Any

MOUNTS_ENV = "AOSBUILD_MOUNTS"
MS_RDONLY = 1


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc().mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None) != 0:
        err = _errno()
        raise OSError(err, f"mount {source} on {target} ({fstype}, {data or 'defaults'}): {os.strerror(err)}")


def umount(target: str) -> None:
    if _libc().umount2(target.encode(), 0) != 0:
        err = _errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def run_stage(stage: str, argv: list[str]) -> int:
    """Exec the stage, or, with mounts to make, mount, run it as a child, and unmount."""
    plan_text = os.environ.pop(MOUNTS_ENV, "")
    if not plan_text:
        os.execv(stage, [stage, *argv])
    import json

    mounted: list[str] = []
    try:
        for entry in json.loads(plan_text):
            os.makedirs(entry["target"], exist_ok=True)
            mount(entry["source"], entry["target"], entry["fstype"], entry["flags"], entry["data"])
            mounted.append(entry["target"])
        pid = os.fork()
        if pid == 0:
            try:
                os.execv(stage, [stage, *argv])
            finally:
                os._exit(127)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    finally:
        for target in reversed(mounted):
            os.sync()
            umount(target)


def main(prepare: object = None) -> int:
    """A runner's entry point: `prepare()` (if given) readies the build root, then the stage runs."""
    stage = sys.argv[1]
    try:
        if callable(prepare):
            prepare()
        return run_stage(stage, sys.argv[2:])
    except OSError as exc:
        from aosbuild import stageapi  # only on failure: every stage would pay for this import

        stageapi.report_exception(exc)
        print(f"runner: cannot run {stage}: {exc}", file=sys.stderr)
        return 2
