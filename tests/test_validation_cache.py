"""The cache of clean validations: a hit skips jsonschema, a problem is never cached, the cache is bounded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from aosbuild import validation
from aosbuild.errors import Problem
from aosbuild.validation import Check, run_checks

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "additionalProperties": False}


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "aosbuild" / "valid"


def test_a_clean_validation_is_not_run_again(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_checks([Check(SCHEMA, {"name": "a"})]) == []
    assert len(list(cache_home.iterdir())) == 1

    def no_validation(*args: object) -> None:
        raise AssertionError("validated again")

    monkeypatch.setattr(validation, "_evaluate", no_validation)
    assert run_checks([Check(SCHEMA, {"name": "a"})]) == []


def test_problems_are_never_cached(cache_home: Path) -> None:
    for _ in range(2):
        problems = run_checks([Check(SCHEMA, {"name": 1})])
        assert [p.message for p in problems] == ["1 is not of type 'string'"]
    assert not cache_home.exists() or list(cache_home.iterdir()) == []


def test_another_schema_or_document_is_validated_afresh(cache_home: Path) -> None:
    assert run_checks([Check(SCHEMA, {"name": "a"})]) == []
    stricter = {**SCHEMA, "required": ["size"]}
    assert [p.message for p in run_checks([Check(stricter, {"name": "a"})])] == ["'size' is a required property"]
    assert run_checks([Check(SCHEMA, {"name": "b"})]) == []
    assert len(list(cache_home.iterdir())) == 2


def test_the_cache_is_bounded(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "CACHE_ENTRIES", 8)
    for i in range(8):
        assert run_checks([Check(SCHEMA, {"name": str(i)})]) == []
        os.utime(max(cache_home.iterdir(), key=lambda e: e.stat().st_mtime_ns), (i, i))  # oldest first
    assert len(list(cache_home.iterdir())) == 8
    assert run_checks([Check(SCHEMA, {"name": "newest"})]) == []
    left = list(cache_home.iterdir())
    assert len(left) == 5
    assert min(entry.stat().st_mtime for entry in left) >= 4  # the four oldest went


def test_an_unwritable_cache_only_costs_the_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert run_checks([Check(SCHEMA, {"name": "a"})]) == []
    assert [p.message for p in run_checks([Check(SCHEMA, {"x": 1})])] == [
        "Additional properties are not allowed ('x' was unexpected)"]


def test_a_valid_schema_is_checked_once(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a miss, only the manifest's own checks run: schemas found valid before are not checked again,
    and one schema used by many stages is checked once."""
    checked: list[object] = []
    from aosbuild.moduleinfo import check_schema

    def counting(schema: dict[str, Any], base: tuple[str | int, ...]) -> list[Problem]:
        checked.append(schema)
        return check_schema(schema, base)

    monkeypatch.setattr(validation, "check_schema", counting)
    uses: list[Check | Problem] = [Check(SCHEMA, {"name": str(i)}, ("stages", i)) for i in range(3)]
    assert run_checks(uses) == []
    assert checked == [SCHEMA]
    assert run_checks([Check(SCHEMA, {"name": "another manifest"})]) == []
    assert checked == [SCHEMA]
    assert len(list(cache_home.with_name("valid-schemas").iterdir())) == 1


def test_an_invalid_schema_is_reported_at_each_use_and_never_remembered(cache_home: Path) -> None:
    broken = {"type": "no such type"}
    for _ in range(2):
        problems = run_checks([Check(broken, {}, ("stages", 0)), Check(broken, {}, ("stages", 1))])
        assert [(p.path[:2], p.message.startswith("'no such type' is not valid")) for p in problems] == [
            (("stages", 0), True), (("stages", 1), True)]
    assert not cache_home.with_name("valid-schemas").exists()
