"""The console scripts' entry: signals are handled from the first instruction, before the heavy imports.

Until the engine's event loop takes over signal handling (`aosbuild.signals`), SIGINT raises
KeyboardInterrupt as usual and SIGTERM or SIGHUP raise `Terminated`, so an early signal exits 130, 143 or 129 with
"Aborted" instead of a traceback or a silent death. Standard library only, like the package's __init__.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

from . import OSBUILD_VERSION, __version__


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) outside the event loop: treated like Ctrl-C, with the exit code 143 (129)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.exit_code = 128 + signum


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def exit_code(interrupt: KeyboardInterrupt) -> int:
    return interrupt.exit_code if isinstance(interrupt, Terminated) else 130


def broken_pipe() -> int:
    """The reader of our output went away (`aosbuild ... | head -1`): end quietly, as the shell's tools do.

    Standard output is pointed at /dev/null so that flushing it at exit cannot fail again; 141 is what a
    tool killed by SIGPIPE exits with in the shell.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def forget_interrupts() -> None:
    """Make the exit code we return the one the process ends with.

    CPython remembers a KeyboardInterrupt that escaped code it ran from a string (dataclasses build their
    methods with exec(), so a Ctrl-C during the imports often lands there) and, under `python -m`, ends the
    process by SIGINT at exit whatever exit code it was given, even when the interrupt was handled.
    Running any string through exec() clears that memory (`_Py_UnhandledKeyboardInterrupt`).
    """
    exec("pass")


def guarded(run: Callable[[], int]) -> int:
    """`run()`'s exit code; an interrupt ends in "Aborted" and 130 (143, 129), a closed stdout in 141."""
    try:
        return run()
    except KeyboardInterrupt as interrupt:
        sys.stderr.write("Aborted\n")
        return exit_code(interrupt)
    except BrokenPipeError:
        return broken_pipe()


def run_guarded(module: str, version: str | None = None) -> int:
    """Import `module` and return its main(); an early SIGINT or SIGTERM becomes "Aborted" and 130 or 143.

    A lone `--version` prints `version` without importing `module`: its command line pulls in the store
    and the downloader (ssl among them), half of what `--version` cost, which tools run to probe for us.
    """
    if version is not None and sys.argv[1:] == ["--version"]:
        sys.stdout.write(version + "\n")
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    code = guarded(lambda: int(importlib.import_module(module).main()))
    forget_interrupts()
    return code


def exit_now(code: int) -> NoReturn:
    """End the process with `code` once its output is flushed, skipping the interpreter's teardown.

    Everything the command does is finished by now: its processes are reaped, its files closed, its
    staging entries removed. What is left, freeing every module and object one by one, took 0.1 s on a
    quiet machine and up to 0.75 s under load, between a failed stage and aosbuild's exit.
    """
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = broken_pipe()
    except (OSError, ValueError):
        pass  # stdout closed or gone: nothing more can reach it
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


def main() -> int:
    """`aosbuild`."""
    return run_guarded("aosbuild.cli", f"aosbuild {__version__} (osbuild {OSBUILD_VERSION})")


def osbuild() -> int:
    """The drop-in `osbuild` command (`aosbuild install-osbuild-command`)."""
    return run_guarded("aosbuild.osbuild_compat", f"osbuild {OSBUILD_VERSION}")


def script() -> NoReturn:
    """The `aosbuild` console script and `python -m aosbuild`: main(), then `exit_now`."""
    exit_now(main())
