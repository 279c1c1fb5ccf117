"""End-to-end builds through the CLI, on the real bubblewrap sandbox."""

from __future__ import annotations

import json
import os
import socket
import tarfile
import time
from pathlib import Path

import pytest

from .conftest import GOLDEN, Aosbuild, check_jsonseq, manifest, pipeline, stage


def started_stages(stream: list[dict[str, object]]) -> list[str]:
    return [str(r["message"]) for r in stream if str(r.get("message", "")).startswith("Starting module")]


def leftovers(store: Path) -> list[Path]:
    """Staging entries and scratch directories: a finished build leaves none."""
    return [*(store / "stage").iterdir(), *(store / "tmp").iterdir()]


def test_build_export_and_rebuild_runs_no_stage(aosbuild: Aosbuild) -> None:
    path = GOLDEN / "v2-two-pipelines-tree-input.json"
    args = ("--export", "archive", "--output-directory", str(aosbuild.output), "--monitor", "jsonseq")
    first = aosbuild(path, *args)
    assert first.returncode == 0, first.stderr
    check_jsonseq(first.stdout)
    assert len(started_stages(first.jsonseq())) == 3
    with tarfile.open(aosbuild.output / "archive" / "os.tar") as tar:
        names = tar.getnames()
        assert "./etc/hostname" in names
        hostname = tar.extractfile("./etc/hostname")
        assert hostname is not None
        assert hostname.read() == b"golden\n"
    assert (aosbuild.store / "objects" / "f1840e4ca2b0523a2bf288f9d6b7d4d7d0088604257411b7c194dfd715eee8b6").is_dir()

    second = aosbuild(path, *args)
    assert second.returncode == 0, second.stderr
    check_jsonseq(second.stdout)
    assert started_stages(second.jsonseq()) == []
    assert leftovers(aosbuild.store) == []


def test_summary_lists_pipelines(aosbuild: Aosbuild) -> None:
    result = aosbuild(GOLDEN / "v2-truncate-chmod.json")
    assert result.returncode == 0, result.stderr
    assert "tree:     \tfa0e466784d49682a1b7b3cb129b7a75b16bff9c2aed6aee3f0f1988056ce85a" in result.stdout
    assert "finished successfully" in result.stdout
    tree = aosbuild.store / "objects" / "fa0e466784d49682a1b7b3cb129b7a75b16bff9c2aed6aee3f0f1988056ce85a"
    newfile = tree / "data" / "tree" / "newfile"
    assert newfile.stat().st_size == 1 << 30
    assert oct(newfile.stat().st_mode & 0o777) == "0o444"


def sleepers(count: int, seconds: float) -> dict[str, object]:
    return manifest(*(pipeline(f"p{i}", stage("org.aosbuild.test.sleep", seconds=seconds, marker=f"m{i}"))
                      for i in range(count)))


def test_independent_pipelines_run_at_the_same_time(aosbuild: Aosbuild) -> None:
    m = sleepers(4, 2)
    started = time.monotonic()
    parallel = aosbuild(m, "--monitor", "jsonseq", "--json")
    parallel_time = time.monotonic() - started
    assert parallel.returncode == 0, parallel.stderr
    assert parallel_time < 4.0, f"4 pipelines of 2 s took {parallel_time:.1f} s with the default --jobs"

    sequential = Aosbuild(aosbuild.workdir / "seq")
    sequential.workdir.mkdir()
    started = time.monotonic()
    one = sequential(m, "--jobs", "1", "-q")
    sequential_time = time.monotonic() - started
    assert one.returncode == 0, one.stderr
    assert sequential_time >= 8.0, f"--jobs 1 should run one pipeline at a time, took {sequential_time:.1f} s"
    # the same trees under the same ids either way
    assert sorted(p.name for p in (aosbuild.store / "objects").iterdir()) == \
        sorted(p.name for p in (sequential.store / "objects").iterdir())


def test_parallel_stream_is_valid_and_attributed(aosbuild: Aosbuild) -> None:
    result = aosbuild(sleepers(3, 0.5), "--monitor", "jsonseq")
    assert result.returncode == 0, result.stderr
    summary = check_jsonseq(result.stdout)
    assert "pipelines=3 stages=3 failed_stages=0 final_done=3/3" in summary
    # every stage output record names the pipeline it came from
    contexts: dict[str, dict[str, object]] = {}
    for record in result.jsonseq():
        context = record["context"]
        assert isinstance(context, dict)
        if "origin" in context:
            contexts[str(context["id"])] = context
        full = contexts[str(context["id"])]
        if str(record.get("message", "")).startswith("sleeping"):
            pipeline_ctx = full["pipeline"]
            assert isinstance(pipeline_ctx, dict)
            assert pipeline_ctx["name"] in ("p0", "p1", "p2")


def test_failing_stage(aosbuild: Aosbuild) -> None:
    m = manifest(
        pipeline("good", stage("org.aosbuild.test.sleep", seconds=0)),
        pipeline("bad", stage("org.osbuild.noop"), stage("org.aosbuild.test.fail", lines=30, exit=3)))
    result = aosbuild(m, "--monitor", "jsonseq", "--monitor-fd", "1")
    assert result.returncode == 1
    failing = json.loads(aosbuild(m, "--inspect").stdout)["pipelines"][1]["stages"][1]["id"]
    assert "org.aosbuild.test.fail" in result.stderr
    assert failing in result.stderr
    assert "exited with status 3" in result.stderr
    assert "line 29 of the failing stage" in result.stderr
    assert "line 5 of the failing stage" not in result.stderr  # only the last lines
    assert "Traceback" not in result.stderr
    check_jsonseq(result.stdout)
    assert not (aosbuild.store / "objects" / failing).exists()
    assert leftovers(aosbuild.store) == []


def test_failing_stage_json_document(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("tree", stage("org.osbuild.noop"), stage("org.aosbuild.test.fail", raise_="x")))
    m["pipelines"][0]["stages"][1]["options"] = {"raise": "no good"}
    result = aosbuild(m, "--json")
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert document["success"] is False
    assert document["error"]["type"] == "org.osbuild.error.stage"
    failed = document["error"]["details"]["stage"]
    assert failed["type"] == "org.aosbuild.test.fail"
    assert failed["error"]["data"]["type"] == "RuntimeError"
    assert failed["error"]["data"]["value"] == "no good"
    assert [entry["type"] for entry in document["log"]["tree"]] == ["org.osbuild.noop", "org.aosbuild.test.fail"]
    assert document["log"]["tree"][1]["success"] is False
    assert "RuntimeError: no good" in result.stderr


def test_channel_metadata_progress_and_log(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("tree", stage("org.aosbuild.test.report", steps=3, answer=7)))
    result = aosbuild(m, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["metadata"]["tree"]["org.aosbuild.test.report"] == {"answer": 7, "big": ""}
    assert "logged through the channel" in document["log"]["tree"][0]["output"]

    streamed = aosbuild(m, "--monitor", "jsonseq")  # a cache hit now: progress came the first time
    check_jsonseq(streamed.stdout)
    fresh = Aosbuild(aosbuild.workdir / "fresh")
    fresh.workdir.mkdir()
    stream = fresh(m, "--monitor", "jsonseq")
    check_jsonseq(stream.stdout)
    levels = [r["progress"] for r in stream.jsonseq() if "progress" in r["progress"]
              and "progress" in r["progress"]["progress"]]
    done = [lvl["progress"]["progress"]["done"] for lvl in levels]
    assert sorted(set(done)) == [1, 2, 3]
    assert done == sorted(done)
    finished = [r for r in stream.jsonseq() if r.get("message") == "Finished module org.aosbuild.test.report"]
    assert finished[0]["metadata"] == {"answer": 7}


def test_sandbox_has_no_network_and_readonly_usr(aosbuild: Aosbuild) -> None:
    # a server on the host's loopback: a sandbox sharing the host's network would reach it
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = aosbuild(manifest(pipeline("tree", stage("org.aosbuild.test.report", probe_port=port))),
                          "--export", "tree", "--output-directory", str(aosbuild.output))
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # nobody connected
            server.accept()[0].close()
    assert result.returncode == 0, result.stderr
    facts = json.loads((aosbuild.output / "tree" / "facts.json").read_text())
    # its own network namespace: only a loopback, where nothing listens on the port
    assert facts["network"] == "ConnectionRefusedError"
    assert facts["interfaces"] in (["lo"], [])
    assert facts["usr_writable"] is False
    assert facts["pid"] < 10  # a fresh pid namespace
    assert facts["arguments"]["tree"] == "/run/osbuild/tree"


def test_checkpoints(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/a"}]),
                          stage("org.osbuild.mkdir", paths=[{"path": "/b"}])))
    described = json.loads(aosbuild(m, "--inspect").stdout)
    first = described["pipelines"][0]["stages"][0]["id"]
    assert aosbuild(m, "--checkpoint", "does-not-match").returncode == 1
    result = aosbuild(m, "--checkpoint", first)
    assert result.returncode == 0, result.stderr
    assert (aosbuild.store / "objects" / first / "data" / "tree" / "a").is_dir()
    assert not (aosbuild.store / "objects" / first / "data" / "tree" / "b").exists()
    assert f"{first}: cached" in result.stdout

    # a changed last stage resumes from the checkpoint: only one stage runs
    m["pipelines"][0]["stages"][1]["options"]["paths"] = [{"path": "/c"}]
    rebuilt = aosbuild(m, "--monitor", "jsonseq", "--export", "tree", "--output-directory", str(aosbuild.output))
    assert started_stages(rebuilt.jsonseq()) == ["Starting module org.osbuild.mkdir"]
    assert sorted(os.listdir(aosbuild.output / "tree")) == ["a", "c"]


def check_export_errors(cli: Aosbuild) -> None:
    """An unknown export and a missing --output-directory, as osbuild words them (the drop-in's test too)."""
    m = manifest(pipeline("tree", stage("org.osbuild.noop")), pipeline("other", stage("org.osbuild.noop")))
    missing = cli(m, "--export", "nope", "--output-directory", str(cli.output))
    assert missing.returncode == 1
    assert "Export nope not found in ['tree', 'other']" in missing.stderr
    no_dir = cli(m, "--export", "tree")
    assert no_dir.returncode == 1
    assert "Need --output-directory for --export" in no_dir.stderr


def test_export_errors(aosbuild: Aosbuild) -> None:
    check_export_errors(aosbuild)


def test_export_by_id(aosbuild: Aosbuild) -> None:
    path = GOLDEN / "v2-truncate-chmod.json"
    tree_id = "fa0e466784d49682a1b7b3cb129b7a75b16bff9c2aed6aee3f0f1988056ce85a"
    result = aosbuild(path, "--export", tree_id, "--output-directory", str(aosbuild.output))
    assert result.returncode == 0, result.stderr
    assert (aosbuild.output / tree_id / "newfile").is_file()


def test_stage_timeout(aosbuild: Aosbuild) -> None:
    started = time.monotonic()
    result = aosbuild(manifest(pipeline("tree", stage("org.aosbuild.test.sleep", seconds=60))),
                      "--stage-timeout", "1")
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    assert "timed out after 1s" in result.stderr
    assert leftovers(aosbuild.store) == []


def test_inline_source_and_files_input(aosbuild: Aosbuild) -> None:
    path = GOLDEN / "v2-files-input-inline.json"
    result = aosbuild(path, "--export", "tree", "--output-directory", str(aosbuild.output), "--json")
    assert result.returncode == 0, result.stderr
    assert (aosbuild.output / "tree" / "hello.txt").read_text() == "hello osbuild\n"
    document = json.loads(result.stdout)
    assert document["sources"]["org.osbuild.inline"] == [
        {"cached": False, "checksum": "sha256:f80caab74e43203d39d78d3548f5834bb310959a1020f2c9c4c4610e04a24e64"}]


def test_build_pipeline_is_the_build_root(aosbuild: Aosbuild) -> None:
    """A pipeline with `build` runs its stages on that pipeline's /usr, not the host's."""
    m = manifest(pipeline("build", stage("org.aosbuild.test.buildroot")),
                 pipeline("tree", stage("org.aosbuild.test.report"), build="name:build"),
                 pipeline("host", stage("org.aosbuild.test.report", answer=1)))
    result = aosbuild(m, "--export", "tree", "--export", "host", "--output-directory", str(aosbuild.output))
    assert result.returncode == 0, result.stderr
    assert json.loads((aosbuild.output / "tree" / "facts.json").read_text())["build_root_marker"] is True
    assert json.loads((aosbuild.output / "host" / "facts.json").read_text())["build_root_marker"] is False
    assert "runner: org.osbuild.linux" in result.stdout  # the build tree has no os-release


def test_asyncio_backend_builds_the_same(aosbuild: Aosbuild) -> None:
    path = GOLDEN / "v2-two-pipelines-tree-input.json"
    result = aosbuild(path, "--backend", "asyncio", "--monitor", "jsonseq")
    assert result.returncode == 0, result.stderr
    check_jsonseq(result.stdout)
    assert (aosbuild.store / "objects" / "c42800cbd00369b48022fb8d301014367c7a291b95cbc2fb34de18f4c3c96cde").is_dir()
