"""The remote cache with Debian content: the README sample's system, shared through a real registry.

Machine A is the session's sample build (`debian_sample`); its rebuild with `--cache-remote` runs no
stage and pushes what its store holds of the `os` pipeline and the build root under it. Machine B, an
empty store without a source item, builds the same manifest: it pulls and runs nothing, and its `os`
tree equals A's in full (content, modes, owners, xattrs, links, devices).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Aosbuild, DebianSample, check_jsonseq
from .registry import Registry
from .test_remotecache import REPOSITORY, log_in, machine, messages, stages_run
from .treedigest import digest


@pytest.mark.slow
def test_an_empty_machine_gets_the_sample_s_system_from_the_registry_and_runs_no_stage(
        debian_sample: DebianSample, served: Registry, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert debian_sample.build.returncode == 0
    log_in(monkeypatch, workdir, served.host)
    remote = f"{served.host}/{REPOSITORY}"
    a = Aosbuild(debian_sample.workdir)
    pushed = a(debian_sample.manifest, "--cache-remote", remote, "--export", "os", "--output-directory",
               str(workdir / "a-output"), "--monitor", "jsonseq", timeout=900)
    assert pushed.returncode == 0, pushed.stderr[-4000:]
    assert stages_run(pushed) == []
    assert any(m.startswith("remote cache: pushed") for m in messages(pushed)), messages(pushed)

    b = machine(workdir, "b")
    pulled = b(debian_sample.manifest, "--cache-remote", remote, "--export", "os", "--output-directory",
               str(b.output), "--monitor", "jsonseq", timeout=900)
    assert pulled.returncode == 0, pulled.stderr[-4000:]
    check_jsonseq(pulled.stdout)
    assert stages_run(pulled) == []
    assert [m for m in messages(pulled) if m.startswith("warning: remote cache")] == []
    assert not any(m.startswith("Starting pipeline source") for m in messages(pulled))  # no package fetched
    assert digest(str(b.output / "os")) == digest(str(debian_sample.output / "os"))
