"""The package's one size parser and formatter, and that every size option of every command line uses it."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from aosbuild import samples
from aosbuild.sizes import format_size, parse_size

from .conftest import REPO


def test_parse_size() -> None:
    assert parse_size("1000") == 1000
    assert parse_size("2 kB") == 2000
    assert parse_size("2KiB") == 2048
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("3 MB") == 3 * 10**6
    assert parse_size("1TiB") == 2**40
    assert parse_size("2G") == 2 * 2**30
    assert parse_size("512M") == 2**29
    assert parse_size("12 B") == 12
    assert parse_size("unlimited") is None
    for bad in ("", "12 parsecs", "-1", "GiB", "1e3", "2g", "1,5GiB"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


def test_format_size() -> None:
    assert [format_size(n) for n in (0, 1023, 1024, 5 << 20, 3 * 2**29, 5000 << 30)] == \
        ["0 B", "1023 B", "1.0 KiB", "5.0 MiB", "1.5 GiB", "4.9 TiB"]
    assert format_size(None) == "unlimited"


@pytest.mark.parametrize("command", [
    ["aosbuild", "--cache-max-size", "lots", "m.json"],
    ["aosbuild.osbuild_compat", "--cache-max-size", "lots", "m.json"],
    ["aosbuild", "store", "limit", "--cache-max-size", "lots", "--store", "s"],
    ["aosbuild", "store", "prune", "--to", "lots", "--store", "s"],
])
def test_every_size_option_refuses_alike(command: list[str], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid size 'lots': use bytes, a number with one of B, K, M, G, T, kB, KiB" in result.stderr
    assert "Traceback" not in result.stderr


def test_sample_disk_size() -> None:
    assert samples.parser().parse_args([]).size == 2 * 2**30
    assert samples.parser().parse_args(["--size", "4GiB"]).size == 4 * 2**30
    with pytest.raises(argparse.ArgumentTypeError, match="cannot be 'unlimited'"):
        samples.disk_size("unlimited")


def test_one_parser_and_one_formatter() -> None:
    """No other module of the package defines its own size parser, formatter or argparse type."""
    size_functions = {"parse_size", "format_size", "size_argument", "human_bytes", "human_size"}
    defined = [(path.relative_to(REPO).as_posix(), node.name)
               for path in sorted((REPO / "aosbuild").rglob("*.py"))
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.FunctionDef) and node.name in size_functions]
    assert defined == [("aosbuild/sizes.py", "parse_size"), ("aosbuild/sizes.py", "size_argument"),
                       ("aosbuild/sizes.py", "format_size")]
