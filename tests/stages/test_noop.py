"""org.osbuild.noop: prints its options and leaves the tree alone, whatever it is given."""

from __future__ import annotations

import json

from tests.conftest import Aosbuild, check_jsonseq, manifest, pipeline, stage

from .treediff import assert_invalid, build_ab

OPTIONS = {"zeta": [1, 2], "alpha": {"nested": True}, "text": "ünïcode"}
TREE_INPUT = {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": ["name:src"]}


def test_tree_is_unchanged(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.mkdir", paths=[{"path": "/etc", "mode": 0o700}]),
            stage("org.osbuild.truncate", filename="/etc/f", size="3")]
    noop = {**stage("org.osbuild.noop", **OPTIONS), "inputs": {"src": TREE_INPUT}}
    others = (pipeline("src", stage("org.osbuild.truncate", filename="/from-src", size="1")),)
    changes = build_ab(aosbuild, base, noop, others=others)
    assert (changes.added, changes.removed, changes.changed) == ({}, {}, {})
    assert (aosbuild.output / "b" / "etc" / "f").stat().st_size == 3  # the base did run
    assert not (aosbuild.output / "b" / "from-src").exists()  # the input is not copied in


def test_prints_its_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.noop", **OPTIONS))), "--monitor", "jsonseq")
    assert result.returncode == 0, result.stderr
    check_jsonseq(result.stdout)
    finished = [e["result"] for e in result.jsonseq() if "result" in e]
    assert [r["name"] for r in finished] == ["org.osbuild.noop"]
    assert finished[0]["success"] is True
    assert finished[0]["output"] == json.dumps(OPTIONS, indent=2, sort_keys=True) + "\n"


def test_bad_options(aosbuild: Aosbuild) -> None:
    # noop takes any options, but the rest of the stage is still checked against its schema
    bad = {**stage("org.osbuild.noop"), "mounts": {"not": "a list"}}
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.noop"), bad)))
    assert_invalid(result, ".pipelines[0].stages[1].mounts", "{'not': 'a list'} is not of type 'array'")
    options = aosbuild(manifest(pipeline("p", {"type": "org.osbuild.noop", "options": ["x"]})))
    assert_invalid(options, ".pipelines[0].stages[0].options", "['x'] is not of type 'object'")
    assert not aosbuild.store.exists()
