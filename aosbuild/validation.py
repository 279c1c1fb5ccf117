"""Schema validation, collecting every problem at once, each at its JSON path (JSON Schema draft 4, as osbuild).

Each format (`aosbuild/formats/`) lists what its documents take: the document against its schema in
`schemas/`, then each use of a module against that module's schema (`.meta.json`); this module runs those
checks, and remembers the sets that found nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .errors import Problem
from .library import Library
from .moduleinfo import ModuleMetaError, check_schema


def check(schema: dict[str, Any], instance: Any, base: tuple[str | int, ...] = ()) -> Iterator[Problem]:
    import jsonschema  # 0.1 s of imports, which a manifest found in the cache of valid ones never pays

    validator = jsonschema.Draft4Validator(schema)
    for error in validator.iter_errors(instance):
        yield Problem(error.message, base + tuple(error.absolute_path))


@dataclass(frozen=True, slots=True)
class Check:
    """One validation to run: `instance` against `schema`, its problems reported below `base`."""

    schema: dict[str, Any]
    instance: Any
    base: tuple[str | int, ...] = ()


def cache_dir() -> Path:
    """Where digests of validations that found nothing are kept: `$XDG_CACHE_HOME/aosbuild/valid`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aosbuild" / "valid"


def schema_cache_dir() -> Path:
    """Where digests of schemas found to be valid draft-4 schemas are kept, beside `cache_dir()`."""
    return cache_dir().with_name("valid-schemas")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()


def run_checks(items: list[Check | Problem]) -> list[Problem]:
    """Every problem, in order: the checks' and those found without a schema (a module not found).

    A set of checks that found nothing once is remembered by the digest of every schema and instance in
    it (and aosbuild's version), so that the same manifest with the same library is not validated again:
    `--inspect` and a cached rebuild then skip importing jsonschema and running it (0.1-0.2 s).
    """
    checks = [item for item in items if isinstance(item, Check)]
    if len(checks) < len(items):
        return _evaluate(items)
    marker = cache_dir() / _digest([__version__, [[c.schema, c.instance, list(c.base)] for c in checks]])
    if marker.exists():
        return []
    problems = _evaluate(items)
    if not problems:
        remember(marker)
    return problems


CACHE_ENTRIES = 512  # a few hundred manifests; past that the oldest half goes


def remember(marker: Path) -> None:
    """Record a clean validation, keeping the cache bounded (a build service sees endless manifests)."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        entries = list(marker.parent.iterdir())
        if len(entries) > CACHE_ENTRIES:
            entries.sort(key=lambda entry: entry.stat().st_mtime)
            for entry in entries[:len(entries) // 2]:
                entry.unlink(missing_ok=True)
    except OSError:
        pass  # no cache to write to, or another run pruning it too: the next run validates again


def _evaluate(items: list[Check | Problem]) -> list[Problem]:
    """Run the checks; a schema that is not itself a valid draft-4 schema is its own error, as in osbuild."""
    problems: list[Problem] = []
    schemas: dict[str, list[Problem]] = {}
    for item in items:
        if isinstance(item, Check):
            problems += (_schema_problems(item.schema, item.base, schemas)
                         or list(check(item.schema, item.instance, item.base)))
        else:
            problems.append(item)
    return problems


def _schema_problems(schema: dict[str, Any], base: tuple[str | int, ...],
                     checked: dict[str, list[Problem]]) -> list[Problem]:
    """What is wrong with `schema` itself, reported below `base`. Each schema is checked once per run (a
    manifest uses one stage type many times) and, once found valid, never again (`schema_cache_dir`):
    a manifest that misses the cache of valid manifests then costs only its own checks, not its
    schemas' (the manifest schema alone took 2.5 ms to check)."""
    key = _digest([__version__, schema])
    if key not in checked:
        marker = schema_cache_dir() / key
        if marker.exists():
            checked[key] = []
        else:
            checked[key] = check_schema(schema, ())
            if not checked[key]:
                remember(marker)
    return [Problem(p.message, base + p.path) for p in checked[key]]


def _missing(name: Any, path: tuple[str | int, ...]) -> Problem:
    return Problem(f"could not find schema information for '{name}'", path)


def check_module(library: Library, kind: str, name: str, desc: Any, version: str,
                 path: tuple[str | int, ...]) -> Iterator[Problem]:
    """Validate one use of a module against its schema now (v1, whose checks depend on the answers)."""
    yield from _evaluate(list(module_checks(library, kind, name, desc, version, path)))


def module_checks(library: Library, kind: str, name: str, desc: Any, version: str,
                  path: tuple[str | int, ...]) -> Iterator[Check | Problem]:
    """What validating one use of a module takes: its schema check, or the problem of finding the schema."""
    try:
        info = library.find(kind, name)
        schema = info and info.validation_schema(version)
    except ModuleMetaError as exc:
        yield Problem(str(exc), path)
        return
    if info is None or not schema:
        yield _missing(name, path)
        return
    yield Check(schema, desc, path)
