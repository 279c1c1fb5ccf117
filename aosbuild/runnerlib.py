"""What every runner does inside the sandbox before the stage: mount, run, unmount (standard library only).

Mounts are made inside the sandbox's own mount namespace, so none of them can outlive the sandbox;
they are unmounted (and so written back) before the runner exits, which is before the engine detaches
the loop devices under them. Without mounts the runner simply becomes the stage: a Python stage for this
same interpreter runs in it (one interpreter start per stage instead of two, about 40 ms), any other
stage is exec'd.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

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


def umount(target: str, flags: int = 0) -> None:
    if _libc().umount2(target.encode(), flags) != 0:
        err = _errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def run_with_mounts(stage: str, argv: list[str], plan_text: str) -> int:
    """Mount, run the stage as a child, unmount; its exit code."""
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


def for_this_interpreter(stage: str) -> bool:
    """True if the stage is a script whose `#!` line names exactly the interpreter running this runner."""
    with open(stage, "rb") as f:
        return f.readline().rstrip(b"\n") == b"#!" + os.fsencode(sys.executable)


def become(stage: str, argv: list[str]) -> NoReturn:
    """Run a Python stage's code in this interpreter, as if it had been exec'd; it ends the process.

    A failure's traceback starts at the stage's own code, as it would in a process of its own.
    """
    import runpy

    sys.argv = [stage, *argv]
    sys.path[0] = os.path.dirname(stage)
    try:
        runpy.run_path(stage, run_name="__main__")
    except SystemExit:
        raise
    except BaseException as exc:
        import traceback

        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != stage:
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb or exc.__traceback__)
        raise SystemExit(1) from None
    raise SystemExit(0)


def main(prepare: object = None) -> int:
    """A runner's entry point: `prepare()` (if given) readies the build root, then the stage runs."""
    stage, argv = sys.argv[1], sys.argv[2:]
    try:
        if callable(prepare):
            prepare()
        plan_text = os.environ.pop(MOUNTS_ENV, "")
        if plan_text:
            return run_with_mounts(stage, argv, plan_text)
        if not for_this_interpreter(stage):
            os.execv(stage, [stage, *argv])
    except OSError as exc:
        from aosbuild import stageapi  # only on failure: every stage would pay for this import

        stageapi.report_exception(exc)
        print(f"runner: cannot run {stage}: {exc}", file=sys.stderr)
        return 2
    become(stage, argv)  # outside the handler above: the stage's own errors are its own
