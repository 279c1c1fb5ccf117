"""org.osbuild.tmpfilesd: a tmpfiles.d file in /usr/lib/tmpfiles.d; missing middle fields become "-"."""

from __future__ import annotations

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import assert_invalid, build_ab

CONFIG = [
    {"type": "d", "path": "/var/lib/app", "mode": "0750", "user": "app", "group": "app", "age": "10d"},
    {"type": "L+", "path": "/etc/app.conf", "argument": "/usr/share/app/app.conf"},
    {"type": "f", "path": "/run/app.flag", "user": "root"},
    {"type": "x", "path": "/tmp/app-*"},
]
TEXT = ("d /var/lib/app 0750 app app 10d\nL+ /etc/app.conf - - - - /usr/share/app/app.conf\n"
        "f /run/app.flag - root\nx /tmp/app-*\n")


def test_writes_the_file(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, [], stage("org.osbuild.tmpfilesd", filename="app.conf", config=CONFIG))
    assert set(changes.added) == {"usr", "usr/lib", "usr/lib/tmpfiles.d", "usr/lib/tmpfiles.d/app.conf"}
    assert (changes.removed, changes.changed) == ({}, {})
    assert (aosbuild.output / "b" / "usr/lib/tmpfiles.d/app.conf").read_text() == TEXT


def test_keeps_other_files(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.tmpfilesd", filename="other.conf", config=CONFIG[3:])]
    changes = build_ab(aosbuild, base, stage("org.osbuild.tmpfilesd", filename="app.conf", config=CONFIG[:1]))
    assert (list(changes.added), changes.removed, changes.changed) == (["usr/lib/tmpfiles.d/app.conf"], {}, {})


def test_a_second_line_fails(aosbuild: Aosbuild) -> None:
    config = [{"type": "d", "path": "/a\nr /etc/passwd"}]
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.tmpfilesd", filename="a.conf", config=config))))
    assert result.returncode == 1
    assert "must be one line each" in result.stderr


@pytest.mark.parametrize("filename", ["../../../escaped.conf", "sub/a.conf"])
def test_filename_outside_tmpfiles_d_is_invalid(aosbuild: Aosbuild, filename: str) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.tmpfilesd", filename=filename, config=CONFIG))))
    assert_invalid(result, ".pipelines[0].stages[0].options.filename", f"'{filename}' does not match")


def test_bad_options(aosbuild: Aosbuild) -> None:
    config = [{"type": "y", "path": "/x"}]
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.tmpfilesd", filename="a.conf", config=config))))
    assert_invalid(result, ".pipelines[0].stages[0].options.config[0].type", "'y' does not match")
    mode = [{"type": "d", "path": "/x", "mode": "755"}]
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.tmpfilesd", filename="a.conf", config=mode))))
    assert_invalid(result, ".pipelines[0].stages[0].options.config[0].mode", "'755' does not match")
