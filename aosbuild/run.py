"""Carry out an `Invocation`: check it, load the manifest, inspect or build it, and say how it went.

`run()` is what both command lines do once they have parsed their flags; it returns the exit code:
0 success, 1 a failed build or an impossible request, 2 an invalid manifest or request, 130 interrupted by
SIGINT, 143 by SIGTERM, 141 when the reader of standard output went away. Everything it prints (the
osbuild layouts on stdout, errors with what to do next on stderr) is decided here, from the invocation.

The engine, validation (jsonschema) and logging (structlog, which pulls in asyncio) are imported in the
functions that use them, so that `--version` and `--inspect` do not pay for what only a build needs
(tests/test_startup.py).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from .buildreport import what_was_made
from .entry import exit_code, guarded
from .errors import AosbuildError, InvalidArgument, ManifestError, Problem, SourceError, StageError, flatten
from .invocation import Invocation
from .library import Library
from .monitor import make_monitor
from .sizes import format_size
from .store import Store


def run(inv: Invocation) -> int:
    """Build (or inspect) what `inv` asks for; the exit code. Ctrl-C and SIGTERM end it with "Aborted"."""
    return guarded(lambda: carry_out(inv))


def check(inv: Invocation) -> None:
    """Refuse, before anything is built, flag values that could never work (exit 2)."""
    if inv.jobs is not None and inv.jobs < 1:
        raise InvalidArgument("--jobs", f"must be 1 or more, not {inv.jobs}; leave it out for the default")
    if inv.stage_timeout is not None and not (inv.stage_timeout > 0 and math.isfinite(inv.stage_timeout)):
        raise InvalidArgument("--stage-timeout", f"must be a number of seconds above 0, not {inv.stage_timeout}; "
                              "leave it out for no limit")
    if inv.monitor_fd is not None:
        try:
            writable = (fcntl.fcntl(inv.monitor_fd, fcntl.F_GETFL) & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        except (OSError, ValueError, OverflowError):  # closed, negative or absurd
            writable = False
        if not writable:
            raise InvalidArgument("--monitor-fd", f"{inv.monitor_fd} is not a descriptor open for writing; "
                                  "open it in the calling shell (e.g. 3>file) or leave the flag out")
    for libdir in inv.libdirs:
        if not Path(libdir).is_dir():
            raise InvalidArgument("--libdir", f"{libdir} is not a directory; give a directory that holds "
                                  "stages/ (and runners/, schemas/, ...), as osbuild's library does")
    if inv.cache_push is not None and inv.cache_push not in ("none", "pipelines", "all"):
        raise InvalidArgument("--cache-push", f"must be none, pipelines or all, not {inv.cache_push!r}")
    for ref in inv.cache_remotes or ():
        from .registry import RegistryError
        from .remotecache import check_ref

        try:
            check_ref(ref)
        except RegistryError as exc:
            raise InvalidArgument("--cache-remote", str(exc)) from None
    if inv.cache_remote_timeout is not None and not (inv.cache_remote_timeout > 0
                                                     and math.isfinite(inv.cache_remote_timeout)):
        raise InvalidArgument("--cache-remote-timeout", "must be a number of seconds above 0")
    if inv.dispatch is not None:
        check_dispatch(inv)
    out = inv.output_directory
    if out is not None and out.is_symlink() and not out.exists():
        raise InvalidArgument("--output-directory", f"{out} is a symbolic link to nothing; remove it or "
                              "point it at a directory")
    if out is not None and out.exists() and not out.is_dir():
        raise InvalidArgument("--output-directory", f"{out} exists and is not a directory; choose another path")

NEEDS_REMOTE = ("needs --cache-remote REF (or the store's `aosbuild store remote`): the workers share trees only "
                "through the remote cache, an OCI registry repository the workers use too")


def check_dispatch(inv: Invocation) -> None:
    assert inv.dispatch is not None
    if inv.cache_remotes == ():
        raise InvalidArgument("--dispatch", NEEDS_REMOTE)
    if inv.sources_only or inv.inspect:
        return
    import importlib.util

    if importlib.util.find_spec("distributed") is None:
        raise InvalidArgument("--dispatch", "needs Dask distributed: pip install 'aosbuild[dispatch]'")
    from .dispatch import check_address

    try:
        check_address(inv.dispatch, "--dispatch")
    except ValueError as exc:
        raise InvalidArgument("--dispatch", str(exc).removeprefix("--dispatch ")) from None


def carry_out(inv: Invocation) -> int:
    """`run()` less the interrupts: refuse a bad request, load the manifest, then inspect or build it."""
    from .loading import load_file

    try:
        check(inv)
    except InvalidArgument as exc:
        if inv.json:
            print_json(exc.as_json())
        sys.stderr.write(f"Error: {exc}\n")
        return exc.exit_code
    library = Library([Path(d) for d in inv.libdirs])
    label = inv.manifest
    try:
        text = read_manifest(label)
        manifest = load_file(label, text, library, build=not inv.inspect)
    except ManifestError as exc:
        if exc.__cause__ is not None:
            sys.stderr.write(f"Error: cannot read {label}: {exc.__cause__}; check the path (`-` reads the "
                             "manifest from standard input)\n")
            return 2
        if inv.json or inv.inspect:
            print_json(exc.as_json())
        else:
            sys.stdout.write(exc.render())
        from .devices import device_mapper_refusal

        refusal, others = device_mapper_refusal(exc.problems)
        if refusal is not None:
            sys.stderr.write(f"Error: {label}: {refusal}\n")
            if not others:
                return 2
        count = len(exc.problems)
        what = ("the problem listed at its JSON path" if count == 1
                else f"the {count} problems listed at their JSON paths")
        sys.stderr.write(f"Error: {label} is not a manifest aosbuild can build: fix {what}, then "
                         f"check it again with `aosbuild --inspect {label}` (it builds nothing)\n")
        return 2

    if inv.inspect:
        from .formats import describe

        try:
            host_runner: str | None = library.host_runner()
        except AosbuildError:  # only named for build pipelines without a runner of their own
            host_runner = None
        print_json(describe(manifest, host_runner))
        return 0
    return build(inv, manifest, library, text)


def build(inv: Invocation, manifest: Any, library: Library, text: str = "") -> int:
    """Build the loaded manifest; progress, the result and the errors as the invocation's flags say."""
    label = inv.manifest
    if inv.exports and not inv.output_directory and not inv.sources_only:
        sys.stderr.write("Need --output-directory for --export: add --output-directory DIR, the directory "
                         "the exported trees go to\n")
        return 1

    import anyio

    from . import engine, formats
    from .signals import Interrupted, run_until_signalled

    configure_logging(inv.debug)  # only a build logs: --inspect need not import structlog
    monitor_fd = inv.monitor_fd if inv.monitor_fd is not None else sys.stdout.fileno()
    monitor_name = inv.monitor or ("null" if inv.json or inv.quiet else
                                   "live" if live_terminal(monitor_fd) and not inv.debug else "log")
    # the summary and "Failed" go to stdout only where they cannot corrupt a machine-read stream
    human_stdout = not (inv.json or inv.quiet) and (
        monitor_name in ("log", "LogMonitor") or monitor_fd != sys.stdout.fileno())
    # what was made: after the live view on its terminal; for osbuild's layouts on stderr, where no
    # client of osbuild parses anything (the drop-in `osbuild` prints none, as osbuild); --sources-only
    # has a summary of its own
    end_summary = None
    if inv.summary and not (inv.json or inv.quiet or inv.sources_only):
        end_summary = sys.stdout if monitor_name == "live" and monitor_fd == sys.stdout.fileno() else sys.stderr
    request = engine.Request(label=label, exports=inv.exports, output_directory=inv.output_directory,
                             checkpoints=inv.checkpoints, jobs=inv.jobs, stage_timeout=inv.stage_timeout,
                             sources_only=inv.sources_only, download=inv.download,
                             executor=dispatcher(inv, text))
    report = None
    try:
        store = Store.open(Path(inv.store), max_size=inv.cache_max_size)
        request = dataclasses.replace(request, remote=remote_settings(inv, store))
        if request.executor is not None and request.remote is None:
            raise InvalidArgument("--dispatch", NEEDS_REMOTE)
        monitor = make_monitor(monitor_name, monitor_fd)
        prepared = engine.prepare(manifest, request, store=store, library=library, monitor=monitor)
        report = anyio.run(run_until_signalled, lambda: engine.build(prepared, request), backend=inv.backend)
        if report.error is not None:
            raise report.error
    except BaseException as exc:  # sorted below: ours, interrupts, then real bugs
        errors = list(flatten(exc))
        interrupt = next((e for e in errors if isinstance(e, Interrupted | KeyboardInterrupt)), None)
        if interrupt is not None:
            sys.stderr.write("Aborted\n")
            return interrupt.exit_code if isinstance(interrupt, Interrupted) else exit_code(interrupt)
        broken = next((e for e in errors if isinstance(e, BrokenPipeError)), None)
        if broken is not None and not inv.debug:
            raise broken from None  # the reader of our output is gone: nothing more to say (run)
        ours = next((e for e in errors if isinstance(e, AosbuildError)), None)
        if ours is None or inv.debug:
            raise
        if inv.json:
            document = None if report is None else formats.output(manifest, report, ours,
                                                                   sources_only=inv.sources_only)
            # failed before or outside any stage or source (a read-only store, ...): still a document
            print_json(document or {"type": "error", "success": False, "title": type(ours).__name__,
                                    "message": str(ours)})
        elif human_stdout and inv.sources_only and report is not None:
            sources_summary(report)
        elif human_stdout:
            sys.stdout.write("Failed\n")
        if inv.sources_only and report is not None and isinstance(ours, SourceError):
            for items in report.sources.values():  # every failed item, not only the first
                sys.stderr.writelines(f"Error: {item.error}\n" for item in items if item.error)
            sys.stderr.write("What to do: check those items' URLs and checksums in the manifest's `sources`, then "
                             "run `--sources-only` again (the items it fetched are kept).\n")
        else:
            sys.stderr.write(explain(ours, tail=monitor_name != "live"))
        if report is not None and end_summary is not None:
            end_summary.write(what_was_made(report, store_hint(inv.store)))
        return ours.exit_code

    if inv.json:
        print_json(formats.output(manifest, report, sources_only=inv.sources_only))
    elif human_stdout and inv.sources_only:
        sources_summary(report)
    elif human_stdout:
        pipelines_summary(manifest, prepared.ctx)
    if end_summary is not None:
        end_summary.write(what_was_made(report, store_hint(inv.store)))
    return 0


def remote_settings(inv: Invocation, store: Store) -> Any:
    """The registries of the build: its flags over the store's own setting (`aosbuild store remote`)."""
    from .remotesettings import resolve_settings

    return resolve_settings(store.remote_config(), refs=inv.cache_remotes, push=inv.cache_push,
                            insecure=inv.cache_remote_insecure, timeout=inv.cache_remote_timeout)


def dispatcher(inv: Invocation, text: str) -> Any:
    """The executor of `--dispatch` (dispatch.py, which imports Dask), or None to build here."""
    if inv.dispatch is None or inv.sources_only:
        return None
    from .dispatch import Dispatcher

    return Dispatcher(address=inv.dispatch, manifest_text=text, arch=inv.dispatch_arch or "")


def pipelines_summary(manifest: Any, ctx: Any) -> None:
    """osbuild's end of a build: every pipeline's id, and whether the checkpoints asked for are stored."""
    bold, reset = ("\x1b[1m", "\x1b[0m") if os.isatty(sys.stdout.fileno()) else ("", "")
    lines = ["", f"{bold}Pipelines{reset}"]
    for pipeline in manifest.pipelines:
        lines.append(f"  {pipeline.name + ':': <10}\t{pipeline.id}")
    if ctx.options.checkpoints:
        lines += ["", f"{bold}Checkpoints{reset}"]
        for stage_id in sorted(ctx.options.checkpoints):
            cached = "cached" if ctx.store.contains(stage_id) else "not cached"
            lines.append(f"  {stage_id}: {cached}")
    sys.stdout.write("\n".join(lines) + "\n")


def sources_summary(report: Any) -> None:
    """What `--sources-only` did: items and bytes needed, how many were there already, how many failed."""
    bold, reset = ("\x1b[1m", "\x1b[0m") if os.isatty(sys.stdout.fileno()) else ("", "")
    items = [item for results in report.sources.values() for item in results]
    fetched = [i for i in items if not i.cached and i.error is None]
    present = sum(i.size for i in items if i.error is None)
    lines = ["", f"{bold}Sources{reset}",
             f"  items:          {len(items)}",
             f"  bytes:          {present} ({format_size(present)})",
             f"  downloaded:     {len(fetched)} ({format_size(sum(i.size for i in fetched))})",
             f"  already cached: {sum(1 for i in items if i.cached)}",
             f"  failed:         {sum(1 for i in items if i.error is not None)}"]
    sys.stdout.write("\n".join(lines) + "\n")


def live_terminal(fd: int) -> bool:
    """The live view is the default on a terminal that can move its cursor (and without --debug, whose
    engine events on stderr would tear the redrawn region apart)."""
    return os.isatty(fd) and os.environ.get("TERM", "dumb") != "dumb"


def store_hint(store: str) -> str:
    import shlex

    return "aosbuild report --last" + ("" if store == ".osbuild" else f" --store {shlex.quote(store)}")


def configure_logging(debug: bool) -> None:
    import logging

    import structlog

    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"),
                    structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if debug else logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(CurrentStderr()))  # type: ignore[arg-type]  # write+flush suffice


class CurrentStderr:
    """`sys.stderr` as it is when a line is written, not when logging was set up: a caller of `run()` (a
    test's capture, a program embedding aosbuild) may swap it, and a closed old one must not be written."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def read_manifest(path: str) -> str:
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise ManifestError(path, []) from exc  # the CLI says why, from __cause__
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(path, [Problem(f"not UTF-8: byte {data[exc.start]:#04x} at offset {exc.start}; "
                                           "JSON manifests must be UTF-8")]) from None


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def explain(exc: AosbuildError, *, tail: bool = True) -> str:
    """The error for stderr, ending with what to do next; a failed stage's last output lines unless the
    live view showed them already."""
    text = f"Error: {exc}\n"
    if isinstance(exc, StageError):
        if exc.output_tail.strip() and tail:
            text += "Last output of the stage:\n" + "".join(f"  {line}" for line in
                                                          exc.output_tail.splitlines(keepends=True))
        elif tail:
            text += "The stage printed nothing before it failed: its exit status is all there is to go on.\n"
        text += ("What to do: its output says why it failed; fix the stage's options in the manifest (or "
                 "the stage) and build again. `aosbuild report --last` shows the build up to the failure.\n")
    elif isinstance(exc, SourceError):
        text += ("What to do: check the item's URL and checksum in the manifest's `sources`; "
                 "`--sources-only` fetches and verifies the sources without building.\n")
    return text
