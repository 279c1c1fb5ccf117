"""The engine's side of osbuild's stage contract: runner choice, capabilities, the API endpoint, metadata."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import anyio
import pytest

from aosbuild import osbuild_api
from aosbuild.errors import SandboxError
from aosbuild.loop import open_loop_server
from aosbuild.sandbox import CAP_BITS, CAPABILITIES, stage_capabilities


def library(tmp_path: Path) -> Path:
    runners = tmp_path / "runners"
    runners.mkdir(parents=True)
    for name in ("org.osbuild.ubuntu1804", "org.osbuild.fedora30", "org.osbuild.fedora38", "org.osbuild.linux"):
        (runners / name).write_text("#!/usr/bin/python3\n")
        (runners / name).chmod(0o755)
    # an alias as a checkout without symlinks leaves it, and one as a real symlink
    (runners / "org.osbuild.debian").write_text("org.osbuild.ubuntu1804")
    (runners / "org.osbuild.rhel90").symlink_to("org.osbuild.fedora38")
    return tmp_path


@pytest.mark.parametrize(("wanted", "name", "runs"), [
    ("org.osbuild.debian12", "org.osbuild.debian", "org.osbuild.ubuntu1804"),
    ("org.osbuild.fedora40", "org.osbuild.fedora38", "org.osbuild.fedora38"),
    ("org.osbuild.fedora35", "org.osbuild.fedora30", "org.osbuild.fedora30"),
    ("org.osbuild.rhel94", "org.osbuild.rhel90", "org.osbuild.rhel90"),  # bwrap binds what it points to
])
def test_the_runner_is_chosen_as_osbuild_chooses_it(tmp_path: Path, wanted: str, name: str, runs: str) -> None:
    root = library(tmp_path)
    assert osbuild_api.library_runner(root, wanted) == (name, root / "runners" / runs)


@pytest.mark.parametrize("wanted", ["org.osbuild.fedora29", "org.osbuild.arch", "org.osbuild.centos9"])
def test_no_runner_of_that_distribution_at_or_below_is_an_error(tmp_path: Path, wanted: str) -> None:
    with pytest.raises(SandboxError, match="No suitable runner"):
        osbuild_api.library_runner(library(tmp_path), wanted)


def test_a_text_file_that_is_not_a_runner_name_is_run_as_it_is(tmp_path: Path) -> None:
    root = library(tmp_path)
    (root / "runners" / "org.osbuild.debian").write_text("org.osbuild.missing")
    assert osbuild_api.library_runner(root, "org.osbuild.debian12")[1] == root / "runners" / "org.osbuild.debian"


def test_capabilities_from_the_metadata_are_added_within_the_bounding_set() -> None:
    everything = (1 << 41) - 1
    assert stage_capabilities(everything, ("CAP_MAC_ADMIN", "CAP_CHOWN")) == (*CAPABILITIES, "CAP_MAC_ADMIN")
    without = everything & ~(1 << CAP_BITS["CAP_MAC_ADMIN"])
    assert stage_capabilities(without, ("CAP_MAC_ADMIN",)) == CAPABILITIES


def test_metadata_file(tmp_path: Path) -> None:
    meta = tmp_path / "meta"
    meta.write_text("")
    assert osbuild_api.read_metadata(meta) == {}
    meta.write_text(json.dumps({"packages": ["a"]}, indent=2))
    assert osbuild_api.read_metadata(meta) == {"packages": ["a"]}
    meta.write_text("[1]")
    with pytest.raises(SandboxError, match="not a JSON object"):
        osbuild_api.read_metadata(meta)


def client(path: Path) -> socket.socket:
    """A client as osbuild's jsoncomm makes one: autobind, then connect."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind("")
    sock.connect(os.fspath(path))
    return sock


async def test_exceptions_sent_before_the_stage_exits_are_all_read(tmp_path: Path) -> None:
    """A stage (or runner) that reports and exits at once: connection and packet are still queued when the
    engine drains, one of them too large for a packet and sent in a memfd as jsoncomm does."""
    seen: list[dict[str, Any]] = []
    big = "x" * 100_000
    async with open_loop_server() as loops, \
            osbuild_api.open_api(tmp_path / "api", on_exception=seen.append, loops=loops) as api:
        with client(api.sockets.osbuild) as sock:
            sock.send(json.dumps({"method": "exception",
                                  "exception": {"type": "ValueError", "value": "v", "traceback": "t"}}).encode())
            memfd = os.memfd_create("jsoncomm")
            os.write(memfd, json.dumps({"method": "exception", "exception": {"type": "OSError", "value": big,
                                                                             "traceback": ""}}).encode())
            os.lseek(memfd, 0, os.SEEK_SET)
            sock.sendmsg([osbuild_api.VIA_FD], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, memfd.to_bytes(4, "little"))])
            os.close(memfd)
        await api.drain()
    assert seen == [{"type": "ValueError", "value": "v", "traceback": "t"},
                    {"type": "OSError", "value": big, "traceback": ""}]


async def test_a_bad_remoteloop_request_gets_osbuilds_exception_reply(tmp_path: Path) -> None:
    async with open_loop_server() as loops, \
            osbuild_api.open_api(tmp_path / "api", on_exception=lambda data: None, loops=loops) as api:
        with client(api.sockets.remoteloop) as sock:
            sock.send(json.dumps({"fd": 0, "dir_fd": 1}).encode())  # no descriptors passed
            sock.settimeout(10)
            reply = json.loads(await anyio.to_thread.run_sync(sock.recv, 65536))
    assert reply["method"] == "exception"
    assert reply["exception"]["type"] == "IndexError"
