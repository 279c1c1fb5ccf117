"""`--inspect` prints what osbuild prints: golden outputs of osbuild for the same manifests.

The reference goldens are osbuild 191's own output; `tests/golden` holds more, printed by osbuild's
`--inspect` code for manifests that cover every feature (see its README).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import GOLDEN, Aosbuild, OsbuildOracle
from .test_ids import golden_manifests

GOLDEN_MANIFESTS = golden_manifests("*.json")
# osbuild's own test manifests (Fedora, CentOS), with osbuild 191's output: they need osbuild's library
REAL_MANIFESTS = sorted((GOLDEN.parent / "real-manifests").glob("*.json"))


@pytest.mark.parametrize("path", GOLDEN_MANIFESTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_inspect_matches_osbuild(aosbuild: Aosbuild, path: Path) -> None:
    result = aosbuild(path, "--inspect")
    expected = json.loads(path.with_suffix(".expected").read_text())
    assert result.returncode == (2 if path.stem.startswith("invalid") else 0), result.stderr
    assert json.loads(result.stdout) == expected


@pytest.mark.parametrize("path", REAL_MANIFESTS + GOLDEN_MANIFESTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_goldens_are_what_osbuild_prints(osbuild_oracle: OsbuildOracle, path: Path) -> None:
    """The copied goldens are still osbuild 191's output, where its library is at hand."""
    result = osbuild_oracle("--inspect", str(path))
    assert result.returncode == (2 if path.stem.startswith("invalid") else 0), result.stderr
    assert json.loads(result.stdout) == json.loads(path.with_suffix(".expected").read_text())


def test_goldens_cover_both_formats_and_invalid_manifests() -> None:
    stems = [p.stem for p in GOLDEN_MANIFESTS]
    assert len(stems) >= 7 + 12
    for prefix, at_least in (("v1-", 4), ("v2-", 8), ("invalid-", 6)):
        assert sum(s.startswith(prefix) for s in stems) >= at_least, prefix


def test_inspect_runs_nothing(aosbuild: Aosbuild) -> None:
    aosbuild(GOLDEN / "v2-truncate-chmod.json", "--inspect")
    assert not aosbuild.store.exists()


def _noop(**extra: Any) -> dict[str, Any]:
    return {"type": "org.osbuild.noop", **extra}


LOOP = {"type": "org.osbuild.loopback", "options": {"filename": "disk.img"}}
TREE_OF = {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": ["name:nope"]}

# Manifests osbuild's schemas accept but its loader then fails on with a Python traceback (exit 1, no
# report): aosbuild reports them as invalid instead, with where and why.
LOAD_FAILURES: dict[str, tuple[dict[str, Any], list[str | int], str]] = {
    "unknown pipeline": (
        {"version": "2", "pipelines": [{"name": "a", "stages": [_noop(inputs={"t": TREE_OF})]}]},
        ["pipelines", 0, "stages", 0, "inputs", "t", "references"], "unknown pipeline reference 'name:nope'"),
    "later pipeline": (
        {"version": "2", "pipelines": [{"name": "a", "build": "name:b", "stages": [_noop()]},
                                       {"name": "b", "stages": [_noop()]}]},
        ["pipelines", 0, "build"], "defined later"),
    "unknown source item": (
        {"version": "2", "pipelines": [{"name": "a", "stages": [_noop(inputs={"f": {
            "type": "org.osbuild.files", "origin": "org.osbuild.source", "references": ["sha256:" + "2" * 64]}})]}]},
        ["pipelines", 0, "stages", 0, "inputs", "f", "references"], "Unknown source reference(s)"),
    "duplicate pipeline": (
        {"version": "2", "pipelines": [{"name": "a", "stages": [_noop()]}, {"name": "a"}]},
        ["pipelines", 1, "name"], "duplicate pipeline name 'a'"),
    "duplicate mount": (
        {"version": "2", "pipelines": [{"name": "a", "stages": [_noop(devices={"d": LOOP}, mounts=[
            {"name": "m", "type": "org.osbuild.ext4", "source": "d", "target": "/"},
            {"name": "m", "type": "org.osbuild.ext4", "source": "d", "target": "/x"}])]}]},
        ["pipelines", 0, "stages", 0, "mounts", 1, "name"], "Duplicated mount 'm'"),
    "missing parent device": (
        {"version": "2", "pipelines": [{"name": "a", "stages": [_noop(devices={"d": {**LOOP, "parent": "p"}})]}]},
        ["pipelines", 0, "stages", 0, "devices", "d", "parent"], "unknown parent 'p'"),
    "device cycle": (
        {"version": "2", "pipelines": [{"name": "a", "stages": [_noop(devices={
            "d": {**LOOP, "parent": "e"}, "e": {**LOOP, "parent": "d"}})]}]},
        ["pipelines", 0, "stages", 0, "devices", "d", "parent"], "cycle"),
    "mount on unknown device": (
        {"version": "2", "pipelines": [{"name": "a", "stages": [_noop(mounts=[
            {"name": "m", "type": "org.osbuild.ext4", "source": "zz", "target": "/"}])]}]},
        ["pipelines", 0, "stages", 0, "mounts", 0, "source"], "unknown device 'zz'"),
}


@pytest.mark.parametrize("case", sorted(LOAD_FAILURES))
def test_inspect_reports_what_osbuild_crashes_on(aosbuild: Aosbuild, case: str) -> None:
    manifest, path, message = LOAD_FAILURES[case]
    result = aosbuild(manifest, "--inspect")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = json.loads(result.stdout)["errors"]
    assert any(e["path"] == path and message in e["message"] for e in errors), errors


def inspect_with_library(libdir: Path, path: Path) -> subprocess.CompletedProcess[str]:
    """`aosbuild --libdir LIBDIR --inspect M`, with no test library in front."""
    return subprocess.run([sys.executable, "-m", "aosbuild", "--libdir", str(libdir), "--inspect", str(path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("path", REAL_MANIFESTS + GOLDEN_MANIFESTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_inspect_with_osbuilds_library_prints_what_osbuild_prints(osbuild_oracle: OsbuildOracle,
                                                                  path: Path) -> None:
    """Byte for byte: osbuild's real manifests (Fedora, CentOS: stages aosbuild does not bundle) and the goldens."""
    result = inspect_with_library(osbuild_oracle.libdir, path)
    assert result.returncode == (2 if path.stem.startswith("invalid") else 0), result.stderr
    assert result.stdout == path.with_suffix(".expected").read_text()


def test_real_manifests_are_there() -> None:
    assert len(REAL_MANIFESTS) == 6


SHA = "sha256:" + "1" * 64
# Invalid manifests made of osbuild library modules; osbuild's errors are the expected ones
INVALID_WITH_OSBUILDS_LIBRARY: dict[str, dict[str, Any]] = {
    "schema-only stage options": {"version": "2", "pipelines": [{"name": "os", "stages": [
        {"type": "org.osbuild.hostname", "options": {"hostname": 5, "domain": "x"}},
        {"type": "org.osbuild.locale", "options": {}},
        {"type": "org.osbuild.rpm", "options": {"gpgkeys": "k", "exclude": {"docs": "yes"}}},
        {"type": "org.osbuild.no-such-stage"}]}]},
    "devices mounts inputs": {"version": "2", "pipelines": [{"name": "image", "stages": [
        {"type": "org.osbuild.copy", "options": {"paths": [{"from": "input://tree/", "to": 7}]},
         "inputs": {"tree": {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline",
                             "references": ["name:a", "name:b"]}},
         "devices": {"disk": {"type": "org.osbuild.loopback", "options": {"filename": 1, "lock": "no"}},
                     "crypt": {"type": "org.osbuild.luks2", "parent": "disk", "options": {}},
                     "lv": {"type": "org.osbuild.lvm2.lv", "parent": "crypt"}},
         "mounts": [{"name": "root", "type": "org.osbuild.btrfs", "source": "lv", "target": "/",
                     "options": {"subvol": 1}},
                    {"name": "boot", "type": "org.osbuild.xfs", "target": "/boot", "partition": "2"},
                    {"name": "weird", "type": "org.osbuild.nothing", "source": "disk", "target": "/w"}]}]}]},
    "sources": {"version": "2", "sources": {
        "org.osbuild.curl": {"items": {SHA: {"url": 5}, "not-a-checksum": "http://x"}},
        "org.osbuild.librepo": {"items": {SHA: {"path": "p"}}, "options": {"mirrors": 1}},
        "org.osbuild.nope": {"items": {}}}, "pipelines": []},
    "v1 with source-parsed assemblers": {"pipeline": {
        "build": {"pipeline": {"stages": [{"name": "org.osbuild.rpm", "options": {"packages": 1}}]},
                  "runner": "org.osbuild.fedora38"},
        "stages": [{"name": "org.osbuild.hostname", "options": {}}],
        "assembler": {"name": "org.osbuild.tar", "options": {"filename": 3, "compression": "zip"}}}},
}


def sorted_report(text: str) -> dict[str, Any]:
    """osbuild's order among errors at one path is its set's, arbitrary: compare them sorted."""
    report: dict[str, Any] = json.loads(text)
    report["errors"] = sorted(report["errors"], key=lambda e: (json.dumps(e["path"]), e["message"]))
    return report


@pytest.mark.parametrize("case", sorted(INVALID_WITH_OSBUILDS_LIBRARY))
def test_invalid_manifests_with_osbuilds_library_give_osbuilds_errors(osbuild_oracle: OsbuildOracle,
                                                                      tmp_path: Path, case: str) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(INVALID_WITH_OSBUILDS_LIBRARY[case]))
    expected = osbuild_oracle("--inspect", str(path))
    assert expected.returncode == 2, expected.stderr
    result = inspect_with_library(osbuild_oracle.libdir, path)
    assert result.returncode == 2, result.stderr
    assert sorted_report(result.stdout) == sorted_report(expected.stdout)
    assert len(json.loads(result.stdout)["errors"]) >= 3
