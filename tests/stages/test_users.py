"""org.osbuild.users: useradd/usermod --root on a Debian-like /etc, homes, SSH keys and their owners."""

from __future__ import annotations

import stat
from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .accounts import debian_etc, entries, skel_names
from .treediff import Node, assert_invalid, assert_refused, build_ab, export

HASH = "$6$saltsalt$W4vYD1Sz3jS5k9N3xZLZ1mY1bC8zJ3bJqN0t3m8nZ1u7Y1pZ6WcN6o4qz5bVQ2xLz0y1n2m3b4v5c6x7z8a9b0"
KEY1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop"
KEY2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA1bcDefGhIjKlMnOpQrStUvWxYz0123456789abcdefgh alice@phone"


def users(**accounts: dict[str, Any]) -> dict[str, Any]:
    return stage("org.osbuild.users", users=accounts)


def test_adds_a_user_with_everything(aosbuild: Aosbuild) -> None:
    alice = {"uid": 1500, "gid": 100, "groups": ["sudo", "adm"], "description": "Alice Example",
             "home": "/srv/alice", "shell": "/bin/bash", "password": HASH, "keys": [KEY2], "key": KEY1,
             "expiredate": 20000}
    changes = build_ab(aosbuild, [debian_etc()], users(alice=alice))
    b = aosbuild.output / "b"
    assert entries(b, "passwd")["alice"] == ["alice", "x", "1500", "100", "Alice Example", "/srv/alice", "/bin/bash"]
    shadow = entries(b, "shadow")["alice"]
    assert (shadow[1], shadow[7]) == (HASH, "20000")
    group = entries(b, "group")
    assert "alice" in group["sudo"][3].split(",")
    assert "alice" in group["adm"][3].split(",")
    assert "alice" not in group  # the primary group is the one given
    # the home, from /etc/skel, and the keys, all the user's: 1500:100
    home = {path: node for path, node in changes.added.items() if path.startswith("srv")}
    assert set(home) == {"srv", "srv/alice", "srv/alice/.ssh", "srv/alice/.ssh/authorized_keys",
                         *(f"srv/alice/{name}" for name in skel_names())}
    assert all((node.uid, node.gid) == (1500, 100) for path, node in home.items() if path != "srv")
    assert home["srv/alice/.ssh"].mode == 0o700
    assert home["srv/alice/.ssh/authorized_keys"].mode == 0o600
    assert (b / "srv/alice/.ssh/authorized_keys").read_text() == f"{KEY2}\n{KEY1}\n"


def test_a_plain_user_gets_debians_defaults(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, [debian_etc()], users(bob={}))
    b = aosbuild.output / "b"
    bob = entries(b, "passwd")["bob"]
    assert entries(b, "group")["bob"][2] == bob[3]  # USERGROUPS_ENAB: a group of its own
    assert bob[5:] == ["/home/bob", "/bin/sh"]  # from Debian's /etc/default/useradd
    assert entries(b, "shadow")["bob"][1] == "!"  # no password: locked
    assert changes.added["home/bob"].kind == "dir"
    assert changes.added["home/bob"].uid == int(bob[2])


def test_no_home(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, [debian_etc()], users(svc={"home": "", "shell": "/usr/sbin/nologin"}))
    assert not any(path.startswith("home") for path in changes.added)


def test_modifies_an_existing_user_and_makes_the_missing_home(aosbuild: Aosbuild) -> None:
    base = [debian_etc(), users(carol={"uid": 1600, "home": ""})]
    changes = build_ab(aosbuild, base, users(carol={"uid": 1600, "description": "Carol", "password": HASH,
                                                    "key": KEY1, "force_password_reset": True}))
    b = aosbuild.output / "b"
    assert entries(b, "passwd")["carol"][4] == "Carol"
    shadow = entries(b, "shadow")["carol"]
    assert (shadow[1], shadow[2]) == (HASH, "0")  # last change on day 0: must be changed at the next login
    assert changes.added["home/carol"] == Node("dir", 0o755, uid=1600, gid=1600)
    assert (b / "home/carol/.ssh/authorized_keys").read_text() == f"{KEY1}\n"


def test_keys_are_appended(aosbuild: Aosbuild) -> None:
    base = [debian_etc(), users(dave={"uid": 1700, "key": KEY1})]
    changes = build_ab(aosbuild, base, users(dave={"keys": [KEY2]}))
    assert list(changes.changed) == ["home/dave/.ssh/authorized_keys"]
    path = aosbuild.output / "b" / "home/dave/.ssh/authorized_keys"
    assert path.read_text() == f"{KEY1}\n{KEY2}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_changing_the_uid_of_an_existing_user_fails(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", debian_etc(), users(root={"uid": 5}))))
    assert result.returncode == 1
    assert "can't set uid of existing user 'root' (0) to 5" in result.stderr


def test_unknown_group_fails(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", debian_etc(), users(erin={"groups": ["nosuchgroup"]}))))
    assert result.returncode == 1
    assert "group 'nosuchgroup' does not exist" in result.stdout + result.stderr


def test_home_outside_the_tree_is_refused(aosbuild: Aosbuild) -> None:
    # useradd takes the home inside its chroot; the keys are written by the stage, which must refuse it
    bad = users(mallory={"home": "/../../../escaped", "key": KEY1})
    result = export(aosbuild, manifest(pipeline("p", debian_etc(), bad)), "p")
    assert_refused(aosbuild, result, "escaped")


@pytest.mark.parametrize(("user", "where", "message"), [
    ({"uid": "1000"}, ".users.u.uid", "'1000' is not of type 'number'"),
    ({"expiredate": "2030-01-01"}, ".users.u.expiredate", "'2030-01-01' is not of type 'integer'"),
])
def test_bad_options(aosbuild: Aosbuild, user: dict[str, Any], where: str, message: str) -> None:
    result = aosbuild(manifest(pipeline("p", users(u=user))))
    assert_invalid(result, ".pipelines[0].stages[0].options" + where, message)
