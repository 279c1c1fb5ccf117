"""JSON for the stage side without importing `json` (standard library only).

`json` imports `re` (and through it `enum`, `functools` and `collections`) and compiles four patterns:
about 6 ms of CPU in every stage's interpreter, a third of what a stage costs beyond a bare sandbox.
Its parser and string escaper are C code in the `_json` extension, which needs none of that; this module
uses them directly, as `json` does, and writes the rest (whitespace around a document, the encoder's
indentation) itself. The output is byte for byte what `json.dumps` gives for the same arguments
(`tests/test_stagejson.py` compares them). Without `_json` (not CPython), it falls back to `json`.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

try:
    import _json
except ImportError:  # pragma: no cover - CPython always has it
    _json = None  # type: ignore[assignment]

WHITESPACE = " \t\n\r"
_CONSTANTS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


class _Context:
    """What `_json.make_scanner` reads from `json.JSONDecoder`: `json.loads`'s defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


_scan = _json.make_scanner(_Context()) if _json is not None else None  # type: ignore[arg-type]


def loads(data: str | bytes | bytearray) -> Any:
    """`json.loads` of a UTF-8 document; a ValueError (`json.JSONDecodeError`) for anything else."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    if _scan is None:  # pragma: no cover
        import json

        return json.loads(text)
    start, end = 0, len(text)
    while start < end and text[start] in WHITESPACE:
        start += 1
    while end > start and text[end - 1] in WHITESPACE:
        end -= 1
    try:
        value, stop = _scan(text, start)
    except StopIteration:
        stop = -1
    if stop != end:
        import json  # only for the error a caller expects: a malformed message is the exception

        return json.loads(text)  # raises JSONDecodeError, with the position
    return value


def _float(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return float.__repr__(value)


def _key(key: object) -> str:
    """A dict key as `json` turns it into a string."""
    if isinstance(key, str):
        return key
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return int.__repr__(key)
    if isinstance(key, float):
        return _float(key)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def _unserializable(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_compact = None
if _json is not None:
    try:  # json.encoder's own C encoder, made as `json.dumps(obj)` makes it (one line, ", " and ": ")
        _compact = _json.make_encoder({}, _unserializable, _json.encode_basestring_ascii, None, ": ", ", ",
                                      False, False, True)
    except (AttributeError, TypeError):  # pragma: no cover - another interpreter's signature
        _compact = None


def dumps(value: Any, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """`json.dumps(value, indent=indent, sort_keys=sort_keys)`, for JSON's types (dict, list, tuple, str,
    int, float, bool, None)."""
    if indent is None and not sort_keys and _compact is not None:
        return "".join(_compact(value, 0))
    chunks: list[str] = []
    _encode(value, chunks, indent, sort_keys, 0, set())
    return "".join(chunks)


def _encode(value: Any, out: list[str], indent: int | None, sort_keys: bool, level: int, seen: set[int]) -> None:
    if isinstance(value, str):
        out.append(_escape(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        out.append(_float(value))
    elif isinstance(value, (list, tuple, dict)):
        if id(value) in seen:
            raise ValueError("Circular reference detected")
        if not value:
            out.append("{}" if isinstance(value, dict) else "[]")
            return
        seen.add(id(value))
        inner = "" if indent is None else "\n" + " " * (indent * (level + 1))
        separator = ", " if indent is None else "," + inner
        if isinstance(value, dict):
            pairs = sorted(value.items()) if sort_keys else value.items()  # sorted as json sorts them
            items = [(_key(key), item) for key, item in pairs]
            out.append("{" + inner)
            for index, (key, item) in enumerate(items):
                if index:
                    out.append(separator)
                out.append(_escape(key) + ": ")
                _encode(item, out, indent, sort_keys, level + 1, seen)
            close = "}"
        else:
            out.append("[" + inner)
            for index, item in enumerate(value):
                if index:
                    out.append(separator)
                _encode(item, out, indent, sort_keys, level + 1, seen)
            close = "]"
        out.append(("" if indent is None else "\n" + " " * (indent * level)) + close)
        seen.discard(id(value))
    else:
        _unserializable(value)


def _escape(text: str) -> str:
    if _json is not None:
        return _json.encode_basestring_ascii(text)
    import json  # pragma: no cover

    return json.dumps(text)  # pragma: no cover
