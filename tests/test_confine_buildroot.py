"""Attacks by build root: a build pipeline's tree is the manifest's, and the sandbox binds parts of it by
their host paths (its /usr, files of its /etc), which bwrap and the engine resolve with the host's `/`.

A build root whose `/usr` is a symlink to `/` showed every stage of the pipeline the host's whole `/`
(read-only) as its /usr; a FIFO at its `/etc/passwd` blocked the engine in `open()` for good (its event
loop too: neither `--stage-timeout` nor SIGTERM ended it).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from .conftest import Aosbuild, manifest, pipeline, stage

OPS = "org.aosbuild.test.tree-ops"


def links(*pairs: tuple[str, str]) -> dict[str, Any]:
    return stage("org.osbuild.ln", paths=[{"target": target, "link_name": f"tree:///{name}", "symbolic": True}
                                          for name, target in pairs])


def test_a_build_root_whose_usr_leads_out_of_it_is_refused(aosbuild: Aosbuild) -> None:
    secret = aosbuild.workdir / "secret.txt"
    secret.write_text("the host's\n")
    # a usable system as far as the sandbox goes: /usr is the host's /, whose /usr/bin/python3 runs
    build = pipeline("build", links(("usr", "/"), ("lib64", "usr/lib64"), ("lib", "usr/lib"), ("bin", "usr/bin")))
    stolen = pipeline("os", stage("org.aosbuild.test.from-build-root", paths=[f"/usr{secret}"]), build="name:build")
    result = aosbuild(manifest(build, stolen), "--export", "os", "--output-directory", str(aosbuild.output))
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr  # main: 0, the secret in the export
    assert "pipeline 'os' cannot run in its build root, pipeline 'build': its /usr is a symbolic link out of " \
           "that tree" in result.stderr, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (aosbuild.output / "os").exists()


def test_a_build_root_whose_etc_passwd_leads_out_of_it_is_refused(aosbuild: Aosbuild) -> None:
    build = pipeline("build", stage("org.aosbuild.test.buildroot"), stage(OPS, ops=[["mkdir", "etc", 0o755]]),
                     links(("etc/passwd", "/etc/shadow")))
    m = manifest(build, pipeline("os", stage("org.osbuild.mkdir", paths=[{"path": "/x"}]), build="name:build"))
    result = aosbuild(m)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr
    assert "its /etc/passwd is a symbolic link out of that tree" in result.stderr, result.stderr


def test_a_fifo_in_a_flat_build_roots_etc_does_not_block_the_engine(aosbuild: Aosbuild) -> None:
    """Flat (one plain directory), the engine opens the build root's /etc files itself, to copy them into
    the sandbox: a FIFO there blocked that open forever. Now it is bound as it is, the stage that reads
    it waits, and `--stage-timeout` ends it as any stage that hangs. (The stage reads it itself: since the
    runners start Python with -S, nothing else in a stage looks up a user at its start.)"""
    build = pipeline("build", stage("org.aosbuild.test.buildroot"),
                     stage(OPS, ops=[["mkdir", "etc", 0o755], ["fifo", "etc/passwd"]]))
    m = manifest(build, pipeline("os", stage("org.aosbuild.test.read", paths=["/etc/passwd"]), build="name:build"))
    command = aosbuild.command(m, "--stage-timeout", "3")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=aosbuild.workdir,
                              env={**os.environ, "AOSBUILD_FLAT": "1"})
    except subprocess.TimeoutExpired:  # main: blocked in open(), killed by subprocess.run
        raise AssertionError("the engine blocked on the build root's FIFO") from None
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr
    assert "timed out after 3s (--stage-timeout)" in done.stderr, done.stderr
