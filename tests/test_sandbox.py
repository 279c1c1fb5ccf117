"""The stage sandbox's capabilities: exactly osbuild's set as far as the host's bounding set allows."""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import pytest

from aosbuild import sandbox
from aosbuild.sandboxside import runnerlib

from .conftest import Aosbuild, manifest, pipeline, stage

PR_CAPBSET_DROP = 24


def test_stage_capabilities_leave_out_what_the_bounding_set_lacks() -> None:
    everything = (1 << 41) - 1
    assert sandbox.stage_capabilities(everything) == sandbox.CAPABILITIES
    without = everything & ~(1 << sandbox.CAP_BITS["CAP_SYS_RESOURCE"])
    assert "CAP_SYS_RESOURCE" not in sandbox.stage_capabilities(without)
    assert len(sandbox.stage_capabilities(without)) == len(sandbox.CAPABILITIES) - 1
    assert sandbox.bounding_set("Name:\tx\nCapBnd:\t000001fffeffffff\n") == 0x1FFFEFFFFFF


def test_runner_refuses_other_capabilities_than_intended() -> None:
    mine = runnerlib.effective_capabilities()
    runnerlib.check_capabilities(f"{mine:x}")
    with pytest.raises(runnerlib.CapabilityError, match="instead of"):
        runnerlib.check_capabilities(f"{mine ^ 1:x}")


def drop_from_bounding_set(*caps: str) -> None:
    """In the child before exec: drop capabilities from its bounding set, as a container would."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in caps:
        if libc.prctl(PR_CAPBSET_DROP, sandbox.CAP_BITS[cap], 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap})")


@pytest.mark.parametrize("dropped", [(), ("CAP_SYS_RESOURCE",), ("CAP_SYS_RESOURCE", "CAP_SYS_NICE", "CAP_SETFCAP")])
def test_stage_gets_intended_capabilities_under_a_reduced_bounding_set(
        aosbuild: Aosbuild, dropped: tuple[str, ...]) -> None:
    m = manifest(pipeline("tree", stage("org.aosbuild.test.caps")))
    argv = aosbuild.command(m, "--export", "tree", "--output-directory", str(aosbuild.output))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=aosbuild.workdir,
                          preexec_fn=lambda: drop_from_bounding_set(*dropped))
    assert proc.returncode == 0, proc.stderr
    caps = dict(line.split(":\t") for line in (aosbuild.output / "tree" / "caps").read_text().splitlines())
    bounding = sandbox.bounding_set()
    for cap in dropped:
        bounding &= ~(1 << sandbox.CAP_BITS[cap])
    intended = sandbox.capability_mask(sandbox.CAPABILITIES) & bounding
    assert int(caps["CapEff"], 16) == intended
    assert int(caps["CapPrm"], 16) == intended



def test_build_root_etc_files_are_copied_in_and_its_directories_bound(tmp_path: Path) -> None:
    # the files of the build root's /etc that a stage's tools read arrive as copies (no mount each: fewer
    # mounts per stage), its directories as read-only binds, and what it lacks stays absent
    root = tmp_path / "root"
    (root / "etc/ld.so.conf.d").mkdir(parents=True)
    (root / "usr").symlink_to("/usr")
    for name in ("bin", "lib", "lib64"):
        (root / name).symlink_to(f"usr/{name}")
    (root / "etc/passwd").write_text("builder:x:0:0::/root:/bin/sh\n")
    (root / "etc/ld.so.conf.d/extra.conf").write_text("/opt/lib\n")
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / "etc/mke2fs.conf").mkdir()  # not a file: bound, as before
    tree = tmp_path / "tree"
    tree.mkdir()
    spec = sandbox.SandboxSpec(build_root=root, tree=tree, executable=Path("/bin/true"), runner=Path("/bin/true"))
    copies = sandbox.open_etc_copies(root)
    try:
        assert sorted(copies) == ["os-release", "passwd"]
        argv = sandbox.bwrap_argv(spec, sandbox.stage_capabilities(sandbox.bounding_set()), copies)
        script = ("cat /etc/passwd /etc/ld.so.conf.d/extra.conf; cmp /etc/os-release /usr/lib/os-release && echo same;"
                  " test -e /etc/group || echo no-group; test -d /etc/mke2fs.conf && echo dir;"
                  " stat -c %a /etc/passwd; cut -d' ' -f5 /proc/self/mountinfo")
        argv = [*argv[:argv.index("--") + 1], "/bin/sh", "-c", script]
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60,
                             pass_fds=list(copies.values())).stdout.splitlines()
    finally:
        for fd in copies.values():
            os.close(fd)
    assert out[:6] == ["builder:x:0:0::/root:/bin/sh", "/opt/lib", "same", "no-group", "dir", "444"]
    mounts = set(out[6:])
    assert {"/etc/ld.so.conf.d", "/etc/mke2fs.conf", "/usr"} <= mounts
    assert not {"/etc/passwd", "/etc/os-release"} & mounts
