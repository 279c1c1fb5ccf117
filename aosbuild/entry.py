"""The console script's entry: signals are handled from the first instruction, before the heavy imports.

Until the engine's event loop takes over signal handling (`aosbuild.signals`), SIGINT raises
KeyboardInterrupt as usual and SIGTERM raises `Terminated`, so an early signal exits 130 or 143 with
"Aborted" instead of a traceback or a silent death. Standard library only, like the package's __init__.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the event loop: treated like Ctrl-C, with the exit code 143."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def exit_code(interrupt: KeyboardInterrupt) -> int:
    return 143 if isinstance(interrupt, Terminated) else 130


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        from .cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt as interrupt:
        sys.stderr.write("Aborted\n")
        return exit_code(interrupt)
