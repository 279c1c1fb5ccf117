"""org.osbuild.systemd: systemctl --root on units copied from the build root or made by unit.create."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import Node, assert_invalid, build_ab, umask

UNITS = "/usr/lib/systemd/system"
# a piece of a Debian system: its targets and a few units, and one unit of our own
BASE = [stage("org.aosbuild.test.from-build-root", paths=[
            f"{UNITS}/{name}" for name in ("multi-user.target", "graphical.target", "getty.target", "timers.target",
                                          "getty@.service", "fstrim.timer", "fstrim.service")]),
        stage("org.osbuild.systemd.unit.create", filename="hello.service", config={
            "Unit": {"Description": "Hello"}, "Service": {"Type": "oneshot", "ExecStart": ["/bin/true"]},
            "Install": {"WantedBy": ["multi-user.target"]}})]
WANTS = "etc/systemd/system/{}.wants/{}"


def systemd(**options: Any) -> dict[str, Any]:
    return stage("org.osbuild.systemd", **options)


def links(changes: Any) -> dict[str, str | None]:
    assert all(node.kind in ("symlink", "dir") for node in changes.added.values())
    return {path: node.target for path, node in changes.added.items() if node.kind == "symlink"}


def test_enables_units(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, BASE, systemd(enabled_services=["hello.service", "fstrim.timer", "getty@tty1"]))
    assert links(changes) == {
        WANTS.format("multi-user.target", "hello.service"): f"{UNITS}/hello.service",
        WANTS.format("timers.target", "fstrim.timer"): f"{UNITS}/fstrim.timer",
        WANTS.format("getty.target", "getty@tty1.service"): f"{UNITS}/getty@.service"}
    assert changes.added["etc/systemd/system"] == Node("dir", 0o755)  # systemctl's own mode
    assert (changes.removed, changes.changed) == ({}, {})


def test_disable_removes_every_link(aosbuild: Aosbuild) -> None:
    base = [*BASE, systemd(enabled_services=["hello.service", "fstrim.timer"])]
    changes = build_ab(aosbuild, base, systemd(disabled_services=["hello.service"]))
    # systemctl removes the .wants directory it emptied
    assert set(changes.removed) == {WANTS.format("multi-user.target", "hello.service"),
                                    "etc/systemd/system/multi-user.target.wants"}
    assert changes.added == {}


def test_mask_and_masked_generators(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, BASE, systemd(masked_services=["fstrim.timer", "not-installed.service"],
                                               masked_generators=["systemd-gpt-auto-generator"]))
    assert links(changes) == {"etc/systemd/system/fstrim.timer": "/dev/null",
                              "etc/systemd/system/not-installed.service": "/dev/null",
                              "etc/systemd/system-generators/systemd-gpt-auto-generator": "/dev/null"}
    assert changes.added["etc/systemd/system-generators"] == Node("dir", 0o755 & ~umask())


def test_default_target(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, BASE, systemd(default_target="graphical.target"))
    assert links(changes) == {"etc/systemd/system/default.target": f"{UNITS}/graphical.target"}


def test_default_target_the_tree_does_not_have_yet_is_linked(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, [], systemd(default_target="multi-user.target"))
    assert links(changes) == {"etc/systemd/system/default.target": f"{UNITS}/multi-user.target"}
    # (not the pipeline "b" again: that one is in the store now, and would not run)
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.noop"), systemd(default_target="multi-user.target"))))
    assert "WARNING: the tree has no unit multi-user.target (yet)" in result.stdout


def test_enabling_a_unit_the_tree_lacks_fails(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", *BASE, systemd(enabled_services=["nothere.service"]))))
    assert result.returncode == 1
    assert "unit nothere.service does not exist" in result.stdout + result.stderr


@pytest.mark.parametrize(("options", "message"), [
    ({"default_target": "../../escaped.target"}, "invalid default target '../../escaped.target'"),
    ({"default_target": "hello.service"}, "invalid default target 'hello.service'"),
    ({"masked_generators": ["../../../escaped"]}, "invalid generator name '../../../escaped'"),
])
def test_bad_names_fail(aosbuild: Aosbuild, options: dict[str, Any], message: str) -> None:
    result = aosbuild(manifest(pipeline("p", systemd(**options))))
    assert result.returncode == 1
    assert message in result.stderr


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", systemd(enabled_services="sshd.service"))))
    assert_invalid(result, ".pipelines[0].stages[0].options.enabled_services", "'sshd.service' is not of type 'array'")
    result = aosbuild(manifest(pipeline("p", systemd(unit_dropins={}))))
    assert_invalid(result, ".pipelines[0].stages[0].options", "Additional properties are not allowed")
