"""The store as a cache, through the CLI: incremental rebuilds, what a hit reports, eviction, store commands."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from typing import Any

from .conftest import Aosbuild, Run, check_jsonseq, manifest, pipeline, stage
from .test_build import leftovers, started_stages

TREE_INPUT = {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": ["name:os"]}


def files(seed: str, **options: Any) -> dict[str, Any]:
    return stage("org.aosbuild.test.files", seed=seed, lines=2, **options)


def three_pipelines() -> dict[str, Any]:
    """A build root, an OS tree built on it, and an archive of the OS tree."""
    return manifest(
        pipeline("build", files("build"), stage("org.aosbuild.test.buildroot")),
        pipeline("os", files("os-1"), files("os-2"), stage("org.osbuild.hostname", hostname="one"),
                 build="name:build"),
        pipeline("archive", stage("org.osbuild.mkdir", paths=[{"path": "/out"}]),
                 {"type": "org.osbuild.tar", "inputs": {"tree": TREE_INPUT}, "options": {"filename": "os.tar"}}))


def finished(run: Run) -> dict[str, dict[str, Any]]:
    """Each stage's "Finished module" record, by stage id, without what differs between runs."""
    records = {}
    for record in run.jsonseq():
        if str(record.get("message", "")).startswith("Finished module") and "id" in record["result"]:
            result = {k: v for k, v in record["result"].items() if k != "cached"}
            records[result["id"]] = {"result": result, "metadata": record.get("metadata"),
                                     "duration": record["duration"], "options": record.get("options")}
    return records


def test_rebuild_after_changing_a_last_stage_reruns_only_that_stage(aosbuild: Aosbuild) -> None:
    m = three_pipelines()
    first = aosbuild(m, "--monitor", "jsonseq")
    assert first.returncode == 0, first.stderr
    assert len(started_stages(first.jsonseq())) == 7

    # the archive's last stage: nothing depends on it, so it is the only stage to run
    m["pipelines"][2]["stages"][1]["options"]["filename"] = "renamed.tar"
    second = aosbuild(m, "--monitor", "jsonseq", "--export", "archive", "--output-directory", str(aosbuild.output))
    assert second.returncode == 0, second.stderr
    check_jsonseq(second.stdout)
    assert started_stages(second.jsonseq()) == ["Starting module org.osbuild.tar"]
    assert sorted(os.listdir(aosbuild.output / "archive")) == ["out", "renamed.tar"]

    # the OS tree's last stage: that stage, and the archive that reads the tree, run again
    m["pipelines"][1]["stages"][2]["options"]["hostname"] = "two"
    third = aosbuild(m, "--monitor", "jsonseq")
    assert third.returncode == 0, third.stderr
    check_jsonseq(third.stdout)
    assert started_stages(third.jsonseq()) == ["Starting module org.osbuild.hostname",
                                               "Starting module org.osbuild.tar"]
    assert leftovers(aosbuild.store) == []


def test_a_cache_hit_reports_what_the_build_reported(aosbuild: Aosbuild) -> None:
    m = three_pipelines()
    built = aosbuild(m, "--json")
    assert built.returncode == 0, built.stderr
    hit = aosbuild(m, "--json")
    assert hit.returncode == 0, hit.stderr
    built_doc, hit_doc = json.loads(built.stdout), json.loads(hit.stdout)
    assert built_doc["metadata"]["os"]["org.aosbuild.test.files"] == {"seed": "os-2", "files": 1}
    assert "os-1 line 1" in built_doc["log"]["os"][0]["output"]
    assert hit_doc["metadata"] == built_doc["metadata"]
    assert hit_doc["log"] == built_doc["log"]

    fresh = Aosbuild(aosbuild.workdir / "fresh")
    fresh.workdir.mkdir()
    streamed = fresh(m, "--monitor", "jsonseq")
    streamed_hit = fresh(m, "--monitor", "jsonseq")
    check_jsonseq(streamed_hit.stdout)
    assert started_stages(streamed_hit.jsonseq()) == []
    assert finished(streamed_hit) == finished(streamed)  # results, metadata, durations, options
    assert len(finished(streamed)) == 7
    cached = [r for r in streamed_hit.jsonseq() if r.get("result", {}).get("cached")]
    assert len(cached) == 7


def test_a_resumed_pipeline_reports_the_stages_it_did_not_run(aosbuild: Aosbuild) -> None:
    m = three_pipelines()
    assert aosbuild(m, "-q").returncode == 0
    m["pipelines"][1]["stages"][2]["options"]["hostname"] = "two"
    resumed = aosbuild(m, "--json")
    assert resumed.returncode == 0, resumed.stderr
    log = json.loads(resumed.stdout)["log"]
    assert [entry["type"] for entry in log["os"]] == ["org.aosbuild.test.files", "org.aosbuild.test.files",
                                                       "org.osbuild.hostname"]
    assert "os-2 line 0" in log["os"][1]["output"]


def big_tree(name: str, kib: int) -> dict[str, Any]:
    return manifest(pipeline(name, files(name, size=kib * 1024)))


def pipeline_id(aosbuild: Aosbuild, m: dict[str, Any]) -> str:
    described = json.loads(aosbuild(m, "--inspect").stdout)
    return str(described["pipelines"][0]["stages"][-1]["id"])  # a pipeline's id is its last stage's


def test_eviction_least_recently_used_first_and_a_full_cache_never_fails_a_build(aosbuild: Aosbuild) -> None:
    trees = {name: big_tree(name, 300) for name in ("a", "b", "c", "d")}
    ids = {name: pipeline_id(aosbuild, m) for name, m in trees.items()}
    # room for three of them (each is 300 KiB and a few KiB of results and info)
    for name in ("a", "b", "c"):
        result = aosbuild(trees[name], "-q", "--cache-max-size", "1000KiB")
        assert result.returncode == 0, result.stderr
    assert aosbuild(trees["a"], "-q").returncode == 0  # a hit: `a` is used again, `b` is now the oldest
    assert aosbuild(trees["d"], "-q").returncode == 0  # the bound was remembered
    assert sorted(os.listdir(aosbuild.store / "objects")) == sorted(ids[n] for n in ("a", "c", "d"))
    # a lower bound holds from the build that sets it, even one that stores nothing
    assert aosbuild(trees["d"], "-q", "--cache-max-size", "700KiB").returncode == 0
    assert sorted(os.listdir(aosbuild.store / "objects")) == sorted(ids[n] for n in ("a", "d"))
    assert aosbuild(trees["c"], "-q", "--cache-max-size", "1000KiB").returncode == 0

    # larger than the bound: built and exported all the same, and the log says why it is not kept
    huge = big_tree("huge", 2048)
    result = aosbuild(huge, "--export", "huge", "--output-directory", str(aosbuild.output))
    assert result.returncode == 0, result.stderr
    assert (aosbuild.output / "huge" / "huge-0").stat().st_size == 2048 * 1024
    assert "is not stored: its tree (2.0 MiB) is larger than the cache bound (1000.0 KiB)" in result.stdout
    assert not (aosbuild.store / "objects" / pipeline_id(aosbuild, huge)).exists()
    assert leftovers(aosbuild.store) == []


def test_an_entry_in_use_by_another_build_is_not_evicted(aosbuild: Aosbuild) -> None:
    """A long build reads `base`; builds that need the room cannot evict it."""
    base = big_tree("base", 300)
    assert aosbuild(base, "-q", "--cache-max-size", "700KiB").returncode == 0
    base_id = pipeline_id(aosbuild, base)
    reads_base = {"type": "org.aosbuild.test.files", "options": {"seed": "slow", "lines": 1, "pause": 30},
                  "inputs": {"base": {**TREE_INPUT, "references": ["name:base"]}}}
    reader = manifest(pipeline("base", files("base", size=300 * 1024)), pipeline("slow", reads_base))
    with subprocess.Popen(aosbuild.command(reader, "--monitor", "jsonseq"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, cwd=aosbuild.workdir) as proc:
        try:
            assert proc.stdout is not None
            while b"slow line 0" not in (line := proc.stdout.readline()):
                assert line, "the reading build ended early"
            for name in ("x", "y"):
                result = aosbuild(big_tree(name, 300), "--monitor", "jsonseq")
                assert result.returncode == 0, result.stderr
            assert (aosbuild.store / "objects" / base_id).is_dir()
            # `y` needed the room `x` had: `base`, older but in use, stayed
            assert not (aosbuild.store / "objects" / pipeline_id(aosbuild, big_tree("x", 300))).exists()
        finally:
            proc.kill()


def test_store_info_counts_agree_in_number(aosbuild: Aosbuild) -> None:
    assert aosbuild(manifest(pipeline("one", stage("org.osbuild.mkdir", paths=[{"path": "/x"}]))), "-q").returncode == 0
    info = subprocess.run([sys.executable, "-m", "aosbuild", "store", "info", "--store", str(aosbuild.store)],
                          capture_output=True, text=True)
    assert "  trees:       1 entry, " in info.stdout, info.stdout
    assert "  sources:     0 items, " in info.stdout
    assert "  one: 1 layer, " in info.stdout


def test_store_commands(aosbuild: Aosbuild) -> None:
    store = str(aosbuild.store)
    m = three_pipelines()
    assert aosbuild(m, "-q").returncode == 0

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*aosbuild.command(m)[:3], "store", *args, "--store", store],
                              capture_output=True, text=True)

    info = command("info")
    assert info.returncode == 0, info.stderr
    assert "(format 3)" in info.stdout
    assert "Trees by pipeline" in info.stdout
    assert "(default: 20 GiB or half the filesystem)" in info.stdout
    assert "  os: 3 layers, " in info.stdout
    assert "  archive: 2 layers, " in info.stdout
    assert "0 entries under construction" in info.stdout
    document = json.loads(command("info", "--json").stdout)
    entries = len(os.listdir(aosbuild.store / "objects"))
    assert document["trees"]["entries"] == entries >= 3
    assert document["staging"] == {"building": 0, "dead": 0, "size": 0}
    # each pipeline's tree is a stack of its stages' layers, each with its own size
    stacks = {s["pipeline"]: s for s in document["trees"]["stacks"]}
    assert sorted(stacks) == ["archive", "build", "os"]
    assert [layer["stage"] for layer in stacks["os"]["layers"]] == [
        "org.aosbuild.test.files", "org.aosbuild.test.files", "org.osbuild.hostname"]
    assert stacks["os"]["size"] == sum(layer["size"] for layer in stacks["os"]["layers"]) > 0
    assert stacks["os"]["complete"]

    limit = command("limit", "--cache-max-size", "5GiB", "--sources-max-size", "unlimited")
    assert limit.stdout == "trees:   5.0 GiB\nsources: unlimited\n"
    assert json.loads((aosbuild.store / "cache.info").read_text())["maximum-size"] == 5 * 2**30
    assert command("limit", "--cache-max-size", "5 parsecs").returncode == 2

    pruned = command("prune", "--to", "0")
    assert pruned.returncode == 0, pruned.stderr
    assert f"trees: evicted {entries} entries" in pruned.stdout
    assert os.listdir(aosbuild.store / "objects") == []

    assert aosbuild(m, "-q").returncode == 0
    cleared = command("clear")
    assert cleared.returncode == 0, cleared.stderr
    assert os.listdir(aosbuild.store / "objects") == []
    assert json.loads((aosbuild.store / "cache.info").read_text())["maximum-size"] == 5 * 2**30  # kept


def test_a_store_of_another_format_and_the_way_out(aosbuild: Aosbuild) -> None:
    aosbuild.store.mkdir()
    (aosbuild.store / "cache.info").write_text(json.dumps({"version": 1, "maximum-size": 1000000}))
    (aosbuild.store / "objects" / "old" / "data" / "tree").mkdir(parents=True)
    m = manifest(pipeline("tree", stage("org.osbuild.noop")))
    refused = aosbuild(m, "-q")
    assert refused.returncode == 1
    assert "format 1" in refused.stderr
    assert f"aosbuild store clear --store {aosbuild.store}" in refused.stderr
    assert "Traceback" not in refused.stderr
    cleared = subprocess.run([*aosbuild.command(m)[:3], "store", "clear", "--store", str(aosbuild.store)],
                             capture_output=True, text=True)
    assert cleared.returncode == 0, cleared.stderr
    assert aosbuild(m, "-q").returncode == 0
    info = json.loads((aosbuild.store / "cache.info").read_text())
    assert info == {"version": 3, "maximum-size": 1000000}
    assert leftovers(aosbuild.store) == []


def test_a_failing_second_stage_keeps_the_bottom_layer_whole(aosbuild: Aosbuild) -> None:
    """The bottom layer, committed pending while the stage above it runs, is checked and kept whole
    when that stage fails: a rebuild resumes after it."""
    m = manifest(pipeline("tree", files("one"), stage("org.aosbuild.test.fail")))
    described = json.loads(aosbuild(m, "--inspect").stdout)["pipelines"][0]["stages"]
    assert aosbuild(m, "-q").returncode == 1
    assert os.listdir(aosbuild.store / "objects") == [described[0]["id"]]
    info = json.loads((aosbuild.store / "objects" / described[0]["id"] / "object.info").read_text())
    assert "pending" not in info
    assert info["size"] > 0
    assert info["flat"] is True
    assert leftovers(aosbuild.store) == []
    again = aosbuild(m, "--monitor", "jsonseq")
    assert again.returncode == 1
    assert started_stages(again.jsonseq()) == ["Starting module org.aosbuild.test.fail"]


def test_a_stage_that_fails_commits_nothing_but_the_stages_before_it(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("tree", files("one"), files("two"), stage("org.aosbuild.test.fail")))
    before = copy.deepcopy(m)
    assert aosbuild(m, "-q").returncode == 1
    described = json.loads(aosbuild(before, "--inspect").stdout)["pipelines"][0]["stages"]
    objects = os.listdir(aosbuild.store / "objects")
    assert described[2]["id"] not in objects
    # the layers of the stages before the failing one, which succeeded: a rebuild resumes after them
    assert sorted(objects) == sorted([described[0]["id"], described[1]["id"]])
    assert leftovers(aosbuild.store) == []
