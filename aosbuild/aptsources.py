"""apt repositories: reading the host's apt sources (one-line and deb822) and writing them for a private root.

The mirror aosbuild depsolves against is the host's own: the first `deb` entry for the suite, in the order
apt reads its sources (`sources.list`, then `sources.list.d/*.list` and `*.sources` by name). Nothing here
knows a mirror address; only the host's configuration or the command line supplies one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import AosbuildError

HOST_APT_ETC = Path("/etc/apt")
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


class AptSourcesError(AosbuildError):
    """An apt source entry cannot be understood, or none fits the request."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Repository:
    """One apt repository: a base URI, its suites and components, and how its signatures are checked."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None  # a keyring path, or an inline armored key as deb822 allows
    trusted: bool = False  # apt's `trusted=yes`: no signature check (local test repositories)

    def deb822(self, default_keyring: Path | None = DEBIAN_KEYRING) -> str:
        """This repository as a paragraph of apt's deb822 `.sources` format."""
        lines = ["Types: deb", f"URIs: {self.uri}", f"Suites: {' '.join(self.suites)}",
                 f"Components: {' '.join(self.components)}"]
        if self.trusted:
            lines.append("Trusted: yes")
        elif self.signed_by is not None:
            key_lines = self.signed_by.strip().splitlines()
            lines.append("Signed-By: " + "\n ".join(line if line.strip() else "." for line in key_lines))
        elif default_keyring is not None and default_keyring.exists():
            lines.append(f"Signed-By: {default_keyring}")
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, object]:
        return {"uri": self.uri, "suites": list(self.suites), "components": list(self.components)}


def parse_one_line(text: str, origin: str = "<string>") -> Iterator[Repository]:
    """The entries of a one-line `sources.list` file: `deb [opt=val ...] URI SUITE [COMPONENT ...]`."""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        if kind == "deb-src":
            continue
        if kind != "deb":
            raise AptSourcesError(f"{origin}:{number}: expected 'deb' or 'deb-src', found '{kind}'; fix the "
                                  "line (sources.list(5))")
        yield parse_entry(rest, f"{origin}:{number}")


def parse_entry(text: str, origin: str = "<string>") -> Repository:
    """`[opt=val ...] URI SUITE [COMPONENT ...]`: a one-line entry after its type; also `--repo`'s syntax."""
    options: dict[str, str] = {}
    text = text.strip()
    if text.startswith("["):
        block, sep, text = text[1:].partition("]")
        if not sep:
            raise AptSourcesError(f"{origin}: unclosed '[' in the options: close it, as in "
                                  "'[trusted=yes] URL SUITE main'")
        for option in block.split():
            key, eq, value = option.partition("=")
            if not eq:
                raise AptSourcesError(f"{origin}: option '{option}' is not key=value: write it as "
                                      "signed-by=KEYRING or trusted=yes")
            options[key.lower().rstrip("+-")] = value
    words = text.split()
    if len(words) < 2:
        raise AptSourcesError(f"{origin}: expected 'URI SUITE [COMPONENT ...]', found '{text}'; give all "
                              "three, as in 'http://127.0.0.1:8000/debian bookworm main'")
    uri, suite, *components = words
    if not suite.endswith("/") and not components:
        raise AptSourcesError(f"{origin}: suite '{suite}' needs at least one component: add one (main, say)")
    return Repository(uri=uri, suites=(suite,), components=tuple(components),
                      signed_by=options.get("signed-by"), trusted=options.get("trusted") == "yes")


def parse_deb822(text: str, origin: str = "<string>") -> Iterator[Repository]:
    """The entries of a deb822 `.sources` file, one per URI and suite, skipping disabled ones."""
    for fields in _paragraphs(text):
        if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
            continue
        suites = fields.get("suites", "").split()
        if not fields.get("uris") or not suites:
            raise AptSourcesError(f"{origin}: an entry needs URIs and Suites: add them, or `Enabled: no` to "
                                  "leave it out (sources.list(5))")
        for uri in fields["uris"].split():
            for suite in suites:
                yield Repository(uri=uri, suites=(suite,), components=tuple(fields.get("components", "").split()),
                                 signed_by=fields.get("signed-by"), trusted=fields.get("trusted") == "yes")


def _paragraphs(text: str) -> Iterator[dict[str, str]]:
    fields: dict[str, str] = {}
    key = None
    for raw in [*text.splitlines(), ""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if fields:
                yield fields
            fields, key = {}, None
        elif raw[0] in " \t" and key is not None:
            line = raw.strip()
            fields[key] += "\n" + ("" if line == "." else line)
        else:
            name, _, value = raw.partition(":")
            key = name.strip().lower()
            fields[key] = value.strip()


def host_repositories(apt_etc: Path = HOST_APT_ETC) -> list[Repository]:
    """Every `deb` entry of the host's apt configuration, in the order apt reads them."""
    files = [apt_etc / "sources.list"]
    parts = apt_etc / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    repositories: list[Repository] = []
    for path in files:
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        parse = parse_deb822 if path.suffix == ".sources" else parse_one_line
        repositories += parse(text, str(path))
    return repositories


def is_debian(repository: Repository) -> bool:
    """Looks like a Debian archive: signed with Debian's keys, or served from a path named debian."""
    if repository.signed_by is not None and "debian-archive" in repository.signed_by:
        return True
    return bool(re.search(r"/debian(-security)?/?$", repository.uri))


def choose(suite: str, components: tuple[str, ...], *, mirror: str | None = None, mirror_trusted: bool = False,
           updates: bool = True, apt_etc: Path = HOST_APT_ETC,
           warnings: list[str] | None = None) -> list[Repository]:
    """The repositories to depsolve `suite` against: `mirror` (unsigned if `mirror_trusted`, apt's
    `trusted=yes`), or the host's entries for it.

    From the host: the first `deb` entry whose suite is `suite` (else, with a warning, the first Debian
    entry for a plain release name, since Debian mirrors carry every suite), plus the first entries for
    `suite`-updates and `suite`-security when there are any and `updates` is true: a current Debian
    system is the release plus its point-release and security updates, as mmdebstrap sets it up.
    """
    if mirror is not None:
        return [Repository(uri=mirror, suites=(suite,), components=components, trusted=mirror_trusted)]
    host = host_repositories(apt_etc)
    by_suite: dict[str, Repository] = {}
    for repository in host:
        by_suite.setdefault(repository.suites[0], repository)
    main = by_suite.get(suite)
    if main is None:
        main = next((r for r in host if "-" not in r.suites[0] and is_debian(r)), None)
        if main is None:
            raise AptSourcesError(f"the host's apt sources in {apt_etc} have no 'deb' entry for {suite} and no "
                                  "Debian mirror to use for it; give one with --mirror URL")
        if warnings is not None:
            warnings.append(f"no apt source for {suite} on this host; using the mirror of its "
                            f"{main.suites[0]} entry, {main.uri}")
    chosen = [replace(main, suites=(suite,), components=components)]
    for suffix in ("-updates", "-security") if updates else ():
        extra = by_suite.get(suite + suffix)
        if extra is not None:
            chosen.append(replace(extra, components=components))
    return chosen


def sources_file(repositories: Iterable[Repository]) -> str:
    """A deb822 `.sources` file for the repositories, in order."""
    return "\n".join(r.deb822() for r in repositories)
