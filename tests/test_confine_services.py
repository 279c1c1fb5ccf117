"""Attacks through osbuild's host services: a stage plants a symlink, the next stage's mount follows it.

osbuild's mount services (run unchanged from its library) resolve `tree://` and `mount://` locations on
the host, in the host's mount namespace: `mount --rbind TREE/escape TREE/mnt` with `escape -> /anywhere`
bound the host's directory into the stage (and a target through such a link mounted over it, on the
host). aosbuild refuses such a mount before its service is called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from aosbuild.hostservices import StoreApi
from aosbuild.store.pins import TreeView

from . import osbuild_library_manifest as lib
from .conftest import Aosbuild
from .leftovers import mounts_under
from .test_host_services import test_library  # noqa: F401  # the fixture: osbuild's library, runnable


def planting_manifest(victim: Path, bind: dict[str, str]) -> dict[str, Any]:
    """`escape -> victim` planted by `ln`, then a copy into `/mnt` with a bind mount that uses it."""
    mount = {"name": "escape", "type": "org.osbuild.bind", "target": bind["target"],
             "options": {"source": bind["source"]}}
    return {"version": "2", "pipelines": [{"name": "os", "stages": [
        lib.stage("org.osbuild.mkdir", {"paths": [{"path": "/etc"}, {"path": "/mnt"}]}),
        lib.stage("org.osbuild.hostname", {"hostname": "planted"}),
        lib.stage("org.osbuild.ln", {"paths": [{"target": os.fspath(victim), "link_name": "tree:///escape",
                                                "symbolic": True}]}),
        lib.stage("org.osbuild.copy", {"paths": [{"from": "tree:///etc/hostname", "to": "tree:///mnt/"}]},
                  mounts=[mount])]}]}


@pytest.mark.slow
@pytest.mark.parametrize("bind", [{"source": "tree://escape", "target": "tree://mnt"},
                                  {"source": "tree://etc", "target": "tree://escape"}],
                         ids=["source through the link", "target through the link"])
def test_a_bind_mount_through_a_planted_symlink_is_refused(test_library: Path, aosbuild: Aosbuild,  # noqa: F811
                                                            bind: dict[str, str]) -> None:
    victim = aosbuild.workdir / "victim"
    victim.mkdir()
    (victim / "secret").write_text("the host's\n")
    result = aosbuild(planting_manifest(victim, bind), "--libdir", str(test_library), "--export", "os",
                      "--output-directory", str(aosbuild.output))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr
    assert f"mount 'escape': {bind['source'] if 'escape' in bind['source'] else bind['target']} resolves " \
           "outside the stage's tree" in result.stderr, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert sorted(os.listdir(victim)) == ["secret"]  # main copied the tree's hostname into the host's directory
    assert (victim / "secret").read_text() == "the host's\n"
    assert [str(mp) for mp in mounts_under(aosbuild.workdir) if mp.point != str(aosbuild.store)] == []


async def test_an_input_services_subtree_through_a_planted_symlink_is_refused(tmp_path: Path) -> None:
    """osbuild's `store` endpoint binds `TREE/SUBTREE` for an input service, on the host: a subtree through
    a symlink the tree holds (`sub -> /etc`) would bind the host's directory into the stage."""
    tree, scratch = tmp_path / "tree", tmp_path / "scratch"
    (tree / "inside").mkdir(parents=True)
    (tree / "sub").symlink_to("/etc")
    (tree / "up").symlink_to("../..")
    (scratch / "target").mkdir(parents=True)
    api = StoreApi(view_of=lambda _: TreeView(layers=(tree,), flat=True), store_root=tmp_path, empty=tmp_path,
                   sources=tmp_path, scratch=scratch)
    try:  # main bound the host's /etc: released even when the test fails
        for subtree in ("/sub", "sub/ssh", "/up/etc"):
            reply = await api.handle({"method": "read-tree-at", "object-id": "0" * 64,
                                      "target": str(scratch / "target"), "subtree": subtree}, [])
            assert "resolves outside its tree" in reply.get("error", ""), reply
        assert api.binds == []
        reply = await api.handle({"method": "read-tree-at", "object-id": "0" * 64, "target": str(scratch / "target"),
                                  "subtree": "/inside"}, [])
        assert reply == {"path": str(scratch / "target")}
    finally:
        api.release()
