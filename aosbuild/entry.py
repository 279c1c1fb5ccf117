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


def run_guarded(module: str) -> int:
    """Import `module` and return its main(); an early SIGINT or SIGTERM becomes "Aborted" and 130 or 143."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    code = guarded(lambda: int(importlib.import_module(module).main()))
    forget_interrupts()
    return code


def main() -> int:
    """`aosbuild`."""
    return run_guarded("aosbuild.cli")


def osbuild() -> int:
    """The drop-in `osbuild` command (`aosbuild install-osbuild-command`)."""
    return run_guarded("aosbuild.osbuild_compat")
