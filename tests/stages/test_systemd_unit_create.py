"""org.osbuild.systemd.unit.create: unit files laid out as osbuild writes them, in /usr or /etc."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import Node, assert_invalid, build_ab, umask

SERVICE = {
    "Unit": {"Description": "Grow the root filesystem", "DefaultDependencies": False, "After": ["local-fs.target"],
             "Wants": ["a.service", "b.service"]},
    "Service": {"Type": "oneshot", "RemainAfterExit": True, "ExecStart": ["/usr/bin/grow", "/usr/bin/log done"],
                "Environment": [{"key": "LANG", "value": "C.UTF-8"}, {"key": "DEBUG", "value": "1"}],
                "StandardOutput": "journal+console"},
    "Install": {"WantedBy": ["multi-user.target"]},
}
SERVICE_TEXT = """[Unit]
Description=Grow the root filesystem
DefaultDependencies=False
After=local-fs.target
Wants=a.service
Wants=b.service

[Service]
Type=oneshot
RemainAfterExit=True
ExecStart=/usr/bin/grow
ExecStart=/usr/bin/log done
Environment="LANG=C.UTF-8"
Environment="DEBUG=1"
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target

"""


def unit(filename: str, config: dict[str, Any], **options: Any) -> dict[str, Any]:
    return stage("org.osbuild.systemd.unit.create", filename=filename, config=config, **options)


def test_writes_a_service_to_usr(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, [], unit("grow.service", SERVICE))
    directory = Node("dir", 0o755 & ~umask())
    assert {path: node for path, node in changes.added.items() if node.kind == "dir"} == {
        "usr": directory, "usr/lib": directory, "usr/lib/systemd": directory, "usr/lib/systemd/system": directory}
    assert changes.added["usr/lib/systemd/system/grow.service"].mode == 0o644 & ~umask()
    assert (aosbuild.output / "b" / "usr/lib/systemd/system/grow.service").read_text() == SERVICE_TEXT


@pytest.mark.parametrize(("filename", "config", "options", "path", "text"), [
    ("srv.mount", {"Mount": {"What": "/dev/vdb1", "Where": "/srv", "Type": "ext4", "Options": "noatime"}},
     {"unit-path": "etc"}, "etc/systemd/system/srv.mount",
     "[Mount]\nWhat=/dev/vdb1\nWhere=/srv\nType=ext4\nOptions=noatime\n\n"),
    ("agent.socket", {"Socket": {"ListenStream": "%t/agent.sock", "Accept": False}}, {"unit-type": "global"},
     "usr/lib/systemd/user/agent.socket", "[Socket]\nListenStream=%t/agent.sock\nAccept=False\n\n"),
    ("swapfile.swap", {"Swap": {"What": "/swapfile", "Priority": 5}}, {"unit-path": "etc", "unit-type": "global"},
     "etc/systemd/user/swapfile.swap", "[Swap]\nWhat=/swapfile\nPriority=5\n\n"),
])
def test_other_kinds_and_places(aosbuild: Aosbuild, filename: str, config: dict[str, Any], options: dict[str, Any],
                                path: str, text: str) -> None:
    changes = build_ab(aosbuild, [], unit(filename, config, **options))
    assert path in changes.added
    assert (aosbuild.output / "b" / path).read_text() == text


def test_replaces_a_unit(aosbuild: Aosbuild) -> None:
    base = [unit("grow.service", SERVICE)]
    config = {"Unit": {}, "Service": {"ExecStart": ["/bin/true"]}, "Install": {}}
    changes = build_ab(aosbuild, base, unit("grow.service", config))
    assert list(changes.changed) == ["usr/lib/systemd/system/grow.service"]
    text = (aosbuild.output / "b" / "usr/lib/systemd/system/grow.service").read_text()
    assert text == "[Unit]\n\n[Service]\nExecStart=/bin/true\n\n[Install]\n\n"


def test_a_second_line_fails(aosbuild: Aosbuild) -> None:
    config = {"Unit": {"Description": "x\nExecStartPre=/bin/evil"}, "Service": {}, "Install": {}}
    result = aosbuild(manifest(pipeline("p", unit("x.service", config))))
    assert result.returncode == 1
    assert "unit file values must be one line each" in result.stderr


@pytest.mark.parametrize(("filename", "config", "where", "message"), [
    ("../../escaped.service", SERVICE, ".filename", "'../../escaped.service' does not match"),
    ("x.timer", SERVICE, ".filename", "'x.timer' does not match"),
    ("x.service", {"Unit": {}, "Service": {}}, ".config", "{'Unit': {}, 'Service': {}} is not valid"),
    ("x.service", {**SERVICE, "Service": {"User": "nobody"}}, ".config.Service",
     "Additional properties are not allowed ('User' was unexpected)"),
])
def test_bad_options(aosbuild: Aosbuild, filename: str, config: dict[str, Any], where: str, message: str) -> None:
    result = aosbuild(manifest(pipeline("p", unit(filename, config))))
    assert_invalid(result, ".pipelines[0].stages[0].options" + where, message)


def test_section_must_match_the_suffix(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", unit("x.service", {"Mount": {"What": "a", "Where": "/b"}}))))
    assert result.returncode == 1
    assert "x.service: a .service unit needs a Service section" in result.stderr
