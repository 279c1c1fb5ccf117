"""org.osbuild.locale: LANG in /etc/default/locale, where Debian reads it; a /etc/locale.conf goes."""

from __future__ import annotations

import hashlib

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import Node, assert_invalid, build_ab, umask


def locale_file(language: str) -> Node:
    content = f"LANG={language}\n".encode()
    return Node("file", 0o644 & ~umask(), size=len(content), sha256=hashlib.sha256(content).hexdigest())


@pytest.mark.parametrize("language", ["en_US.UTF-8", "C.UTF-8", "de_DE", "sr_RS@latin", "POSIX"])
def test_writes_etc_default_locale(aosbuild: Aosbuild, language: str) -> None:
    changes = build_ab(aosbuild, [], stage("org.osbuild.locale", language=language))
    directory = Node("dir", 0o755 & ~umask())
    assert changes.added == {"etc": directory, "etc/default": directory, "etc/default/locale": locale_file(language)}
    assert (changes.removed, changes.changed) == ({}, {})


def test_replaces_the_locale_and_removes_locale_conf(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.locale", language="C.UTF-8"),
            stage("org.osbuild.truncate", filename="/etc/locale.conf", size="8")]
    changes = build_ab(aosbuild, base, stage("org.osbuild.locale", language="en_GB.UTF-8"))
    assert changes.added == {}
    assert list(changes.removed) == ["etc/locale.conf"]
    assert changes.changed == {"etc/default/locale": {
        "size": (len("LANG=C.UTF-8\n"), len("LANG=en_GB.UTF-8\n")),
        "sha256": (hashlib.sha256(b"LANG=C.UTF-8\n").hexdigest(), locale_file("en_GB.UTF-8").sha256)}}


@pytest.mark.parametrize("language", ["", "en US", "en_US.UTF-8\nLC_ALL=C", "../x"])
def test_invalid_locale_fails(aosbuild: Aosbuild, language: str) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.locale", language=language))))
    assert result.returncode == 1
    assert "invalid locale" in result.stderr


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.locale"))))
    assert_invalid(result, ".pipelines[0].stages[0].options", "'language' is a required property")
    extra = aosbuild(manifest(pipeline("p", stage("org.osbuild.locale", language="C", lang="C"))))
    assert_invalid(extra, ".pipelines[0].stages[0].options", "Additional properties are not allowed")
