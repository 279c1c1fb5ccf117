"""The stage side's JSON (`aosbuild.sandboxside.stagejson`) is exactly what `json` does, without importing it."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aosbuild.sandboxside import stagejson

ROOT = Path(__file__).resolve().parent.parent

FIXED: list[Any] = [
    {}, [], "", 0, -1, 2**70, 1.5, -0.0, 1e300, 1e-300, True, False, None,
    float("nan"), float("inf"), float("-inf"),
    "quote \" backslash \\ newline \n tab \t nul \x00 snowman \u2603 emoji \U0001f600 ü",
    {"b": [1, {"c": None}], "a": {"x": [], "y": {}}, "é": "ü"},
    [[[[]]], [{}], {"k": [1, 2, [3]]}],
    {1: "int key", 2.5: "float key", False: "bool key", None: "null key"},
    ("a", "tuple"),
]


def generate(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-(2**40), 2**40)
    if kind == 2:
        return rng.uniform(-1e6, 1e6)
    if kind in (3, 4):
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 0x3000)]))
                       for _ in range(rng.randrange(6)))
    if kind == 5:
        return [generate(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = [generate(rng, 4) for _ in range(rng.randrange(4))]
    return {key if isinstance(key, str) else f"k{i}": generate(rng, depth + 1) for i, key in enumerate(keys)}


def corpus() -> list[Any]:
    rng = random.Random(14)
    return [*FIXED, *(generate(rng) for _ in range(300))]


def sortable(value: Any) -> bool:
    """json.dumps(sort_keys=True) can sort only dicts whose keys compare with each other."""
    if isinstance(value, dict):
        return all(isinstance(key, str) for key in value) and all(sortable(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(sortable(v) for v in value)
    return True


@pytest.mark.parametrize("kwargs", [{}, {"indent": 2}, {"indent": 0}, {"indent": 4}, {"sort_keys": True},
                                    {"indent": 2, "sort_keys": True}])
def test_dumps_is_json_dumps(kwargs: dict[str, Any]) -> None:
    checked = 0
    for value in corpus():
        if kwargs.get("sort_keys") and not sortable(value):
            continue
        assert stagejson.dumps(value, **kwargs) == json.dumps(value, **kwargs), (value, kwargs)
        checked += 1
    assert checked > 250


def test_dumps_refuses_what_json_refuses() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        stagejson.dumps({"a": object()}, indent=2)
    with pytest.raises(TypeError, match="not JSON serializable"):
        stagejson.dumps({"a": {1, 2}})
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular"):
        stagejson.dumps(loop, indent=2)


def test_loads_is_json_loads() -> None:
    for value in corpus():
        text = json.dumps(value)
        for document in (text, f" \n\t{text}\r\n ", text.encode()):
            assert json.dumps(stagejson.loads(document)) == json.dumps(json.loads(document)), document


@pytest.mark.parametrize("document", ["", " ", "{", "[1,]", "1 2", '{"a": 1}x', "nul", '"\x01"', "{'a': 1}"])
def test_loads_refuses_what_json_refuses(document: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(document)
    with pytest.raises(json.JSONDecodeError):
        stagejson.loads(document)


def test_the_stage_side_imports_neither_json_nor_re(tmp_path: Path) -> None:
    # a stage's interpreter imports these, and the noop stage runs on them: json with re cost 6 ms of CPU,
    # array (through collections.abc) 1 ms. The sandbox side is the package `aosbuild` there, as here.
    (tmp_path / "aosbuild").symlink_to(ROOT / "aosbuild" / "sandboxside")
    code = ("import sys; import aosbuild.runnerlib, aosbuild.stageapi, aosbuild.stagejson;"
            "aosbuild.stageapi.decode_packet(aosbuild.stagejson.dumps({'a': [1]}, indent=2).encode(), []);"
            "print(sorted({'json', 're', 'enum', 'typing', 'array', 'collections'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
