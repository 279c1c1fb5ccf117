"""org.aosbuild.debian.sshd-keygen: the build's SSH host keys go, a unit makes each machine's at boot."""

from __future__ import annotations

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .test_sshd_config import with_file
from .treediff import build_ab, export

KEYS = ("etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_ed25519_key.pub", "etc/ssh/ssh_host_rsa_key",
        "etc/ssh/ssh_host_rsa_key.pub")


def test_removes_the_host_keys_and_installs_the_unit_wanted_by_ssh(aosbuild: Aosbuild) -> None:
    base, sources = with_file("/usr/sbin/sshd", "#!/bin/sh\n")
    for key in KEYS:
        more, more_sources = with_file(f"/{key}", f"the build's {key}\n")
        base += more
        sources["org.osbuild.inline"]["items"].update(more_sources["org.osbuild.inline"]["items"])
    moduli, moduli_sources = with_file("/etc/ssh/moduli", "kept\n")
    sources["org.osbuild.inline"]["items"].update(moduli_sources["org.osbuild.inline"]["items"])
    changes = build_ab(aosbuild, [*base, *moduli], stage("org.aosbuild.debian.sshd-keygen"), sources=sources)
    assert sorted(changes.removed) == sorted(KEYS)
    assert sorted(changes.added) == ["etc/systemd", "etc/systemd/system", "etc/systemd/system/ssh.service.wants",
                                     "etc/systemd/system/ssh.service.wants/sshd-keygen.service",
                                     "usr/lib", "usr/lib/systemd", "usr/lib/systemd/system",
                                     "usr/lib/systemd/system/sshd-keygen.service"]
    tree = aosbuild.output / "b"
    unit = (tree / "usr/lib/systemd/system/sshd-keygen.service").read_text()
    assert "Before=ssh.service" in unit
    assert "ExecStart=/usr/bin/ssh-keygen -A" in unit
    assert (tree / "etc/systemd/system/ssh.service.wants/sshd-keygen.service").readlink().as_posix() == \
        "/usr/lib/systemd/system/sshd-keygen.service"


def test_a_tree_without_sshd_is_refused(aosbuild: Aosbuild) -> None:
    result = export(aosbuild, manifest(pipeline("a", stage("org.aosbuild.debian.sshd-keygen"))), "a")
    assert result.returncode == 1
    assert "install openssh-server before this stage" in result.stderr
