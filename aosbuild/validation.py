"""Schema validation of a manifest and of every module's use in it, collecting every problem at once.

The manifest is checked against `schemas/osbuild{1,2}.json`, then each source, stage, input, device and
mount against its module's `.meta.json` schema (JSON Schema draft 4, as osbuild), so that a user sees
every mistake in one run, each at its JSON path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema

from .errors import Problem
from .library import Library
from .moduleinfo import ModuleMetaError, check_schema


def check(schema: dict[str, Any], instance: Any, base: tuple[str | int, ...] = ()) -> Iterator[Problem]:
    validator = jsonschema.Draft4Validator(schema)
    for error in validator.iter_errors(instance):
        yield Problem(error.message, base + tuple(error.absolute_path))


def _missing(name: Any, path: tuple[str | int, ...]) -> Problem:
    return Problem(f"could not find schema information for '{name}'", path)


def _module(library: Library, kind: str, desc: Any, key: str, version: str,
            path: tuple[str | int, ...]) -> Iterator[Problem]:
    if not isinstance(desc, dict) or not isinstance(desc.get(key), str):
        return  # the manifest schema already said what is wrong with this node
    yield from check_module(library, kind, desc[key], desc, version, path)


def check_module(library: Library, kind: str, name: str, desc: Any, version: str,
                 path: tuple[str | int, ...]) -> Iterator[Problem]:
    """Validate one use of a module against its schema, as osbuild: a broken schema is itself the error."""
    try:
        info = library.find(kind, name)
        schema = info and info.validation_schema(version)
    except ModuleMetaError as exc:
        yield Problem(str(exc), path)
        return
    if info is None or not schema:
        yield _missing(name, path)
        return
    broken = check_schema(schema, path)
    yield from broken or check(schema, desc, path)


def validate_v2(description: dict[str, Any], library: Library) -> list[Problem]:
    problems = list(check(library.manifest_schema("2"), description))
    sources = description.get("sources")
    if isinstance(sources, dict):
        for name, source in sources.items():
            problems += check_module(library, "Source", name, source, "2", ("sources", name))
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
    return problems
