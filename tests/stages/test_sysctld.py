"""org.osbuild.sysctld: a sysctl.d file in /usr/lib/sysctl.d, with set and excluded keys."""

from __future__ import annotations

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import Node, assert_invalid, build_ab, umask

CONFIG = [{"key": "net.ipv4.ip_forward", "value": "1"}, {"key": "net.ipv4.conf.*.rp_filter", "value": "2"},
          {"key": "-net.ipv4.conf.all.rp_filter"}, {"key": "-kernel.unknown", "value": "0"}]
TEXT = ("net.ipv4.ip_forward = 1\nnet.ipv4.conf.*.rp_filter = 2\n-net.ipv4.conf.all.rp_filter\n"
        "-kernel.unknown = 0\n")


def test_writes_the_file_and_its_directories(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, [], stage("org.osbuild.sysctld", filename="50-router.conf", config=CONFIG))
    directory = Node("dir", 0o755 & ~umask())
    assert {p: n for p, n in changes.added.items() if n.kind == "dir"} == {
        "usr": directory, "usr/lib": directory, "usr/lib/sysctl.d": directory}
    assert changes.added["usr/lib/sysctl.d/50-router.conf"].mode == 0o644 & ~umask()
    assert (changes.removed, changes.changed) == ({}, {})
    assert (aosbuild.output / "b" / "usr/lib/sysctl.d/50-router.conf").read_text() == TEXT


def test_replaces_a_file_of_the_same_name(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.sysctld", filename="a.conf", config=CONFIG)]
    changes = build_ab(aosbuild, base, stage("org.osbuild.sysctld", filename="a.conf",
                                             config=[{"key": "vm.swappiness", "value": "10"}]))
    assert (changes.added, changes.removed, list(changes.changed)) == ({}, {}, ["usr/lib/sysctl.d/a.conf"])
    assert (aosbuild.output / "b" / "usr/lib/sysctl.d/a.conf").read_text() == "vm.swappiness = 10\n"


def test_a_second_line_in_a_value_fails(aosbuild: Aosbuild) -> None:
    config = [{"key": "vm.swappiness", "value": "10\nkernel.panic = 1"}]
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.sysctld", filename="a.conf", config=config))))
    assert result.returncode == 1
    assert "must be one line each" in result.stderr


@pytest.mark.parametrize("filename", ["../../../etc/escaped.conf", "/etc/x.conf", "noconf", ".conf"])
def test_filename_outside_sysctl_d_is_invalid(aosbuild: Aosbuild, filename: str) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.sysctld", filename=filename, config=CONFIG))))
    assert_invalid(result, ".pipelines[0].stages[0].options.filename", f"'{filename}' does not match")


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.sysctld", filename="a.conf", config=[]))))
    assert_invalid(result, ".pipelines[0].stages[0].options.config", "[] should be non-empty")
    no_value = aosbuild(manifest(pipeline("p", stage("org.osbuild.sysctld", filename="a.conf",
                                                     config=[{"key": "vm.swappiness"}]))))
    assert_invalid(no_value, ".pipelines[0].stages[0].options.config[0]", "{'key': 'vm.swappiness'} is not valid")
