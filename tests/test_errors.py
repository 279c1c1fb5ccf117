"""Bad input and bad flags end in a clear message and the documented exit code, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import Aosbuild, Run, manifest, pipeline, stage
from .test_osbuild_compat import Osbuild

SIMPLE = manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/x"}])))


def clear(run: Run, code: int, message: str) -> None:
    assert run.returncode == code, (run.stdout, run.stderr)
    assert message in run.stdout + run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(("text", "message"), [
    (b'{"version": "2", "pipelines": [{"name": "\xff"}]}', "not UTF-8: byte 0xff at offset 41"),
    (b'{"version": "2", "pipelines": [], "x": ' + b"1" * 4400 + b"}", "invalid number: Exceeds the limit"),
    (b'{"version": "2", "pipelines": [{"name": "tree", "stages": [{"type": "org.osbuild.noop", "options": '
     b'{"x": ' + b"[" * 980 + b"]" * 980 + b"}}]}]}", "nested more than 500 levels deep"),
    (b'{"version": "2", "pipelines": [], "x": ' + b"[" * 100000 + b"]" * 100000 + b"}",
     "nested more than 500 levels deep"),
], ids=["utf-8", "digits", "nesting", "deep-nesting"])
def test_unreadable_manifest(aosbuild: Aosbuild, text: bytes, message: str) -> None:
    path = aosbuild.workdir / "bad.json"
    path.write_bytes(text)
    clear(aosbuild(path), 2, message)


def test_unreadable_manifest_osbuild_json(workdir: Path) -> None:
    path = workdir / "bad.json"
    path.write_bytes(b'{"version": "2", "pipelines": [{"name": "\xff"}]}')
    run = Osbuild(workdir)(path, "--json")
    clear(run, 2, "not UTF-8")
    assert json.loads(run.stdout)["success"] is False


JOBS_FLAGS = [  # aosbuild only: the drop-in takes osbuild's command line, which has no --jobs
    (["--jobs", "-1"], "--jobs: must be 1 or more, not -1"),
    (["--jobs", "0"], "--jobs: must be 1 or more, not 0"),
]
COMMON_FLAGS = [
    (["--monitor-fd", "99"], "--monitor-fd: 99 is not a descriptor open for writing"),
    (["--monitor-fd", "-1"], "--monitor-fd: -1 is not a descriptor open for writing"),
    (["--monitor-fd", "0"], "--monitor-fd: 0 is not a descriptor open for writing"),
    (["--stage-timeout", "nan"], "--stage-timeout: must be a number of seconds above 0, not nan"),
    (["--stage-timeout", "0"], "--stage-timeout: must be a number of seconds above 0, not 0"),
    (["--stage-timeout", "-1"], "--stage-timeout: must be a number of seconds above 0, not -1"),
    (["--libdir", "/nonexistent/lib"], "--libdir: /nonexistent/lib is not a directory"),
    (["--export", "tree", "--output-directory", "FILE"], "FILE exists and is not a directory"),
    (["--export", "tree", "--output-directory", "DANGLING"], "DANGLING is a symbolic link to nothing"),
]


@pytest.mark.parametrize(("command", "args", "message"),
                         [("aosbuild", a, m) for a, m in JOBS_FLAGS + COMMON_FLAGS]
                         + [("osbuild", a, m) for a, m in COMMON_FLAGS])
def test_bad_flag(workdir: Path, command: str, args: list[str], message: str) -> None:
    (workdir / "FILE").write_text("")
    (workdir / "DANGLING").symlink_to(workdir / "nothing")
    args = [str(workdir / a) if a in ("FILE", "DANGLING") else a for a in args]
    message = message.replace("FILE", str(workdir / "FILE")).replace("DANGLING", str(workdir / "DANGLING"))
    runner = Aosbuild(workdir) if command == "aosbuild" else Osbuild(workdir)
    path = runner.write_manifest(SIMPLE)
    with path.open("rb") as stdin:  # fd 0 open for reading only, whatever pytest's stdin is
        proc = subprocess.run(runner.command(path, *args, "--json"), stdin=stdin, capture_output=True,
                              text=True, timeout=120, cwd=workdir)
    run = Run(proc.returncode, proc.stdout, proc.stderr)
    clear(run, 2, message)
    document = json.loads(run.stdout)
    assert document["success"] is False
    assert message in document["message"]
    assert not (workdir / "store").exists() or not list((workdir / "store" / "objects").glob("*"))


@pytest.mark.parametrize("params", [{"offset": "not a number"}, [1, 2]], ids=["bad-value", "not-an-object"])
def test_rpc_bad_params_get_an_error_reply(aosbuild: Aosbuild, params: Any) -> None:
    m = manifest(pipeline("tree", stage("org.aosbuild.test.rpc-call", method="loop.attach", params=params)))
    run = aosbuild(m)
    clear(run, 1, "engine replied with an error: invalid params for loop.attach")


def only_entry(aosbuild: Aosbuild) -> Path:
    (entry,) = (aosbuild.store / "objects").iterdir()
    return entry


def test_corrupt_results_json_is_a_miss(aosbuild: Aosbuild) -> None:
    assert aosbuild(SIMPLE).returncode == 0
    (only_entry(aosbuild) / "data" / "meta" / "results.json").write_text("{not json")
    run = aosbuild(SIMPLE, "--monitor", "jsonseq")
    clear(run, 0, "")
    assert any(r.get("message", "").startswith("Starting module org.osbuild.mkdir") for r in run.jsonseq())


def test_infinite_size_in_object_info(aosbuild: Aosbuild) -> None:
    assert aosbuild(SIMPLE).returncode == 0
    (only_entry(aosbuild) / "object.info").write_text('{"size": 1e400, "created": 1}')
    clear(aosbuild(SIMPLE, "--cache-max-size", "1"), 0, "")


def test_read_only_store(aosbuild: Aosbuild) -> None:
    aosbuild.store.mkdir()
    # the read-only bind mount lives in a private mount namespace and goes away with the process
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount --bind -o ro "$1" "$1" && shift && exec "$@"', "sh", str(aosbuild.store),
               *aosbuild.command(SIMPLE)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=aosbuild.workdir)
    clear(Run(proc.returncode, proc.stdout, proc.stderr), 1,
          f"cannot use {aosbuild.store} as the store: Read-only file system; give --store a writable directory")


@pytest.mark.parametrize("monitor", ["log", "jsonseq"])
def test_broken_pipe_ends_quietly(aosbuild: Aosbuild, monitor: str) -> None:
    # `aosbuild ... | head -1` with head long gone: the reading end is closed before the build starts
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(aosbuild.command(SIMPLE, "--monitor", monitor), stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=aosbuild.workdir)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""
    assert list((aosbuild.store / "stage").iterdir()) == []
    assert list((aosbuild.store / "tmp").iterdir()) == []


def test_broken_pipe_ends_store_info_quietly(aosbuild: Aosbuild) -> None:
    assert aosbuild(SIMPLE).returncode == 0  # a store with an entry, so that info has lines to print
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "aosbuild", "store", "info", "--store", str(aosbuild.store)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


@pytest.mark.parametrize("port", ["99999", "0"])
def test_invalid_url_port_fails_at_once(aosbuild: Aosbuild, port: str) -> None:
    checksum = "sha256:" + "0" * 64
    m = manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/x"}])),
                 sources={"org.osbuild.curl": {"items": {checksum: f"http://127.0.0.1:{port}/file"}}})
    run = aosbuild(m, "--sources-only", timeout=60)
    clear(run, 1, f"invalid port {port} in the URL (ports are 1 to 65535); fix the source item's URL")
    assert "attempt" not in run.stdout + run.stderr
    assert run.stderr.endswith("What to do: check those items' URLs and checksums in the manifest's `sources`, "
                               "then run `--sources-only` again (the items it fetched are kept).\n")


def test_read_only_store_osbuild_json(workdir: Path) -> None:
    osbuild = Osbuild(workdir)
    osbuild.store.mkdir()
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount --bind -o ro "$1" "$1" && shift && exec "$@"', "sh", str(osbuild.store),
               *osbuild.command(SIMPLE, "--json")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=workdir)
    clear(Run(proc.returncode, proc.stdout, proc.stderr), 1, "Read-only file system")
    document = json.loads(proc.stdout)
    assert document["success"] is False
    assert "Read-only file system; give --store a writable directory" in document["message"]


def store_command(*args: str) -> Run:
    proc = subprocess.run([sys.executable, "-m", "aosbuild", "store", *args], capture_output=True, text=True,
                          timeout=60)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def test_store_commands_on_a_directory_that_is_not_a_store(workdir: Path) -> None:
    (workdir / "notes.txt").write_text("mine\n")
    for command in (["prune", "--to", "0"], ["verify"], ["info"]):
        clear(store_command(*command, "--store", str(workdir)), 1,
              f"Error: {workdir} is not an aosbuild store (it has no cache.info): check --store; a build makes "
              "the store it is given")
    clear(store_command("clear", "--store", str(workdir)), 1,
          f"Error: {workdir} does not look like a store (no cache.info, no CACHEDIR.TAG): not touching it; check "
          "--store")
    assert [p.name for p in workdir.iterdir()] == ["notes.txt"]


def test_a_loopback_device_on_a_file_the_tree_lacks(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("tree", {"type": "org.aosbuild.test.fail", "options": {"exit": 0}, "devices": {
        "disk": {"type": "org.osbuild.loopback", "options": {"filename": "disk.img"}}}}))
    clear(aosbuild(m), 1, "Error: loopback device file 'disk.img' does not exist in the tree: make it in an "
                          "earlier stage (org.osbuild.truncate, say)")


@pytest.mark.parametrize(("repo", "message"), [
    ("[trusted=yes http://127.0.0.1:9/debian bookworm main", "--repo: unclosed '[' in the options: close it"),
    ("[trusted] http://127.0.0.1:9/debian bookworm main",
     "--repo: option 'trusted' is not key=value: write it as signed-by=KEYRING or trusted=yes"),
    ("http://127.0.0.1:9/debian bookworm", "--repo: suite 'bookworm' needs at least one component: add one"),
])
def test_a_repository_entry_apt_would_not_take(workdir: Path, repo: str, message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "aosbuild", "depsolve", "--cache", str(workdir), "--repo", repo,
                           "tool"], capture_output=True, text=True, timeout=60)
    clear(Run(proc.returncode, proc.stdout, proc.stderr), 2, message)
    assert list(workdir.iterdir()) == []  # refused before apt ran


@pytest.mark.parametrize(("source", "message"), [
    ({"org.osbuild.curl": {"items": {"sha256:" + "0" * 64: "file:///etc/hostname"}}},
     "aosbuild downloads http:// and https:// URLs only: serve the file over HTTP(S), or put a small one in the "
     "manifest as an org.osbuild.inline item"),
    ({"org.osbuild.inline": {"items": {"sha256:" + "0" * 64: {"encoding": "base64", "data": "not base64!"}}}},
     "; an item's `data` must be what its `encoding` says (base64 or lzma+base64)"),
], ids=["file-url", "inline-data"])
def test_a_source_item_that_cannot_be_fetched(aosbuild: Aosbuild, source: dict[str, Any], message: str) -> None:
    run = aosbuild(manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/x"}])), sources=source),
                   "--sources-only", timeout=60)
    clear(run, 1, message)
    assert "attempt" not in run.stdout + run.stderr
