"""The drop-in `osbuild` command: osbuild's command line (reference §2) on aosbuild's engine.

It parses exactly osbuild's options and spellings, then builds like `aosbuild` does. `--break` and `--in-vm`
are refused (exit 2); `--cache-max-size` bounds the store, as `aosbuild --cache-max-size` does.
`--version` prints `osbuild N`, N being the osbuild release whose behaviour aosbuild follows, because tools such
as osbuild/images (`RunOSBuild`) check it.

Like osbuild, it takes its modules from the installed library, `/usr/lib/osbuild`, when there is one and
`--libdir` names no other; aosbuild's bundled library is searched after either, for what they lack.

Install it with `aosbuild install-osbuild-command [--prefix DIR]`, which writes an `osbuild` script beside
`aosbuild` (or into DIR/bin); it is not a console script of the package so that installing aosbuild never
shadows a real osbuild on PATH.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import OSBUILD_VERSION
from .invocation import Invocation
from .run import run
from .sizes import size_argument
from .store import KEEP

PROG = "osbuild"
MONITOR_CLASSES = ("JSONSeqMonitor", "LogMonitor", "NullMonitor")
INSTALLED_LIBDIR = Path("/usr/lib/osbuild")  # osbuild's `--libdir` default, where its packages install it


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Build operating system images")
    p.add_argument("manifest_path", metavar="MANIFEST", help="json file containing the manifest that should be "
                   "built, or a '-' to read from stdin")
    p.add_argument("--cache", "--store", dest="store", metavar="DIRECTORY", type=str, default=".osbuild",
                   help="directory where sources and intermediary os trees are stored")
    p.add_argument("-l", "--libdir", metavar="DIRECTORY", type=str, default=None,
                   help=f"directory containing stages, assemblers, and the osbuild library (default: "
                   f"{INSTALLED_LIBDIR} where it exists; aosbuild's bundled library is searched after it)")
    p.add_argument("--cache-max-size", metavar="SIZE", type=size_argument, default=KEEP,
                   help="maximum size of the cache (bytes) or 'unlimited'")
    p.add_argument("--checkpoint", metavar="ID", action="append", type=str, default=None,
                   help="stage to commit to the object store during build (can be passed multiple times), "
                   "accepts globs")
    p.add_argument("--export", metavar="ID", action="append", type=str, default=[],
                   help="object to export, can be passed multiple times")
    p.add_argument("--json", action="store_true", help="output results in JSON format")
    p.add_argument("--output-directory", metavar="DIRECTORY", type=Path,
                   help="directory where result objects are stored")
    p.add_argument("--inspect", action="store_true", help="return the manifest in JSON format including all the ids")
    p.add_argument("--monitor", metavar="NAME", default=None, choices=MONITOR_CLASSES,
                   help="name of the monitor to be used")
    p.add_argument("--monitor-fd", metavar="FD", type=int, default=None,
                   help="file descriptor to be used for the monitor")
    p.add_argument("--stage-timeout", type=float, default=None, help="set the maximal time (in seconds) each "
                   "stage is allowed to run")
    p.add_argument("--break", dest="debug_break", type=str, nargs="?", const="*",
                   help="open debug shell when executing stage. Accepts stage name or id or * (for all). "
                   "Not supported by aosbuild.")
    p.add_argument("--in-vm", metavar="ID", action="append", type=str, default=[],
                   help="run the given pipeline inside a VM. Not supported by aosbuild.")
    p.add_argument("-q", "--quiet", action="store_true", help="suppress normal output")
    p.add_argument("--version", action="version", version=f"{PROG} {OSBUILD_VERSION}")
    return p


def libdirs(given: str | None, installed: Path = INSTALLED_LIBDIR) -> tuple[str, ...]:
    """The library roots searched before the bundled one: `--libdir`, else osbuild's installed library."""
    if given:
        return (given,)
    return (str(installed),) if (installed / "stages").is_dir() else ()


def invocation(args: argparse.Namespace, installed: Path = INSTALLED_LIBDIR) -> Invocation:
    """The build osbuild's options ask for: no end summary (osbuild prints none), the other settings
    aosbuild's defaults."""
    return Invocation(
        manifest=args.manifest_path, store=args.store, libdirs=libdirs(args.libdir, installed),
        checkpoints=tuple(args.checkpoint or ()), exports=tuple(args.export),
        output_directory=args.output_directory, inspect=args.inspect, json=args.json, monitor=args.monitor,
        monitor_fd=args.monitor_fd, stage_timeout=args.stage_timeout,
        cache_max_size=args.cache_max_size,
        quiet=args.quiet, summary=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.debug_break is not None:
        sys.stderr.write(f"{PROG}: error: --break is not supported by aosbuild (no interactive debug shell); "
                         "leave it out, and read the failed stage's output (or use `aosbuild --debug`)\n")
        return 2
    if args.in_vm:
        sys.stderr.write(f"{PROG}: error: --in-vm is not supported by aosbuild (pipelines run in bubblewrap); "
                         "leave it out to build the pipeline on this host\n")
        return 2
    return run(invocation(args))


def install(argv: list[str]) -> int:
    """`aosbuild install-osbuild-command [--prefix DIR]`: write an `osbuild` script that runs this module."""
    p = argparse.ArgumentParser(prog="aosbuild install-osbuild-command",
                                description="Install the drop-in `osbuild` command (osbuild's command line).")
    p.add_argument("--prefix", type=Path, default=None,
                   help="install into DIR/bin (default: the bin directory of this Python, beside `aosbuild`)")
    p.add_argument("--force", action="store_true", help="replace an existing file that aosbuild did not write")
    args = p.parse_args(argv)
    bindir = args.prefix / "bin" if args.prefix is not None else Path(sys.executable).parent
    target = bindir / PROG
    marker = "# written by aosbuild install-osbuild-command"
    if target.exists() and not args.force and marker not in target.read_text(errors="replace"):
        sys.stderr.write(f"Error: {target} exists and was not written by aosbuild; use --force to replace it\n")
        return 1
    bindir.mkdir(parents=True, exist_ok=True)
    target.write_text(f"#!{sys.executable}\n{marker}\nimport sys\n\nfrom aosbuild.entry import osbuild\n\n"
                      "sys.exit(osbuild())\n")
    target.chmod(0o755)
    sys.stdout.write(f"{target}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
