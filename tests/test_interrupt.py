"""Ctrl-C, SIGTERM and SIGHUP during a stage: the right exit code, and nothing left running, mounted or staged."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from .conftest import Aosbuild, check_jsonseq, manifest, pipeline, stage
from .leftovers import processes_mentioning, stray_mounts


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_mid_stage_cleans_up(aosbuild: Aosbuild, signum: int, exit_code: int) -> None:
    m = manifest(*(pipeline(f"p{i}", stage("org.osbuild.mkdir", paths=[{"path": "/x"}]),
                            stage("org.aosbuild.test.sleep", seconds=120, marker=f"m{i}")) for i in range(3)))
    proc = subprocess.Popen(aosbuild.command(m, "--monitor", "jsonseq"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=aosbuild.workdir)
    assert proc.stdout is not None
    assert proc.stderr is not None
    seen = b""
    sleeping = 0
    try:
        # wait until every pipeline's sleep stage is running, reading the progress stream
        while sleeping < 3:
            line = proc.stdout.readline()
            assert line, f"the build ended early: {proc.stderr.read().decode()}"
            seen += line
            if json.loads(line[1:]).get("message", "").startswith("sleeping"):
                sleeping += 1
        assert processes_mentioning(str(aosbuild.workdir))  # the sandboxes are there
        proc.send_signal(signum)
        rest, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == exit_code, stderr.decode()
    assert b"Aborted" in stderr
    assert b"Traceback" not in stderr
    check_jsonseq(seen + rest)
    assert processes_mentioning(str(aosbuild.workdir)) == []
    assert [str(m) for m in stray_mounts(aosbuild.workdir)] == []
    assert list((aosbuild.store / "stage").iterdir()) == []
    assert list((aosbuild.store / "tmp").iterdir()) == []
