"""A stage started ahead of its turn (`builder.Ahead`): its sandbox starts while the stage below it runs,
and it gets its tree when it first speaks. What it sees, what it leaves and what is reported must be what a
stage started in its turn sees, leaves and reports (`AOSBUILD_AHEAD=0` starts every stage in its turn)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any

from .conftest import Aosbuild, check_jsonseq, manifest, pipeline, stage
from .leftovers import stray_mounts

UUID = re.compile(r"uuid-[0-9a-f]{32}")


def build(aosbuild: Aosbuild, m: dict[str, Any], *args: str, ahead: bool,
          store: str) -> subprocess.CompletedProcess[str]:
    """The real CLI on `m`, with stages started ahead or not, in a store of its own."""
    env = {**os.environ, "AOSBUILD_AHEAD": "1" if ahead else "0"}
    argv = [*aosbuild.command(m, *args)]
    argv[argv.index("--store") + 1] = str(aosbuild.workdir / store)
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=aosbuild.workdir, timeout=300,
                          check=False)


def records(stream: str) -> list[Any]:
    """The stream's records without what differs from run to run (timestamps, durations)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if k not in ("timestamp", "duration")}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value
    return [plain(json.loads(r)) for r in stream.split("\x1e") if r.strip()]


def test_a_stage_started_ahead_sees_its_tree_as_one_started_in_its_turn(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("tree", stage("org.aosbuild.test.files", seed="a"), stage("org.aosbuild.test.mountinfo")))
    seen = {}
    for ahead in (True, False):
        out = aosbuild.workdir / f"out-{ahead}"
        run = build(aosbuild, m, "--export", "tree", "--output-directory", str(out), ahead=ahead, store=f"s-{ahead}")
        assert run.returncode == 0, run.stdout + run.stderr
        seen[ahead] = json.loads((out / "tree" / "mountinfo.json").read_text())
    assert seen[True]["listing"] == seen[False]["listing"] == ["a-0"]
    # in its turn: bwrap's bind of the overlay; ahead: the read-only mount point it bound, the overlay on it
    assert len(seen[False]["mounts"]) == 1
    placeholder, tree = seen[True]["mounts"]
    assert placeholder["options"].startswith("ro,")
    turn = seen[False]["mounts"][0]
    assert (tree["type"], tree["options"]) == (turn["type"], turn["options"]) == ("overlay", turn["options"])
    assert {"nosuid", "nodev"} <= set(turn["options"].split(","))
    assert UUID.sub("uuid", tree["super"]) == UUID.sub("uuid", turn["super"])
    # the overlay reached the sandbox from the engine's side of the shared mount point: the sandbox's copy
    # receives (a slave), it sends nothing back
    assert [f for f in tree["optional"] if f.startswith("shared:")] == []


def test_the_stream_and_the_trees_are_the_same_with_stages_started_ahead(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("tree", stage("org.aosbuild.test.files", seed="a", lines=2),
                          stage("org.aosbuild.test.files", seed="b", lines=3, count=2),
                          stage("org.aosbuild.test.output", bytes=5000, line=100),
                          stage("org.aosbuild.test.files", seed="c")))
    streams = {}
    for ahead in (True, False):
        run = build(aosbuild, m, "--monitor", "jsonseq", "--export", "tree", "--output-directory",
                    str(aosbuild.workdir / f"out-{ahead}"), ahead=ahead, store=f"s-{ahead}")
        assert run.returncode == 0, run.stderr
        check_jsonseq(run.stdout)
        streams[ahead] = records(run.stdout)
    assert streams[True] == streams[False]
    trees = [sorted(p.name for p in (aosbuild.workdir / f"out-{ahead}" / "tree").iterdir()) for ahead in (True, False)]
    assert trees[0] == trees[1] == ["a-0", "b-0", "b-1", "c-0"]


def test_a_stage_that_writes_before_asking_for_its_arguments_is_run_again_with_its_tree(aosbuild: Aosbuild) -> None:
    """Started ahead, its tree is a read-only mount point until its turn (the stage below sleeps for a
    second): its early write fails (nothing is written where it would be lost), it ends before it has its
    tree, and it is run again in its turn."""
    m = manifest(pipeline("tree", stage("org.aosbuild.test.sleep", seconds=1, marker="a-0"),
                          stage("org.aosbuild.test.early-write"),
                          stage("org.aosbuild.test.files", seed="b")))
    out = aosbuild.workdir / "out"
    run = build(aosbuild, m, "--debug", "--monitor", "jsonseq", "--export", "tree", "--output-directory", str(out),
                ahead=True, store="s")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "stage.ahead_unused" in run.stderr  # it was started ahead, and that run did not count
    check_jsonseq(run.stdout)
    assert [r["message"] for r in records(run.stdout)].count("Starting module org.aosbuild.test.early-write") == 1
    assert sorted(p.name for p in (out / "tree").iterdir()) == ["a-0", "b-0", "early", "late"]
    assert (out / "tree" / "early").read_text() == "early\n"


def test_the_stage_timeout_of_a_stage_started_ahead_counts_from_its_turn(aosbuild: Aosbuild) -> None:
    """The second stage's sandbox starts with the first; its 1 s sleep ends 2.5 s after that or later, which
    would pass the 2 s timeout if the waiting counted."""
    m = manifest(pipeline("tree", stage("org.aosbuild.test.sleep", seconds=1.5, marker="one"),
                          stage("org.aosbuild.test.sleep", seconds=1.0, marker="two")))
    run = build(aosbuild, m, "--stage-timeout", "2", ahead=True, store="s")
    assert run.returncode == 0, run.stdout + run.stderr
    run = build(aosbuild, manifest(pipeline("tree", stage("org.aosbuild.test.sleep", seconds=0.2, marker="one"),
                                            stage("org.aosbuild.test.sleep", seconds=3, marker="two"))),
                "--stage-timeout", "2", ahead=True, store="s")
    assert run.returncode == 1
    assert "timed out after 2s" in run.stdout + run.stderr


def test_a_failing_stage_takes_the_stage_started_ahead_down_with_it(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("tree", stage("org.aosbuild.test.files", seed="a"), stage("org.aosbuild.test.fail"),
                          stage("org.aosbuild.test.sleep", seconds=30)))
    run = build(aosbuild, m, "--monitor", "jsonseq", ahead=True, store="s")
    assert run.returncode == 1
    check_jsonseq(run.stdout)
    messages = [r["message"] for r in records(run.stdout)]
    assert "Starting module org.aosbuild.test.sleep" not in messages  # never its turn: never reported
    assert "sleeping 30\n" not in messages  # nor its output
    assert [str(mount) for mount in stray_mounts(aosbuild.workdir)] == []
    store = aosbuild.workdir / "s"
    assert [*(store / "stage").iterdir(), *(store / "tmp").iterdir()] == []
