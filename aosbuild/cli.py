"""The command line: `aosbuild [OPTIONS] MANIFEST`, osbuild's flags and exit codes, or `aosbuild COMMAND ...`.

A build's flags become an `Invocation` (aosbuild/invocation.py) that `aosbuild.run.run()` carries out; the
exit codes are run()'s: 0 success, 1 a failed build or an impossible request, 2 an invalid manifest or
command line, 130 interrupted by SIGINT, 143 by SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import OSBUILD_VERSION, __version__
from .download import JOBS, PER_HOST, TIMEOUT, DownloadOptions
from .entry import guarded
from .invocation import Invocation
from .monitor import MONITORS
from .run import run
from .sizes import size_argument
from .store import KEEP


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def parser(prog: str = "aosbuild") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Build operating system images from manifests.")
    p.add_argument("manifest", metavar="MANIFEST", help="the manifest to build, or - for standard input")
    p.add_argument("--store", "--cache", dest="store", default=".osbuild", metavar="DIR",
                   help="the store for trees and sources (default: .osbuild)")
    p.add_argument("-l", "--libdir", action="append", default=[], metavar="DIR",
                   help="an extra library of stages, runners and schemas, searched before the bundled one")
    p.add_argument("--checkpoint", action="append", default=[], metavar="ID",
                   help="also keep the tree after matching stages (glob of pipeline names, stage ids, types)")
    p.add_argument("--export", action="append", default=[], metavar="ID",
                   help="pipeline name or id whose tree goes to the output directory")
    p.add_argument("--output-directory", type=Path, metavar="DIR", help="where exports go")
    p.add_argument("--inspect", action="store_true", help="print the manifest with its ids and exit")
    p.add_argument("--json", action="store_true", help="print the result as JSON (monitor defaults to null)")
    p.add_argument("--monitor", choices=sorted(MONITORS), metavar="NAME",
                   help="progress: live (the default on a terminal), log (elsewhere), jsonseq, null (osbuild's "
                   "class names work too)")
    p.add_argument("--monitor-fd", type=int, default=None, metavar="FD", help="where progress goes (stdout)")
    p.add_argument("--stage-timeout", type=float, metavar="SECONDS", help="fail a stage that takes longer")
    p.add_argument("--jobs", "-j", type=int, metavar="N",
                   help="pipelines built at the same time (default: the larger of 4 and the CPU count)")
    p.add_argument("--sources-only", action="store_true",
                   help="only download and verify the sources (those the --export pipelines need), build nothing")
    p.add_argument("--download-jobs", type=positive_int, default=JOBS, metavar="N",
                   help=f"downloads at the same time (default: {JOBS})")
    p.add_argument("--download-jobs-per-host", type=positive_int, default=PER_HOST, metavar="N",
                   help=f"downloads at the same time from one host (default: {PER_HOST})")
    p.add_argument("--download-timeout", type=positive_float, default=TIMEOUT, metavar="SECONDS",
                   help=f"retry a download when the server sends nothing for this long (default: {TIMEOUT:g})")
    p.add_argument("--cache-max-size", type=size_argument, default=KEEP, metavar="SIZE",
                   help="bound of the trees in the store, kept for later builds: bytes, kB, KiB, MB, MiB, GB, "
                        "GiB, TB, TiB or 'unlimited' (default: 20 GiB or half the store's filesystem)")
    p.add_argument("--cache-remote", action="append", default=None, metavar="REF",
                   help="an OCI registry repository (HOST[:PORT]/REPOSITORY) as the store's second tier: stages "
                        "are pulled from it instead of built, and pushed to it after a build; repeatable (the "
                        "first is pushed to, all are read); default: the store's (`aosbuild store remote`)")
    p.add_argument("--no-cache-remote", action="store_true",
                   help="use no remote cache, not even the store's own")
    p.add_argument("--cache-push", choices=("none", "pipelines", "all"), default=None,
                   help="what goes to the remote after a successful build: nothing, each pipeline's final "
                        "stage (default), or every stage")
    p.add_argument("--cache-remote-insecure", action="store_true",
                   help="plain HTTP to a registry that is not on loopback")
    p.add_argument("--cache-remote-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="a registry silent for this long is not used again in the build (default: 30)")
    p.add_argument("--dispatch", metavar="ADDRESS",
                   help="build the pipelines on the workers of this Dask scheduler (tls://HOST:PORT; needs "
                        "--cache-remote; see `aosbuild worker`)")
    p.add_argument("--dispatch-arch", metavar="ARCH",
                   help="the architecture the build roots need (default: this machine's, as `uname -m`)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("--backend", choices=("trio", "asyncio"), default="trio", help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="show engine events and tracebacks")
    p.add_argument("--version", action="version", version=f"aosbuild {__version__} (osbuild {OSBUILD_VERSION})")
    return p


# `aosbuild <command> ...` runs a tool other than a build; anything else is a manifest to build.
# Each entry is "module:function", the function taking the remaining arguments and returning the exit code.
COMMANDS: dict[str, str] = {
    "depsolve": "aosbuild.depsolve:main",
    "install-osbuild-command": "aosbuild.osbuild_compat:install",
    "report": "aosbuild.report:main",
    "sample": "aosbuild.samples:main",
    "store": "aosbuild.store.commands:main",
    "worker": "aosbuild.worker:main",
}


def run_command(name: str, argv: list[str]) -> int:
    import importlib

    module_name, _, function = COMMANDS[name].partition(":")
    module = importlib.import_module(module_name)
    try:
        result: int = getattr(module, function)(argv)
    except SystemExit as exc:  # argparse's --help (0) and usage errors (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    return result


def main(argv: list[str] | None = None, prog: str = "aosbuild") -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return guarded(lambda: run_command(argv[0], argv[1:]))
    return run(invocation(parser(prog).parse_args(argv)))


def invocation(args: argparse.Namespace) -> Invocation:
    """The build `aosbuild`'s flags ask for."""
    return Invocation(
        manifest=args.manifest, store=args.store, libdirs=tuple(args.libdir), checkpoints=tuple(args.checkpoint),
        exports=tuple(args.export), output_directory=args.output_directory, inspect=args.inspect, json=args.json,
        monitor=args.monitor, monitor_fd=args.monitor_fd, stage_timeout=args.stage_timeout, jobs=args.jobs,
        sources_only=args.sources_only,
        download=DownloadOptions(jobs=args.download_jobs, per_host=args.download_jobs_per_host,
                                 timeout=args.download_timeout),
        cache_max_size=args.cache_max_size,
        cache_remotes=() if args.no_cache_remote else (tuple(args.cache_remote) if args.cache_remote else None),
        cache_push=args.cache_push, cache_remote_insecure=args.cache_remote_insecure,
        cache_remote_timeout=args.cache_remote_timeout, dispatch=args.dispatch,
        dispatch_arch=args.dispatch_arch, quiet=args.quiet, debug=args.debug, backend=args.backend)


