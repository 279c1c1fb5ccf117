"""Reading the host's apt sources, one-line and deb822, and choosing the repositories for a suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from aosbuild.aptsources import (
    AptSourcesError,
    Repository,
    choose,
    host_repositories,
    parse_deb822,
    parse_entry,
    parse_one_line,
)

# not real addresses: `.invalid` never resolves
MIRROR = "http://mirror.invalid/debian"
SECURITY = "http://security.invalid/debian-security"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

INLINE_KEY = """\
Types: deb
URIs: http://inline.invalid/repo
Suites: stable
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mQINBFake
 -----END PGP PUBLIC KEY BLOCK-----
"""


def write_etc(root: Path, files: dict[str, str]) -> Path:
    etc = root / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (etc / name).write_text(text)
    return etc


def test_one_line_entries_with_options_and_comments() -> None:
    text = f"""
# a comment
deb-src {MIRROR} bookworm main
deb [arch=amd64 signed-by={KEYRING}] {MIRROR} bookworm main contrib  # trailing comment
deb [trusted=yes] http://local.invalid/repo ./
"""
    first, flat = list(parse_one_line(text))
    assert first == Repository(uri=MIRROR, suites=("bookworm",), components=("main", "contrib"), signed_by=KEYRING)
    assert flat == Repository(uri="http://local.invalid/repo", suites=("./",), components=(), trusted=True)


@pytest.mark.parametrize("line", ["deb", f"deb {MIRROR}", f"deb {MIRROR} bookworm", "deb [arch=amd64 x",
                                  f"rpm {MIRROR} bookworm main", f"deb [novalue] {MIRROR} bookworm main"])
def test_one_line_errors_name_the_line(line: str) -> None:
    with pytest.raises(AptSourcesError, match=r"^f.list:2: "):
        list(parse_one_line(f"# first\n{line}\n", "f.list"))


def test_deb822_paragraphs_one_entry_per_uri_and_suite() -> None:
    text = f"""Types: deb deb-src
URIs: {MIRROR}
# a comment inside the paragraph
Suites: bookworm bookworm-updates
Components: main
Signed-By: {KEYRING}

Types: deb-src
URIs: {MIRROR}
Suites: bookworm
Components: main

Enabled: no
Types: deb
URIs: http://disabled.invalid/debian
Suites: bookworm
Components: main

types: deb
uris: {SECURITY}
suites: bookworm-security
components: main non-free-firmware
"""
    entries = list(parse_deb822(text))
    assert [(e.uri, e.suites, e.components) for e in entries] == [
        (MIRROR, ("bookworm",), ("main",)),
        (MIRROR, ("bookworm-updates",), ("main",)),
        (SECURITY, ("bookworm-security",), ("main", "non-free-firmware")),
    ]
    assert entries[0].signed_by == KEYRING
    assert entries[2].signed_by is None


def test_deb822_inline_key_survives_a_round_trip() -> None:
    (entry,) = parse_deb822(INLINE_KEY)
    assert entry.signed_by is not None
    assert entry.signed_by.strip().splitlines() == ["-----BEGIN PGP PUBLIC KEY BLOCK-----", "", "mQINBFake",
                                                    "-----END PGP PUBLIC KEY BLOCK-----"]
    (again,) = parse_deb822(entry.deb822())
    assert again.signed_by is not None
    assert again.signed_by.strip() == entry.signed_by.strip()


def test_written_sources_name_a_keyring_unless_trusted(tmp_path: Path) -> None:
    keyring = tmp_path / "keyring.gpg"
    keyring.write_bytes(b"")
    plain = Repository(uri=MIRROR, suites=("bookworm",), components=("main",))
    assert f"Signed-By: {keyring}" in plain.deb822(default_keyring=keyring)
    assert "Signed-By" not in plain.deb822(default_keyring=tmp_path / "missing.gpg")
    trusted = Repository(uri=MIRROR, suites=("bookworm",), components=("main",), trusted=True)
    assert "Trusted: yes" in trusted.deb822(default_keyring=keyring)
    assert list(parse_deb822(plain.deb822(default_keyring=keyring))) == [
        Repository(uri=MIRROR, suites=("bookworm",), components=("main",), signed_by=str(keyring))]


def test_repo_argument_syntax() -> None:
    assert parse_entry(f"[signed-by=/k.gpg] {MIRROR} trixie main contrib") == Repository(
        uri=MIRROR, suites=("trixie",), components=("main", "contrib"), signed_by="/k.gpg")


def test_host_files_in_apt_order(tmp_path: Path) -> None:
    etc = write_etc(tmp_path, {
        "sources.list": "deb http://first.invalid/debian bookworm main\n",
        "sources.list.d/b.list": "deb http://third.invalid/debian bookworm main\n",
        "sources.list.d/a.sources": "Types: deb\nURIs: http://second.invalid/debian\nSuites: bookworm\n"
                                    "Components: main\n",
        "sources.list.d/c.list.disabled": "deb http://ignored.invalid/debian bookworm main\n",
        "sources.list.d/d.save": "deb http://ignored.invalid/debian bookworm main\n",
    })
    assert [r.uri for r in host_repositories(etc)] == [
        "http://first.invalid/debian", "http://second.invalid/debian", "http://third.invalid/debian"]


def test_choose_takes_the_first_entry_for_the_suite_and_its_updates(tmp_path: Path) -> None:
    etc = write_etc(tmp_path, {"sources.list.d/debian.sources": f"""Types: deb
URIs: {MIRROR}
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: {KEYRING}

Types: deb
URIs: {SECURITY}
Suites: bookworm-security
Components: main
Signed-By: {KEYRING}
""", "sources.list.d/z.list": "deb http://later.invalid/debian bookworm main\n"})
    chosen = choose("bookworm", ("main",), apt_etc=etc)
    assert [(r.uri, r.suites, r.components, r.signed_by) for r in chosen] == [
        (MIRROR, ("bookworm",), ("main",), KEYRING),
        (MIRROR, ("bookworm-updates",), ("main",), KEYRING),
        (SECURITY, ("bookworm-security",), ("main",), KEYRING),
    ]
    assert [r.suites for r in choose("bookworm", ("main",), updates=False, apt_etc=etc)] == [("bookworm",)]


def test_choose_another_suite_falls_back_to_the_debian_mirror_with_a_warning(tmp_path: Path) -> None:
    etc = write_etc(tmp_path, {"sources.list": f"deb {SECURITY} bookworm-security main\n"
                                               "deb http://example.invalid/apt stable main\n"
                                               f"deb {MIRROR} bookworm main\n"})
    warnings: list[str] = []
    (chosen,) = choose("trixie", ("main",), apt_etc=etc, warnings=warnings)
    assert (chosen.uri, chosen.suites) == (MIRROR, ("trixie",))
    assert "no apt source for trixie" in warnings[0]


def test_choose_without_any_entry_asks_for_a_mirror(tmp_path: Path) -> None:
    etc = write_etc(tmp_path, {"sources.list": "deb http://example.invalid/apt stable main\n"})
    with pytest.raises(AptSourcesError, match="--mirror"):
        choose("bookworm", ("main",), apt_etc=etc)
    (chosen,) = choose("bookworm", ("main", "contrib"), mirror=MIRROR, apt_etc=etc)
    assert chosen == Repository(uri=MIRROR, suites=("bookworm",), components=("main", "contrib"))


def test_the_hosts_own_sources_parse() -> None:
    # whatever this machine has, it must be readable; depsolving needs a Debian entry on CI hosts
    repositories = host_repositories()
    assert all(r.uri and r.suites for r in repositories)
