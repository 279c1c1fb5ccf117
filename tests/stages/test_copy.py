"""org.osbuild.copy: files and trees from inputs (a pipeline's tree, source items) or the tree, into the tree."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import Node, assert_invalid, assert_refused, build_ab, export

DATA = b"#!/bin/sh\necho hello\n"
CHECKSUM = "sha256:" + hashlib.sha256(DATA).hexdigest()
SOURCES = {"org.osbuild.inline": {"items": {CHECKSUM: {"encoding": "base64",
                                                       "data": base64.b64encode(DATA).decode()}}}}
FILES_INPUT = {"type": "org.osbuild.files", "origin": "org.osbuild.source", "references": {CHECKSUM: {}}}
TREE_INPUT = {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": ["name:src"]}
# the input tree: /d (0750), /d/f (5 bytes, 0640), /d/sub (0700)
SRC = pipeline("src",
               stage("org.osbuild.mkdir", paths=[{"path": "/d", "mode": 0o750}, {"path": "/d/sub", "mode": 0o700}]),
               stage("org.osbuild.truncate", filename="/d/f", size="5"),
               stage("org.osbuild.chmod", items={"/d/f": {"mode": "0640"}}))
ZEROS = hashlib.sha256(bytes(5)).hexdigest()


def copy(*paths: dict[str, Any], **inputs: dict[str, Any]) -> dict[str, Any]:
    return {**stage("org.osbuild.copy", paths=list(paths)), "inputs": inputs}


def test_copies_a_directory_from_a_tree_input(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, [], copy({"from": "input://src/d", "to": "tree:///copied"}, src=TREE_INPUT),
                       others=(SRC,))
    assert changes.added == {"copied": Node("dir", 0o750), "copied/sub": Node("dir", 0o700),
                             "copied/f": Node("file", 0o640, size=5, sha256=ZEROS)}
    assert (changes.removed, changes.changed) == ({}, {})


def test_trailing_slash_copies_the_contents(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.mkdir", paths=[{"path": "/dst", "mode": 0o755}])]
    changes = build_ab(aosbuild, base, copy({"from": "input://src/d/", "to": "tree:///dst/"}, src=TREE_INPUT),
                       others=(SRC,))
    assert set(changes.added) == {"dst/f", "dst/sub"}
    # the mode of the directory itself comes along too, as with `cp -a d/. dst/`
    assert changes.changed == {"dst": {"mode": (0o755, 0o750)}}


def test_copies_a_source_item_from_a_files_input(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.mkdir", paths=[{"path": "/usr", "mode": 0o755}, {"path": "/usr/bin", "mode": 0o755}])]
    item = copy({"from": f"input://files/{CHECKSUM}", "to": "tree:///usr/bin/hello"}, files=FILES_INPUT)
    changes = build_ab(aosbuild, base, item, sources=SOURCES)
    assert list(changes.added) == ["usr/bin/hello"]
    assert (changes.added["usr/bin/hello"].kind, changes.added["usr/bin/hello"].size) == ("file", len(DATA))
    assert (aosbuild.output / "b" / "usr" / "bin" / "hello").read_bytes() == DATA


def test_a_copied_source_item_has_osbuilds_mode(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, [], copy({"from": f"input://files/{CHECKSUM}", "to": "tree:///hello"},
                                          files=FILES_INPUT), sources=SOURCES)
    assert changes.added["hello"].mode == 0o644


def test_copies_within_the_tree_and_several_items_in_order(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.hostname", hostname="first")]
    changes = build_ab(aosbuild, base, copy(
        {"from": "tree:///etc/hostname", "to": "tree:///etc/hostname.orig"},
        {"from": f"input://files/{CHECKSUM}", "to": "tree:///etc/hostname", "remove_destination": True},
        {"from": "input://src/d/f", "to": "tree:///etc/hostname.orig"},  # no remove_destination: written into
        files=FILES_INPUT, src=TREE_INPUT), others=(SRC,), sources=SOURCES)
    assert list(changes.added) == ["etc/hostname.orig"]
    assert changes.added["etc/hostname.orig"].sha256 == ZEROS
    assert changes.changed["etc/hostname"]["sha256"][1] == hashlib.sha256(DATA).hexdigest()
    assert (aosbuild.output / "b" / "etc" / "hostname").read_bytes() == DATA


def test_missing_source_path_fails(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(SRC, pipeline("p", copy({"from": "input://src/nothing", "to": "tree:///x"},
                                                       src=TREE_INPUT))))
    assert result.returncode == 1
    assert "No such file or directory" in result.stderr


def test_unknown_input_is_refused(aosbuild: Aosbuild) -> None:
    result = export(aosbuild, manifest(SRC, pipeline("p", copy({"from": "input://other/d", "to": "tree:///escaped"},
                                                               src=TREE_INPUT))), "p")
    assert_refused(aosbuild, result, "escaped", reason="refers to input 'other', which this stage does not have")


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(SRC, pipeline("p", copy({"from": "tree:///a", "to": "input://src/a"},
                                                       src=TREE_INPUT))))
    assert_invalid(result, ".pipelines[1].stages[0].options.paths[0].to", "'input://src/a' is not valid")
    flag = aosbuild(manifest(pipeline("p", copy({"from": "tree:///a", "to": "tree:///b", "remove_destination": 1}))))
    assert_invalid(flag, ".pipelines[0].stages[0].options.paths[0].remove_destination", "1 is not of type 'boolean'")


@pytest.mark.parametrize(("source", "target"), [
    ("input://src/../../../../etc", "tree:///escaped"),
    ("input://src/d/f", "tree:///../escaped"),
    ("input://src/d/f", "tree:///d/../../escaped"),
    ("tree:///../../../etc/hostname", "tree:///escaped"),
])
def test_escape_is_refused(aosbuild: Aosbuild, source: str, target: str) -> None:
    result = export(aosbuild, manifest(SRC, pipeline("p", copy({"from": source, "to": target}, src=TREE_INPUT))),
                    "p")
    assert_refused(aosbuild, result, "escaped")
