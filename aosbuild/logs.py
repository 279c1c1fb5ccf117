"""Module loggers that import structlog on first use.

structlog pulls in asyncio (~40 ms); modules that `--version` and `--inspect` import (the store, for the
command line's size flags) log only while building, so they hold one of these instead of a structlog logger.
"""

from __future__ import annotations

from typing import Any


class LazyLogger:
    """Stands for `structlog.get_logger(name)`, got when a method is first looked up."""

    __slots__ = ("_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def __getattr__(self, attribute: str) -> Any:
        if self._logger is None:
            import structlog

            self._logger = structlog.get_logger(self._name)
        return getattr(self._logger, attribute)


def get_logger(name: str) -> Any:
    return LazyLogger(name)
