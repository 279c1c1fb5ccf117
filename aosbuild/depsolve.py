"""Debian depsolving: a package list resolved by apt's own solver into pinned `org.osbuild.curl` items.

apt runs in a private root of its own (`APT_CONFIG` pointing at a config that moves every `Dir` into it,
an empty dpkg status, no locks), never in the host's apt state. The root is kept in a cache directory
keyed by repositories and architecture, so its package indices are reused between runs and fetched again
only when they are a day old or a refresh is asked for.

Resolving is two apt calls on the same cache: `apt-get install --simulate` gives the packages in the
order apt's package manager would unpack them into an empty system (dependencies and Pre-Depends first,
as far as cycles allow), and `apt-get install --print-uris` gives each one's URL, size and SHA256 as the
signed indices state them.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

import anyio

from . import aptsources, process
from .aptsources import HOST_APT_ETC, Repository
from .errors import AosbuildError
from .signals import Interrupted, run_until_signalled

# what each variant adds to the named packages, as apt patterns; mmdebstrap's variants of the same names
VARIANTS: dict[str, tuple[str, ...]] = {
    "custom": (),
    "essential": ("?essential",),
    "apt": ("?essential", "apt"),
    "minbase": ("?essential", "?priority(required)"),
    "required": ("?essential", "?priority(required)"),
    "important": ("?essential", "?priority(required)", "?priority(important)"),
    "standard": ("?essential", "?priority(required)", "?priority(important)", "?priority(standard)"),
}
FORMATS = ("both", "items", "packages")
MAX_INDEX_AGE = 24 * 3600.0
# bump when the private apt.conf changes meaning, so roots made by older versions are not reused
ROOT_LAYOUT = "1"
INST = re.compile(r"^Inst (?P<name>[^\s:]+)(?::\S+)? (?:\[\S+\] )?\((?P<version>\S+) .*\[(?P<arch>[^\]]+)\]\)")
URI_LINE = re.compile(r"^'(?P<url>[^']+)' (?P<file>\S+) (?P<size>\d+) (?P<hash>\S+)$")
T = TypeVar("T")
R = TypeVar("R")
APT_PROGRESS = ("Reading package lists...", "Building dependency tree...", "Reading state information...")


class DepsolveError(AosbuildError):
    """apt could not update its indices or resolve the package set; `output` is apt's own explanation."""

    def __init__(self, message: str, output: str = "") -> None:
        self.output = output
        super().__init__(message)


@dataclass(frozen=True, slots=True, kw_only=True)
class DepsolveRequest:
    packages: tuple[str, ...]
    suite: str = "bookworm"
    architecture: str | None = None  # None: the host's dpkg architecture
    variant: str = "minbase"
    components: tuple[str, ...] = ("main",)
    mirror: str | None = None  # None: the host's apt sources
    mirror_trusted: bool = False  # the mirror's signatures are not checked (apt's trusted=yes)
    repositories: tuple[Repository, ...] = ()  # extra repositories, after the mirror's
    updates: bool = True  # also the host's <suite>-updates and <suite>-security entries
    recommends: bool = False
    cache: Path | None = None  # None: default_cache()
    refresh: bool = False  # fetch the indices again even when they are less than a day old
    apt_etc: Path = HOST_APT_ETC  # where the host's apt sources are read from


@dataclass(frozen=True, slots=True, kw_only=True)
class Package:
    name: str
    version: str
    architecture: str
    checksum: str
    url: str
    size: int

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "architecture": self.architecture,
                "checksum": self.checksum, "url": self.url, "size": self.size}


@dataclass(frozen=True, slots=True, kw_only=True)
class DepsolveResult:
    packages: tuple[Package, ...]  # in installation order
    repositories: tuple[Repository, ...]
    architecture: str
    warnings: tuple[str, ...] = ()

    def sources(self) -> dict[str, Any]:
        """The manifest's `sources` for these packages."""
        return {"org.osbuild.curl": {"items": {p.checksum: p.url for p in self.packages}}}

    def as_json(self, format: str = "both") -> dict[str, Any]:
        document: dict[str, Any] = {}
        if format in ("both", "items"):
            document["sources"] = self.sources()
        if format in ("both", "packages"):
            document["packages"] = [p.as_json() for p in self.packages]
        return document


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aosbuild" / "depsolve"


@dataclass(frozen=True, slots=True, kw_only=True)
class AptRoot:
    """A private apt root inside the cache: its own etc/apt, lists, dpkg status and package cache."""

    path: Path
    architecture: str
    repositories: tuple[Repository, ...]

    @property
    def root(self) -> Path:
        return self.path / "root"

    @property
    def config(self) -> Path:
        return self.root / "etc" / "apt" / "apt.conf"

    @property
    def lists(self) -> Path:
        return self.root / "var" / "lib" / "apt" / "lists"

    @property
    def stamp(self) -> Path:
        return self.path / "updated"

    def env(self) -> dict[str, str]:
        return {**os.environ, "APT_CONFIG": os.fspath(self.config), "LC_ALL": "C.UTF-8"}

    def apt_conf(self) -> str:
        root = os.fspath(self.root)
        lines = [
            f'Dir "{root}/";',  # every relative Dir:: below it, etc/apt and apt.conf.d included
            f'Dir::State::status "{root}/var/lib/dpkg/status";',
            'Debug::NoLocking "true";',
            f'APT::Architecture "{self.architecture}";',
            f'APT::Architectures {{ "{self.architecture}"; }};',
            'Acquire::Languages "none";',
            'Acquire::Retries "3";',
            'Dir::Cache::srcpkgcache "";',  # nothing is ever installed here: pkgcache.bin alone is enough
            # apt counts itself as essential unless told not to; ?essential means `Essential: yes` only
            'pkgCacheGen::ForceEssential ",";',
        ]
        if os.geteuid() == 0 and not _world_traversable(self.path):
            # apt would fall back to downloading as root anyway, with a warning on every update
            lines.append('APT::Sandbox::User "root";')
        return "\n".join(lines) + "\n"

    def create(self) -> None:
        for sub in ("etc/apt/apt.conf.d", "etc/apt/preferences.d", "etc/apt/trusted.gpg.d",
                    "etc/apt/sources.list.d", "var/lib/apt/lists/partial", "var/lib/dpkg",
                    "var/cache/apt/archives/partial", "var/log/apt"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        _write_if_changed(self.config, self.apt_conf())
        _write_if_changed(self.root / "etc/apt/sources.list.d/aosbuild.sources",
                          aptsources.sources_file(self.repositories))
        status = self.root / "var/lib/dpkg/status"
        if not status.exists():
            status.write_text("")

    def is_fresh(self, max_age: float = MAX_INDEX_AGE) -> bool:
        try:
            return time.time() - self.stamp.stat().st_mtime < max_age
        except FileNotFoundError:
            return False


def root_key(repositories: Sequence[Repository], architecture: str) -> str:
    text = "\n".join([ROOT_LAYOUT, architecture, aptsources.sources_file(repositories)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _world_traversable(path: Path) -> bool:
    for directory in [path, *path.parents]:
        try:
            if not directory.stat().st_mode & 0o001:
                return False
        except FileNotFoundError:
            continue
    return True


def _write_if_changed(path: Path, text: str) -> None:
    # rewriting identical files would only change their mtime and make apt rebuild its cache
    try:
        if path.read_text() == text:
            return
    except FileNotFoundError:
        pass
    path.write_text(text)


@asynccontextmanager
async def open_apt_root(cache: Path, repositories: Sequence[Repository],
                        architecture: str) -> AsyncIterator[AptRoot]:
    """The cached apt root for these repositories and architecture, created if needed and locked for us.

    The lock (flock on a file beside the root) lets concurrent depsolves share one cache; apt's own
    locks are off, since nothing else uses the root.
    """
    suite = re.sub(r"[^A-Za-z0-9.+-]", "_", repositories[0].suites[0]) if repositories else "none"
    path = cache / f"{suite}-{architecture}-{root_key(repositories, architecture)}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise DepsolveError(f"cannot use the depsolve cache {cache}: {exc.strerror}; "
                            "choose another with --cache DIR") from None
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                await anyio.sleep(0.1)  # another depsolve is updating this root; it takes seconds
        root = AptRoot(path=path, architecture=architecture, repositories=tuple(repositories))
        root.create()
        yield root
    finally:
        os.close(fd)


async def update(root: AptRoot, *, refresh: bool = False, warnings: list[str] | None = None) -> bool:
    """Fetch the package indices unless they are fresh; True if apt-get update ran."""
    if root.is_fresh() and not refresh:
        return False
    try:
        await process.run(["apt-get", "update", "-q", "--error-on=any"], env=root.env())
    except process.CommandError as exc:
        output = apt_explanation(exc.output)
        if root.stamp.exists() and not refresh:
            if warnings is not None:
                warnings.append(f"could not refresh the package indices, using the ones from "
                                f"{time.ctime(root.stamp.stat().st_mtime)}:\n{output}")
            return False
        raise DepsolveError(f"apt-get update failed (apt's messages below): {update_hint(output)}", output) from None
    root.stamp.touch()
    return True


# what apt says when it cannot check a repository's signature
UNSIGNED = ("is not signed", "NO_PUBKEY", "couldn't be verified")


def update_hint(output: str) -> str:
    """What to do about a failed `apt-get update`, from what apt said."""
    if any(text in output for text in UNSIGNED):
        return ("a repository's signature could not be checked: give its key with [signed-by=KEYRING] in its "
                "entry or, for an unsigned repository of your own, trust it with --mirror-trusted (or "
                "[trusted=yes] in its --repo entry or apt source)")
    return "check the repositories' URLs and suites and that they can be reached, then run it again"


def targets(request: DepsolveRequest) -> list[str]:
    return [*VARIANTS[request.variant], *request.packages]


async def resolve(root: AptRoot, names: Sequence[str], *, recommends: bool = False) -> tuple[Package, ...]:
    """Resolve `names` (packages or apt patterns) into every package an empty system needs, in order."""
    options = ["-o", f"APT::Install-Recommends={'true' if recommends else 'false'}",
               "-o", "APT::Install-Suggests=false"]
    commands = {"order": ["apt-get", "install", "--simulate", "-q", *options, "--", *names],
                "uris": ["apt-get", "install", "--print-uris", "-qq", "-o", "Acquire::ForceHash=SHA256",
                         *options, "--", *names]}
    outputs: dict[str, str] = {}
    failures: dict[str, process.CommandError] = {}

    async def run(key: str) -> None:
        try:
            outputs[key] = await process.run(commands[key], env=root.env())
        except process.CommandError as exc:
            failures[key] = exc

    # both solve the same problem, a second or two each; apt writes its cache file atomically
    async with anyio.create_task_group() as tg:
        for key in commands:
            tg.start_soon(run, key)
    if failures:
        failed = failures.get("order") or failures["uris"]  # --simulate's output explains the most
        raise DepsolveError("apt cannot resolve the package set (apt's explanation below): check the package "
                            "names, the suite and the repositories that should carry them",
                            apt_explanation(failed.output))
    return combine(outputs["order"], outputs["uris"])


def combine(simulated: str, uris: str) -> tuple[Package, ...]:
    """Join apt's install order (`--simulate`) with its download list (`--print-uris`)."""
    downloads: dict[tuple[str, str, str], tuple[str, int, str]] = {}
    for line in uris.splitlines():
        m = URI_LINE.match(line)
        if m is None:
            continue
        name, quoted_version, arch = m["file"].removesuffix(".deb").split("_")
        algorithm, _, digest = m["hash"].partition(":")
        downloads[(name, unquote(quoted_version), arch)] = (m["url"], int(m["size"]),
                                                            f"{algorithm.lower()}:{digest}")
    packages = []
    for line in simulated.splitlines():
        m = INST.match(line)
        if m is None:
            continue
        key = (m["name"], m["version"], m["arch"])
        if key not in downloads:
            raise DepsolveError(f"apt did not give a download for {'_'.join(key)}: its package indices may be "
                                "inconsistent; run again with --refresh", uris)
        url, size, checksum = downloads[key]
        packages.append(Package(name=key[0], version=key[1], architecture=key[2], checksum=checksum, url=url,
                                size=size))
    return tuple(packages)


def apt_explanation(output: str) -> str:
    """apt's output without its progress lines: what it says went wrong."""
    lines = [line for line in output.splitlines() if line.strip() and line.strip() not in APT_PROGRESS]
    return "\n".join(lines)


async def host_architecture() -> str:
    return (await process.run(["dpkg", "--print-architecture"])).strip()


async def depsolve(request: DepsolveRequest) -> DepsolveResult:
    """Resolve the request's package set with apt against its repositories, in a cached private root."""
    if request.variant not in VARIANTS:
        raise DepsolveError(f"unknown variant '{request.variant}'; choose one of {', '.join(VARIANTS)}")
    if not request.packages and not VARIANTS[request.variant]:
        raise DepsolveError(f"variant '{request.variant}' needs at least one package: name the packages")
    architecture = request.architecture or await host_architecture()
    warnings: list[str] = []
    repositories = (*aptsources.choose(request.suite, request.components, mirror=request.mirror,
                                       mirror_trusted=request.mirror_trusted, updates=request.updates,
                                       apt_etc=request.apt_etc, warnings=warnings),
                    *request.repositories)
    async with open_apt_root(request.cache or default_cache(), repositories, architecture) as root:
        await update(root, refresh=request.refresh, warnings=warnings)
        packages = await resolve(root, targets(request), recommends=request.recommends)
    return DepsolveResult(packages=packages, repositories=repositories, architecture=architecture,
                          warnings=tuple(warnings))


def parser(prog: str = "aosbuild depsolve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Resolve Debian packages with apt into pinned org.osbuild.curl sources (JSON).",
        epilog="The mirror comes from the host's apt sources (the first 'deb' entry for the suite, plus its "
               "-updates and -security entries) unless --mirror is given. On Debian 12, naming usr-is-merged "
               "keeps usrmerge and perl out of the set when the tree is merged-/usr before the install.")
    p.add_argument("packages", nargs="*", metavar="PACKAGE", help="packages (or apt patterns) to install")
    p.add_argument("--suite", default="bookworm", help="Debian suite (default: bookworm)")
    p.add_argument("--arch", "--architecture", dest="architecture", help="dpkg architecture (default: the host's)")
    p.add_argument("--variant", choices=list(VARIANTS), default="minbase",
                   help="what comes with the named packages, as in mmdebstrap: custom (only they and their "
                        "dependencies), essential (Essential: yes), apt, minbase (= required: Essential and "
                        "Priority: required; the default), important, standard")
    add_repository_arguments(p)
    p.add_argument("--components", default="main", metavar="LIST",
                   help="archive components, comma-separated (default: main)")
    p.add_argument("--recommends", action="store_true", help="also install Recommends")
    p.add_argument("--format", choices=FORMATS, default="both",
                   help="print the manifest sources (items), the ordered package list (packages), or both")
    p.add_argument("--backend", choices=("trio", "asyncio"), default="trio", help=argparse.SUPPRESS)
    return p


def add_repository_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that say where packages come from and how indices are cached: `aosbuild depsolve`'s,
    and `aosbuild sample debian`'s, which depsolves too."""
    p.add_argument("--mirror", metavar="URL", help="Debian mirror to use instead of the host's apt sources")
    p.add_argument("--mirror-trusted", action="store_true",
                   help="do not check the signatures of --mirror (apt's trusted=yes), for an unsigned local "
                        "repository you made")
    p.add_argument("--apt-sources", type=Path, default=HOST_APT_ETC, metavar="DIR",
                   help="the apt configuration directory whose sources.list and sources.list.d/ give the "
                        f"mirror (default: {HOST_APT_ETC})")
    p.add_argument("--repo", action="append", default=[], metavar="REPO",
                   help="an extra repository: '[OPTIONS] URL SUITE COMPONENT...', a sources.list line without "
                        "'deb' (e.g. '[signed-by=/path/key.gpg] URL SUITE main', '[trusted=yes] URL SUITE main' "
                        "for an unsigned one); repeatable")
    p.add_argument("--no-updates", dest="updates", action="store_false",
                   help="leave out the host's <suite>-updates and <suite>-security entries")
    p.add_argument("--cache", type=Path, metavar="DIR",
                   help=f"where the apt roots with their package indices live (default: {default_cache()})")
    p.add_argument("--refresh", action="store_true",
                   help="fetch the package indices again (otherwise at most once a day)")


def repository_request(args: argparse.Namespace, **fields: Any) -> DepsolveRequest:
    """A request with `add_repository_arguments`' flags and `fields`; ValueError for flags that cannot be
    right."""
    if args.mirror is not None and not re.match(r"^[a-z][a-z0-9+]*:", args.mirror):
        raise ValueError(f"--mirror: '{args.mirror}' is not a URL; give the mirror's base URL "
                         "(http://..., https://... or file:/...)")
    if args.mirror_trusted and args.mirror is None:
        raise ValueError("--mirror-trusted needs --mirror URL; for other repositories write [trusted=yes] "
                         "in their entry")
    try:
        extra = tuple(aptsources.parse_entry(text, "--repo") for text in args.repo)
    except aptsources.AptSourcesError as exc:
        raise ValueError(str(exc)) from None
    return DepsolveRequest(mirror=args.mirror, mirror_trusted=args.mirror_trusted, repositories=extra,
                           updates=args.updates, cache=args.cache, refresh=args.refresh, apt_etc=args.apt_sources,
                           **fields)


def request_from(args: argparse.Namespace) -> DepsolveRequest:
    """The request the arguments describe; ValueError for arguments that cannot be right."""
    components = tuple(c for c in re.split(r"[,\s]+", args.components) if c)
    if not components:
        raise ValueError("--components needs at least one component")
    if not args.packages and not VARIANTS[args.variant]:
        raise ValueError(f"--variant {args.variant} needs at least one PACKAGE")
    if any(name.startswith("-") for name in args.packages):
        raise ValueError("package names cannot start with '-'")
    return repository_request(args, packages=tuple(args.packages), suite=args.suite,
                              architecture=args.architecture, variant=args.variant, components=components,
                              recommends=args.recommends)


def run_command(work: Callable[[], Awaitable[T]], backend: str = "trio") -> T | int:
    """Run a command's depsolving until it ends or a signal stops it: its result, or, having said why on
    stderr (an error, then apt's own explanation), the exit code."""
    try:
        return anyio.run(run_until_signalled, work, backend=backend)
    except Interrupted as exc:
        sys.stderr.write("Aborted\n")
        return exc.exit_code
    except AosbuildError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        if isinstance(exc, DepsolveError) and exc.output:
            sys.stderr.write(exc.output.rstrip("\n") + "\n")
        return exc.exit_code


def parse_checked(p: argparse.ArgumentParser, argv: list[str],
                  check: Callable[[argparse.Namespace], R]) -> tuple[argparse.Namespace, R] | None:
    """The arguments and what `check` makes of them; None, with the usage and the error printed as
    argparse prints its own (exit 2), when `check` finds them wrong (ValueError)."""
    args = p.parse_args(argv)
    try:
        return args, check(args)
    except ValueError as exc:
        p.print_usage(sys.stderr)
        sys.stderr.write(f"{p.prog}: error: {exc}\n")
        return None


def main(argv: list[str]) -> int:
    parsed = parse_checked(parser(), argv, request_from)
    if parsed is None:
        return 2
    args, request = parsed
    result = run_command(functools.partial(depsolve, request), backend=args.backend)
    if isinstance(result, int):
        return result
    for warning in result.warnings:
        sys.stderr.write(f"Warning: {warning}\n")
    sys.stdout.write(json.dumps(result.as_json(args.format), indent=2) + "\n")
    return 0
