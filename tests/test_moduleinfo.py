"""Module metadata read as osbuild 191 reads it: `.meta.json` (`schema`, `schema_2`) or the source's constants."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aosbuild.formats import load, v2
from aosbuild.library import KINDS, Library
from aosbuild.moduleinfo import ModuleMetaError, read_module

from .conftest import OsbuildOracle, manifest, pipeline, stage

HOSTNAME_V1 = {"additionalProperties": False, "required": ["hostname"],
               "properties": {"hostname": {"type": "string"}}}

SOURCE_MODULE = '''#!/usr/bin/python3
"""Write a greeting

The greeting goes to /greeting.
"""
import module_that_is_not_installed  # never imported: osbuild parses the source, it does not run it

CAPABILITIES = ["CAP_MAC_ADMIN", "CAP_SYS_ADMIN"]

SCHEMA = """
"additionalProperties": false,
"properties": {"text": {"type": "string"}}
"""

SCHEMA_2 = """
"options": {"additionalProperties": false, "properties": {"text": {"type": "string"}}},
"inputs": {"type": "object"}
"""
'''


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_schema_only_stage_takes_its_format_1_options_in_format_2(tmp_path: Path) -> None:
    """The bug this module fixes: osbuild's `org.osbuild.hostname` has only `schema`."""
    write(tmp_path / "stages" / "org.test.hostname", "#!/bin/sh\n")
    write(tmp_path / "stages" / "org.test.hostname.meta.json",
          json.dumps({"summary": "s", "description": ["d"], "schema": HOSTNAME_V1}))
    library = Library([tmp_path])
    good = manifest(pipeline("os", stage("org.test.hostname", hostname="h")))
    assert v2.validate(good, library) == []
    bad = manifest(pipeline("os", stage("org.test.hostname", hostname=1, other=2)))
    messages = sorted(p.message for p in v2.validate(bad, library))
    assert messages == ["1 is not of type 'string'", "Additional properties are not allowed ('other' was unexpected)"]


def test_constants_are_read_from_the_source_without_running_it(tmp_path: Path) -> None:
    write(tmp_path / "stages" / "org.test.greet", SOURCE_MODULE)
    info = read_module("Stage", "org.test.greet", tmp_path, "stages")
    assert info is not None
    assert info.summary == "Write a greeting"
    assert info.description == "\nThe greeting goes to /greeting."
    assert info.capabilities == {"CAP_MAC_ADMIN", "CAP_SYS_ADMIN"}
    assert info.schema_v1 == {"additionalProperties": False, "properties": {"text": {"type": "string"}}}
    assert set(info.schema_v2) == {"options", "inputs"}
    assert info.path == tmp_path / "stages" / "org.test.greet"
    library = Library([tmp_path])
    assert load(manifest(pipeline("os", stage("org.test.greet", text="hi"))), library)
    v1 = {"pipeline": {"stages": [{"name": "org.test.greet", "options": {"text": 5}}]}}
    with pytest.raises(Exception, match="5 is not of type 'string'"):
        load(v1, library)


def test_a_broken_schema_constant_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "stages" / "org.test.broken", '"""Broken"""\n\nSCHEMA = """\n"a": ,\n"""\n')
    with pytest.raises(ModuleMetaError, match=r"org\.test\.broken:4:.*invalid schema"):
        read_module("Stage", "org.test.broken", tmp_path, "stages")
    problems = v2.validate(manifest(pipeline("os", stage("org.test.broken"))), Library([tmp_path]))
    assert [p.path for p in problems] == [("pipelines", 0, "stages", 0)]
    assert "invalid schema" in problems[0].message


def test_meta_json_that_breaks_osbuilds_rules_is_a_missing_module(tmp_path: Path) -> None:
    write(tmp_path / "stages" / "org.test.nodesc", "#!/bin/sh\n")
    write(tmp_path / "stages" / "org.test.nodesc.meta.json", json.dumps({"summary": "s", "schema": {}}))
    problems = v2.validate(manifest(pipeline("os", stage("org.test.nodesc"))), Library([tmp_path]))
    assert [p.message for p in problems] == ["could not find schema information for 'org.test.nodesc'"]


def test_first_root_that_has_the_module_wins(tmp_path: Path) -> None:
    write(tmp_path / "stages" / "org.osbuild.hostname", SOURCE_MODULE)
    info = Library([tmp_path]).find("Stage", "org.osbuild.hostname")
    assert info is not None
    assert info.root == tmp_path.resolve()
    assert info.summary == "Write a greeting"
    bundled = Library().find("Stage", "org.osbuild.hostname")
    assert bundled is not None
    assert bundled.root != tmp_path.resolve()


# What osbuild's own index makes of every module of its library: {kind: {name: {version: schema|error}}}
OSBUILD_SCHEMAS = '''
import json, sys
from osbuild.meta import Index, ModuleInfo
index = Index(sys.argv[1])
result = {}
for kind in ModuleInfo.MODULES:
    for name in index.list_modules_for_class(kind):
        for version in ("1", "2"):
            info = ModuleInfo.load(sys.argv[1], kind, name)
            try:
                schema = info.get_schema(version) if info else None
            except Exception as exc:
                schema = "error: " + type(exc).__name__
            result.setdefault(kind, {}).setdefault(name, {})[version] = schema
json.dump(result, sys.stdout)
'''


def aosbuild_schema(library_root: Path, kind: str, name: str, version: str) -> Any:
    for folder in KINDS[kind]:
        try:
            info = read_module(kind, name, library_root, folder)
        except ModuleMetaError as exc:
            return f"error: {exc}"
        if info is not None:
            try:
                return info.validation_schema(version)
            except ModuleMetaError:
                return "error: ValueError"
    return None


def test_every_module_of_osbuilds_library_gets_osbuilds_schema(osbuild_oracle: OsbuildOracle) -> None:
    """Structural equality, module by module, of the schema each use of a module is validated against."""
    run = osbuild_oracle.python("-c", OSBUILD_SCHEMAS, str(osbuild_oracle.libdir))
    assert run.returncode == 0, run.stderr
    expected = json.loads(run.stdout)
    compared = 0
    for kind, modules in expected.items():
        for name, by_version in modules.items():
            for version, schema in by_version.items():
                if isinstance(schema, str) and "KeyError" in schema:
                    continue  # a mount whose schema has no `properties`: osbuild crashes, aosbuild reports it
                assert aosbuild_schema(osbuild_oracle.libdir, kind, name, version) == schema, (kind, name, version)
                compared += 1
    assert compared > 2 * 200  # stages, assemblers, inputs, devices, mounts, sources
