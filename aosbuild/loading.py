"""Reading a manifest file into the model: JSON parsing, then its format's validation and loading.

Every problem is collected and raised at once as a `ManifestError` (exit 2): JSON syntax and depth here,
then (`aosbuild/formats/`) schema errors first, and only when the document has the right shape, the
errors of meaning (unknown or later `name:` references, duplicate pipeline names, unknown source items,
device cycles).
"""

from __future__ import annotations

import json
from typing import Any

from .errors import ManifestError, Problem
from .formats import load
from .library import Library
from .manifest import Manifest

# Deeper documents pass the schemas but break Python's recursive JSON encoding (ids, the stage channel).
MAX_DEPTH = 500
TOO_DEEP = Problem(f"nested more than {MAX_DEPTH} levels deep; no manifest needs that, check what generated it")


def parse(text: str, source: str) -> Any:
    """Parse JSON, turning a syntax error into a ManifestError that names file, line and column.

    Documents nested deeper than MAX_DEPTH and integers Python will not convert (over 4300 digits) are
    refused here, at load, rather than crashing the build later.
    """
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{source}:{exc.lineno}:{exc.colno}",
                            [Problem(f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")]
                            ) from None
    except RecursionError:  # nested far deeper than MAX_DEPTH
        raise ManifestError(source, [TOO_DEEP]) from None
    except ValueError as exc:  # int() digit limit
        raise ManifestError(source, [Problem(f"invalid number: {exc}; write such values as strings")]) from None
    if depth(document) > MAX_DEPTH:
        raise ManifestError(source, [TOO_DEEP])
    return document


def depth(document: Any) -> int:
    """How deeply arrays and objects nest in a parsed document, without recursion."""
    deepest = 0
    stack = [(document, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def load_file(path: str, text: str, library: Library, *, build: bool = False) -> Manifest:
    return load(parse(text, path), library, path, build=build)
