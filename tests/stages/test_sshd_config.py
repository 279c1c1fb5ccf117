"""org.osbuild.sshd.config: options set in place in a Debian sshd_config, new ones before any Match block."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import assert_invalid, build_ab

# the active lines of Debian 12's default sshd_config, some comments, and a Match block at the end
DEBIAN = """\
# This is the sshd server system-wide configuration file.
Include /etc/ssh/sshd_config.d/*.conf

#PermitRootLogin prohibit-password
#PasswordAuthentication yes
KbdInteractiveAuthentication no
UsePAM yes
X11Forwarding yes
PrintMotd no
AcceptEnv LANG LC_*
Subsystem\tsftp\t/usr/lib/openssh/sftp-server
Match User backup
\tPasswordAuthentication yes
"""


def item(text: str) -> tuple[str, dict[str, Any]]:
    data = text.encode()
    checksum = "sha256:" + hashlib.sha256(data).hexdigest()
    return checksum, {checksum: {"encoding": "base64", "data": base64.b64encode(data).decode()}}


def with_file(path: str, text: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Stages that put `text` at `path` in the tree, and the sources they need."""
    checksum, items = item(text)
    copy = {**stage("org.osbuild.copy", paths=[{"from": f"input://file/{checksum}", "to": f"tree://{path}"}]),
            "inputs": {"file": {"type": "org.osbuild.files", "origin": "org.osbuild.source",
                                "references": {checksum: {}}}}}
    mkdir = stage("org.osbuild.mkdir", paths=[{"path": path.rsplit("/", 1)[0], "parents": True, "exist_ok": True}])
    return [mkdir, copy], {"org.osbuild.inline": {"items": items}}


def sshd(**config: Any) -> dict[str, Any]:
    return stage("org.osbuild.sshd.config", config=config)


def test_sets_options_in_place_and_adds_the_others_before_match(aosbuild: Aosbuild) -> None:
    base, sources = with_file("/etc/ssh/sshd_config", DEBIAN)
    changes = build_ab(aosbuild, base, sshd(PasswordAuthentication=False, ChallengeResponseAuthentication=True,
                                            ClientAliveInterval=120, PermitRootLogin="prohibit-password"),
                       sources=sources)
    assert list(changes.changed) == ["etc/ssh/sshd_config"]
    text = (aosbuild.output / "b" / "etc/ssh/sshd_config").read_text()
    assert text == DEBIAN.replace("KbdInteractiveAuthentication no", "KbdInteractiveAuthentication yes").replace(
        "Match User backup", "PasswordAuthentication no\nClientAliveInterval 120\n"
                             "PermitRootLogin prohibit-password\nMatch User backup")


@pytest.mark.parametrize(("config", "line"), [({"PermitRootLogin": True}, "permitrootlogin yes"),
                                              ({"PermitRootLogin": False}, "permitrootlogin no")])
def test_keeps_the_files_spelling_of_a_key(aosbuild: Aosbuild, config: dict[str, Any], line: str) -> None:
    base, sources = with_file("/etc/ssh/sshd_config", "permitrootlogin forced-commands-only\nUsePAM yes")
    build_ab(aosbuild, base, sshd(**config), sources=sources)
    assert (aosbuild.output / "b" / "etc/ssh/sshd_config").read_text() == f"{line}\nUsePAM yes\n"


def test_warns_about_a_dropin_setting_the_same_option(aosbuild: Aosbuild) -> None:
    base, sources = with_file("/etc/ssh/sshd_config", DEBIAN)
    dropin, dropin_sources = with_file("/etc/ssh/sshd_config.d/50-cloud-init.conf", "PasswordAuthentication yes\n")
    sources["org.osbuild.inline"]["items"].update(dropin_sources["org.osbuild.inline"]["items"])
    result = aosbuild(manifest(pipeline("p", *base, *dropin, sshd(PasswordAuthentication=False)), sources=sources))
    assert result.returncode == 0, result.stderr
    assert "WARNING: /etc/ssh/sshd_config.d/50-cloud-init.conf sets some of these options too" in result.stdout


def test_without_sshd_config_fails(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", sshd(PasswordAuthentication=False))))
    assert result.returncode == 1
    assert "the tree has no /etc/ssh/sshd_config" in result.stderr


@pytest.mark.parametrize(("config", "where", "message"), [
    ({"PermitRootLogin": "without-password"}, ".PermitRootLogin", "'without-password' is not valid"),
    ({"ClientAliveInterval": "60"}, ".ClientAliveInterval", "'60' is not of type 'integer'"),
    ({"UseDNS": False}, "", "Additional properties are not allowed ('UseDNS' was unexpected)"),
])
def test_bad_options(aosbuild: Aosbuild, config: dict[str, Any], where: str, message: str) -> None:
    result = aosbuild(manifest(pipeline("p", sshd(**config))))
    assert_invalid(result, ".pipelines[0].stages[0].options.config" + where, message)
