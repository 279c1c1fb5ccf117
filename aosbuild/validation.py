"""Schema validation of a manifest and of every module's use in it, collecting every problem at once.

The manifest is checked against `schemas/osbuild{1,2}.json`, then each source, stage, input, device and
mount against its module's `.meta.json` schema (JSON Schema draft 4, as osbuild), so that a user sees
every mistake in one run, each at its JSON path.
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


def run_checks(items: list[Check | Problem]) -> list[Problem]:
    """Every problem, in order: the checks' and those found without a schema (a module not found).

    A set of checks that found nothing once is remembered by the digest of every schema and instance in
    it (and aosbuild's version), so that the same manifest with the same library is not validated again:
    `--inspect` and a cached rebuild then skip importing jsonschema and running it (0.1-0.2 s).
    """
    checks = [item for item in items if isinstance(item, Check)]
    if len(checks) < len(items):
        return _evaluate(items)
    digest = hashlib.sha256(json.dumps(
        [__version__, [[c.schema, c.instance, list(c.base)] for c in checks]], sort_keys=True,
        default=repr).encode()).hexdigest()
    marker = cache_dir() / digest
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
    for item in items:
        if isinstance(item, Check):
            problems += check_schema(item.schema, item.base) or list(check(item.schema, item.instance, item.base))
        else:
            problems.append(item)
    return problems


def _missing(name: Any, path: tuple[str | int, ...]) -> Problem:
    return Problem(f"could not find schema information for '{name}'", path)


def _module(library: Library, kind: str, desc: Any, key: str, version: str,
            path: tuple[str | int, ...]) -> Iterator[Check | Problem]:
    if not isinstance(desc, dict) or not isinstance(desc.get(key), str):
        return  # the manifest schema already said what is wrong with this node
    yield from module_checks(library, kind, desc[key], desc, version, path)


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


def validate_v2(description: dict[str, Any], library: Library) -> list[Problem]:
    problems: list[Check | Problem] = [Check(library.manifest_schema("2"), description)]
    sources = description.get("sources")
    if isinstance(sources, dict):
        for name, source in sources.items():
            problems += module_checks(library, "Source", name, source, "2", ("sources", name))
    pipelines = description.get("pipelines")
    for i, pipeline in enumerate(pipelines if isinstance(pipelines, list) else []):
        stages = pipeline.get("stages") if isinstance(pipeline, dict) else None
        for j, stage in enumerate(stages if isinstance(stages, list) else []):
            path: tuple[str | int, ...] = ("pipelines", i, "stages", j)
            problems += _module(library, "Stage", stage, "type", "2", path)
            if not isinstance(stage, dict):
                continue
            for kind, key in (("Device", "devices"), ("Input", "inputs")):
                group = stage.get(key)
                if isinstance(group, dict):
                    for name, desc in group.items():
                        problems += _module(library, kind, desc, "type", "2", (*path, key, name))
            # osbuild reports a mount's own schema errors under its name, not its index (the
            # manifest schema's under the index), and checks only the last of same-named mounts
            mounts = stage.get("mounts")
            named = {m["name"]: m for m in (mounts if isinstance(mounts, list) else [])
                     if isinstance(m, dict) and isinstance(m.get("name"), str)}
            for name, mount in named.items():
                problems += _module(library, "Mount", mount, "type", "2", (*path, "mounts", name))
    return run_checks(problems)
