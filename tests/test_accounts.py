"""The build root's accounts as osbuild's runners make them: systemd-sysusers on its sysusers.d."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import anyio
import pytest

from aosbuild.accounts import make_accounts, sysusers_configs

needs_sysusers = pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")


def layer(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "usr/lib/sysusers.d" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_configs_of_a_stack_of_layers_are_merged_as_overlayfs_shows_them(tmp_path: Path) -> None:
    lower = layer(tmp_path / "lower", {"a.conf": "u alpha 2001\n", "b.conf": "u beta 2002\n", "x.txt": ""})
    upper = layer(tmp_path / "upper", {"a.conf": "u alpha 3001\n"})
    os.mknod(upper / "usr/lib/sysusers.d/b.conf", 0o600 | 0o020000, os.makedev(0, 0))  # a whiteout
    (upper / "usr/lib/sysusers.d/c.conf").symlink_to("/dev/null")  # a mask: nothing to copy
    found = sysusers_configs([upper, lower])
    assert found == {"a.conf": upper / "usr/lib/sysusers.d/a.conf"}
    assert sysusers_configs([tmp_path / "empty"]) == {}


@needs_sysusers
def test_accounts_are_what_sysusers_makes_on_an_empty_etc(tmp_path: Path) -> None:
    """Users with fixed ids and one allocated from the top of the system range, as osbuild's build root
    gets them; nothing of the host's own /etc/passwd."""
    root = layer(tmp_path / "root", {"basic.conf": "g root 0\nu root 0 - /root\ng users 100\n",
                                     "svc.conf": "u svc - \"a service\"\n"})
    (tmp_path / "scratch").mkdir()
    accounts = anyio.run(make_accounts, [root], tmp_path / "scratch")
    assert accounts is not None
    users = {line.split(":")[0]: line.split(":")[2] for line in accounts.passwd.decode().splitlines()}
    groups = {line.split(":")[0]: line.split(":")[2] for line in accounts.group.decode().splitlines()}
    assert users == {"root": "0", "svc": "999"}
    assert groups == {"root": "0", "users": "100", "svc": "999"}
    assert os.listdir(tmp_path / "scratch") == []
    assert anyio.run(make_accounts, [tmp_path / "nothing"], tmp_path / "scratch") is None
