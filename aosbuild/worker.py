"""`aosbuild worker`: a Dask worker that builds the pipelines a dispatched build sends it.

The worker is `distributed.Worker`, started in this process with an `AosbuildWorker` plugin that holds
what its tasks need: its own store, its library and the remote cache. A task (`build_task`, submitted
by `dispatch.py` under the pipeline's id) runs aosbuild's engine on trio in the task's thread, exactly
as a local build of that one pipeline: its build root and inputs come from the store or the remote cache,
what it builds is pushed there, and its monitor events go back to the client as the task's result.

Resources: `slot` (how many pipelines at once, `--slots`) and `arch-<machine>` (the host's architecture),
so the scheduler only sends a pipeline to a worker that can run its build root. A task the scheduler
cancels (the client's Ctrl-C, a sibling's failure) has its build cancelled, which tears its sandboxes,
mounts and loop devices down as a local Ctrl-C does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

try:
    from distributed import WorkerPlugin
except ImportError:  # aosbuild without its [dispatch] extra: main() says what to install
    WorkerPlugin = object  # type: ignore[misc,assignment]  # only a base class here

PLUGIN = "aosbuild"
SLOT = "slot"


def arch_resource(machine: str) -> str:
    """The resource that says a worker runs build roots of this architecture (`uname -m`'s name)."""
    return f"arch-{machine}"


class TaskCancelled(Exception):
    """The scheduler no longer wants the pipeline (cancelled by its clients): the build was torn down."""


class AosbuildWorker(WorkerPlugin):
    """The worker plugin: each task's build, and their cancellation when the scheduler lets go of them."""

    name = PLUGIN

    def __init__(self, *, store: Path, libdirs: tuple[str, ...], remotes: tuple[str, ...], label: str) -> None:
        self.store = store
        self.libdirs = libdirs
        self.remotes = remotes
        self.label = label  # the worker's name, in the client's log lines
        self._lock = threading.Lock()
        self._running: dict[str, tuple[Any, Any]] = {}  # task key -> (event-loop token, cancel scope)
        self.worker: Any = None  # the distributed.Worker, once it has set the plugin up

    def setup(self, worker: Any) -> None:
        self.label = str(worker.name)
        self.worker = worker

    def teardown(self, worker: Any) -> None:
        """The worker is closing (SIGTERM, SIGINT): its builds are cancelled and cleaned up."""
        with self._lock:
            keys = list(self._running)
        for key in keys:
            self.cancel(key)

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        """Called by the worker's event loop: a running task that is cancelled or released is stopped."""
        if finish in ("cancelled", "released", "forgotten"):
            self.cancel(str(key))

    def cancel(self, key: str) -> None:
        with self._lock:
            running = self._running.get(key)
        if running is not None:
            import anyio.from_thread

            token, scope = running
            with contextlib.suppress(Exception):  # the build ended meanwhile
                anyio.from_thread.run_sync(scope.cancel, token=token)

    def build(self, spec: dict[str, Any], key: str) -> dict[str, Any]:
        """Build the spec's pipeline in this thread; its outcome, or `RemoteFailure` with the same."""
        import anyio

        async def cancellable() -> dict[str, Any] | None:
            with anyio.CancelScope() as scope:
                with self._lock:
                    self._running[key] = (anyio.lowlevel.current_token(), scope)
                try:
                    return await self._build(spec)
                finally:
                    with self._lock:
                        self._running.pop(key, None)
            return None

        started = time.monotonic()
        outcome = anyio.run(cancellable, backend="trio")
        if outcome is None:
            sys.stderr.write(f"aosbuild worker {self.label}: pipeline {spec['pipeline']}: cancelled\n")
            raise TaskCancelled(spec["pipeline"])
        sys.stderr.write(f"aosbuild worker {self.label}: pipeline {spec['pipeline']}: {outcome['stages_run']} "
                         f"stages run in {time.monotonic() - started:.2f}s\n")
        return outcome

    async def _build(self, spec: dict[str, Any]) -> dict[str, Any]:
        from . import engine
        from .errors import AosbuildError
        from .library import Library
        from .loading import load_file
        from .remoteevents import EventRecorder, RemoteFailure, describe_error
        from .store import KEEP, Store

        outcome: dict[str, Any] = {"pipeline": spec["pipeline"], "worker": self.label, "events": [],
                                   "stages_run": 0}
        try:
            library = Library([Path(d) for d in self.libdirs])
            manifest = load_file(spec["label"], spec["manifest"], library, build=True)
            request = engine.Request(label=spec["label"], targets=(spec["pipeline"],),
                                     stage_timeout=spec.get("stage_timeout"), **self.remote_options())
            recorder = EventRecorder(spec["pipeline"], live=self.announcer(spec["pipeline"]))
            store = Store.open(self.store, max_size=KEEP)
            prepared = engine.prepare(manifest, request, store=store, library=library, monitor=recorder)
            report = await engine.build(prepared, request)
        except AosbuildError as exc:
            raise RemoteFailure({**outcome, "error": describe_error(exc)}) from None
        outcome.update(events=recorder.events, stages_run=recorder.stages_run)
        if report.error is not None:
            raise RemoteFailure({**outcome, "error": describe_error(report.error)})
        return outcome

    def announcer(self, pipeline_id: str) -> Any:
        """Progress lines for the clients, as Dask events (`Worker.log_event` may be called from any thread)."""
        from .remoteevents import progress_topic

        worker, topic = self.worker, progress_topic(pipeline_id)
        if worker is None:
            return None

        def announce(text: str) -> None:
            worker.log_event(topic, {"name": self.label, "message": text})  # Dask sets "worker"
        return announce

    def remote_options(self) -> dict[str, Any]:
        """The engine request's remote-cache settings: pull what the pipeline needs, push what it built
        (each pipeline's final stages, the default of `--cache-push`)."""
        from .remotesettings import RemoteSettings

        return {"remote": RemoteSettings(refs=self.remotes)}


def build_task(spec: dict[str, Any]) -> dict[str, Any]:
    """A dispatched pipeline's task. The client submits it once its build root and inputs are built
    (`Dispatcher.build_all`, not as Dask dependencies): what it needs of them is in the remote cache."""
    from distributed import get_worker

    worker = get_worker()
    plugin = worker.plugins.get(PLUGIN)
    if not isinstance(plugin, AosbuildWorker):
        raise RuntimeError(f"worker {worker.name} is not an aosbuild worker: start it with `aosbuild worker`")
    return plugin.build(spec, str(worker.get_current_task()))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aosbuild worker",
                                description="Build the pipelines that `aosbuild --dispatch` sends to a Dask scheduler.")
    p.add_argument("--scheduler", required=True, metavar="ADDRESS",
                   help="the Dask scheduler, e.g. tls://scheduler:8786 (tcp:// only on loopback)")
    p.add_argument("--store", default="/var/cache/aosbuild", metavar="DIR",
                   help="this worker's own store (default: /var/cache/aosbuild)")
    p.add_argument("--slots", type=int, default=1, metavar="N", help="pipelines built at the same time (default 1)")
    p.add_argument("--cache-remote", action="append", default=[], metavar="REF",
                   help="the remote cache (OCI registry repository): pulled from, pushed to; repeatable")
    p.add_argument("--name", help="the worker's name in the scheduler and the clients' logs (default: host:port)")
    p.add_argument("-l", "--libdir", action="append", default=[], metavar="DIR",
                   help="an extra library of stages, searched before the bundled one")
    p.add_argument("--host", help="the address to listen on for the scheduler and peers (default: "
                                  "127.0.0.1 for a loopback scheduler, else all)")
    p.add_argument("--arch", default=platform.machine(), help=argparse.SUPPRESS)  # tests: a foreign worker
    p.add_argument("--tls-ca-file", metavar="FILE", help="CA that signed the scheduler's and peers' certificates")
    p.add_argument("--tls-cert", metavar="FILE", help="this worker's certificate (mutual TLS)")
    p.add_argument("--tls-key", metavar="FILE", help="this worker's private key")
    return p


NO_DASK = "Error: aosbuild worker needs Dask distributed: pip install 'aosbuild[dispatch]'\n"


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if WorkerPlugin is object:
        sys.stderr.write(NO_DASK)
        return 1
    if args.slots < 1:
        sys.stderr.write(f"Error: --slots must be 1 or more, not {args.slots}\n")
        return 2
    if not args.cache_remote:
        sys.stderr.write("Error: aosbuild worker needs --cache-remote REF: workers share trees only through "
                         "the remote cache (an OCI registry repository)\n")
        return 2
    from .dispatch import check_address, on_loopback, security_from
    from .registry import is_loopback

    try:
        check_address(args.scheduler, "--scheduler")
    except ValueError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 2
    # plain TCP (check_address let it through: a loopback scheduler) is no boundary at all: anyone who
    # reaches a worker's port runs code as root on it (Dask's `run`), so such a worker listens on loopback
    plain = not args.scheduler.startswith("tls://")
    if plain and args.host is not None and not is_loopback(args.host):
        sys.stderr.write(f"Error: --host {args.host}: a worker of a plain tcp:// scheduler listens on loopback "
                         "only; a worker others reach needs a tls:// scheduler and certificates\n")
        return 2
    from .errors import AosbuildError
    from .store import KEEP, Store

    try:  # a store that cannot work fails now; what a killed worker left in it (mounts too) is reclaimed
        Store.open(Path(args.store), max_size=KEEP).close()
    except AosbuildError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 1
    plugin = AosbuildWorker(store=Path(args.store), libdirs=tuple(args.libdir), remotes=tuple(args.cache_remote),
                            label=args.name or "")
    security = security_from(args.tls_ca_file, args.tls_cert, args.tls_key)
    host = args.host or ("127.0.0.1" if plain or on_loopback(args.scheduler) else None)
    resources = {SLOT: args.slots, arch_resource(args.arch): args.slots}
    from .run import configure_logging

    configure_logging(debug=False)
    try:
        asyncio.run(serve(args.scheduler, plugin, nthreads=args.slots, resources=resources, name=args.name,
                          host=host, security=security))
    except KeyboardInterrupt:
        return 130
    return 0


async def serve(scheduler: str, plugin: AosbuildWorker, **options: Any) -> None:
    """Run the worker until the scheduler ends it or SIGTERM/SIGINT does (running tasks are cancelled)."""
    from distributed import Worker

    # Dask's HTTP server of a worker (health, metrics) is plain HTTP on every interface by default,
    # whatever the scheduler's TLS: on loopback, nobody elsewhere reads what the worker builds
    worker = Worker(scheduler, plugins=(plugin,), local_directory=str(plugin.store / "dask-worker"),
                    dashboard_address="127.0.0.1:0", **options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(worker.close()))
    await worker
    sys.stderr.write(f"aosbuild worker {worker.name}: ready at {worker.address}, store {plugin.store}\n")
    await worker.finished()  # type: ignore[no-untyped-call]  # distributed's API is untyped
