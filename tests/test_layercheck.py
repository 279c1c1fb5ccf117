"""The bottom layer checked beside the next stage (`layercheck`): a kill -9 while it is pending."""

from __future__ import annotations

import json
import signal
import subprocess

from .conftest import Aosbuild, manifest, pipeline, stage
from .leftovers import stray_mounts
from .test_build import leftovers, started_stages
from .test_layers import OVERLAY_NAMED
from .treedigest import digest

OPS = "org.aosbuild.test.tree-ops"


def test_a_build_killed_while_its_bottom_layer_is_pending_leaves_a_miss(aosbuild: Aosbuild) -> None:
    """The bottom layer holds xattrs to escape, so it stays pending (write-locked, without a size) until
    the stage above it ends; killed then, the build leaves an entry that the next build takes for the
    damaged leftover it is: removed, built again, and the tree right."""
    slow = manifest(pipeline("named", stage(OPS, ops=OVERLAY_NAMED), stage("org.aosbuild.test.sleep", seconds=60)))
    described = json.loads(aosbuild(slow, "--inspect").stdout)["pipelines"][0]["stages"]
    bottom = aosbuild.store / "objects" / described[0]["id"]
    with subprocess.Popen(aosbuild.command(slow, "--monitor", "jsonseq"), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, cwd=aosbuild.workdir) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if b"Starting module org.aosbuild.test.sleep" in line:
                break
        info = json.loads((bottom / "object.info").read_text())
        proc.send_signal(signal.SIGKILL)
    assert info["pending"] is True
    assert info["size"] is None
    quick = manifest(pipeline("named", stage(OPS, ops=OVERLAY_NAMED), stage("org.aosbuild.test.sleep", seconds=0)))
    after = aosbuild(quick, "--monitor", "jsonseq", "--export", "named", "--output-directory", str(aosbuild.output))
    assert after.returncode == 0, after.stderr
    # built again, and the stage above it twice: beside the walk, and again on the escaped layer
    sleep = "Starting module org.aosbuild.test.sleep"
    assert started_stages(after.jsonseq()) == [f"Starting module {OPS}", sleep, sleep]
    info = json.loads((bottom / "object.info").read_text())
    assert "pending" not in info
    assert info["size"] > 0
    tree = digest(str(aosbuild.output / "named"))
    assert sorted(tree["d"]["xattrs"]) == ["trusted.overlay.opaque"]
    assert sorted(tree["f"]["xattrs"]) == ["trusted.overlay.foo"]
    assert leftovers(aosbuild.store) == []
    assert stray_mounts(aosbuild.workdir) == []
