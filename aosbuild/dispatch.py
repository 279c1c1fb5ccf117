"""`aosbuild --dispatch ADDRESS`: the plan's pipelines built by Dask workers (`aosbuild worker`).

The client loads and plans the manifest as a local build does; the `Dispatcher` is the engine's
`Executor` for the planned pipelines (the engine pulled beforehand what the remote cache holds). Each
pipeline left becomes one Dask task keyed by the pipeline's id, submitted once its build root and input
pipelines are built, so two clients asking for the same pipeline share one execution. A worker builds
it on its own store, pulling what it needs from the remote cache and pushing what it built; its monitor
events come back as the task's result and are replayed into this build's monitor (its progress lines
come live, as Dask events), so the stream, `--json` and the report are a local build's. The exported
trees are then pulled from the remote cache into the local store, from which the engine exports them
as usual.

Dask's client is asyncio (tornado); the engine is trio. The synchronous `distributed.Client` runs its
own event loop in a thread of its own; this module calls it through `anyio.to_thread`, and its
futures' done-callbacks come back into the engine's loop through `anyio.from_thread`.
"""

from __future__ import annotations

import contextlib
import math
import platform
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

from .errors import UsageError
from .registry import is_loopback
from .remoteevents import DispatchedError, RemoteFailure, Replayer, progress_topic, rebuild_error
from .worker import SLOT, arch_resource, build_task

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectSendStream

    from .context import BuildContext
    from .engine import Request
    from .manifest import Pipeline
    from .planner import Step

T = TypeVar("T")


def on_loopback(address: str) -> bool:
    """Whether a scheduler's address (`[tcp://|tls://]HOST:PORT`) is on this machine."""
    return is_loopback(address.rpartition("://")[2])


def check_address(address: str, flag: str) -> None:
    """Plain TCP only to a loopback scheduler: anyone who reaches a scheduler runs manifests as root."""
    scheme = address.rpartition("://")[0] or "tcp"
    if scheme == "tls":
        return
    if scheme != "tcp":
        raise ValueError(f"{flag} {address}: the scheduler's address is tls://HOST:PORT (or tcp://127.0.0.1:PORT "
                         "on this machine)")
    if not on_loopback(address):
        raise ValueError(f"{flag} {address}: plain TCP is only for a scheduler on this machine (127.0.0.1); "
                         "a scheduler elsewhere needs tls://HOST:PORT and certificates (README, 'Builds on "
                         "a Dask cluster')")


def security_from(ca_file: str | None, cert: str | None, key: str | None) -> Any:
    """Dask's `Security` for mutual TLS from files; None leaves it to Dask's configuration
    (`distributed.comm.tls.*`, e.g. DASK_DISTRIBUTED__COMM__TLS__CA_FILE)."""
    if not (ca_file or cert or key):
        return None
    from distributed import Security

    return Security(  # type: ignore[no-untyped-call]  # distributed's API is untyped
        tls_ca_file=ca_file, tls_client_cert=cert, tls_client_key=key, tls_worker_cert=cert, tls_worker_key=key,
        require_encryption=True)


def probe_scheduler(address: str, security: Any) -> None:
    """Connect to the scheduler once, in a loop of our own, before `Client` does: a refused handshake
    (no certificate, another CA's) or no scheduler is then an error of ours, not a `Client` left half
    made (whose finaliser waits out its own timeout). Dask's connect timeout applies
    (`distributed.comm.timeouts.connect`)."""
    import asyncio

    import dask.config
    from dask.utils import parse_timedelta
    from distributed import Security
    from distributed.comm.core import connect

    chosen = security if security is not None else Security()  # type: ignore[no-untyped-call]  # untyped API
    if address.startswith("tls://") and chosen.get_connection_args("client").get("ssl_context") is None:
        raise UsageError(f"cannot reach the Dask scheduler at {address}: tls:// needs this client's certificate, "
                         "key and the cluster's CA (Dask's distributed.comm.tls.client.cert, .client.key and "
                         ".ca-file, e.g. DASK_DISTRIBUTED__COMM__TLS__CA_FILE; README, 'Builds on a Dask cluster')")

    async def once() -> None:
        timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "seconds")
        comm = await connect(  # type: ignore[no-untyped-call]  # distributed's API is untyped
            address, timeout=timeout, **chosen.get_connection_args("client"))
        await comm.close()

    try:
        asyncio.run(once())
    except (OSError, ValueError) as exc:  # refused, timed out (a TimeoutError is an OSError), a bad handshake
        raise UsageError(f"cannot reach the Dask scheduler at {address}: {exc}; check the address, that the "
                         "scheduler runs, and for tls:// the certificates (README, 'Builds on a Dask "
                         "cluster')") from None


@contextlib.asynccontextmanager
async def open_dask_client(address: str, security: Any = None) -> AsyncIterator[Any]:
    """A synchronous `distributed.Client` connected to the scheduler, closed on the way out (shielded)."""
    from distributed import Client

    await anyio.to_thread.run_sync(probe_scheduler, address, security)
    options = {"security": security} if security is not None else {}
    client = await anyio.to_thread.run_sync(
        lambda: Client(address, set_as_default=False, **options))  # type: ignore[no-untyped-call]  # untyped API
    try:
        yield client
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(client.close)


@dataclass(frozen=True, kw_only=True)
class Dispatcher:
    """The engine's executor for `--dispatch`: the planned pipelines as Dask tasks on `aosbuild worker`s."""

    address: str
    manifest_text: str              # what each task loads (the workers need nothing else of the client)
    arch: str = ""                  # the build roots' architecture (default: this machine's)
    security: Any = None

    async def run(self, ctx: BuildContext, planned: Sequence[Step], request: Request) -> None:
        """Build the planned pipelines on the workers, then pull the exported ones into the local store.

        The engine has pulled what the remote cache holds before planning (`remotecache.pull_ahead`):
        what is planned is what no one has built yet."""
        if planned:
            arch = self.arch or platform.machine()
            async with open_dask_client(self.address, self.security) as client:
                await anyio.to_thread.run_sync(self.check_workers, client, arch)
                await self.build_all(ctx, client, planned, request, arch)
        for name in request.exports:
            pipeline = ctx.manifest.lookup(name)
            if pipeline is not None and pipeline.id is not None and pipeline.id not in ctx.pins:
                await self.fetch(ctx, pipeline)

    async def fetch(self, ctx: BuildContext, pipeline: Pipeline) -> None:
        """Bring an exported pipeline's tree from the remote cache into the local store, pinned."""
        pulled = 0 if ctx.remote is None else await ctx.remote.fetch_newest(ctx, pipeline, 0)
        if pulled < len(pipeline.stages):
            raise DispatchedError(f"pipeline {pipeline.name} ({pipeline.id}) was built on the Dask cluster, but "
                                  "its tree cannot be pulled from the remote cache: check that the workers push "
                                  "to the first --cache-remote of this build")

    # -- Dask ------------------------------------------------------------------------------------------

    def check_workers(self, client: Any, arch: str) -> None:
        """Fail now, not wait forever, when no worker has the slot and architecture the tasks ask for."""
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
        offers = [(w.get("name"), set(w.get("resources") or {})) for w in workers.values()]
        if not any({SLOT, arch_resource(arch)} <= resources for _, resources in offers):
            seen = ", ".join(f"{name} ({', '.join(sorted(resources)) or 'no resources'})"
                             for name, resources in offers) or "none"
            raise UsageError(f"no worker of the Dask scheduler at {self.address} builds {arch} pipelines "
                             f"(workers: {seen}): start `aosbuild worker --scheduler {self.address}` on a {arch} "
                             "machine, or build here without --dispatch")

    def submit(self, client: Any, item: Step, request: Request, arch: str) -> Any:
        """The pipeline's task, keyed by its id: a client asking for it while it runs gets this one."""
        pipeline_id = str(item.pipeline.id)
        spec = {"manifest": self.manifest_text, "label": request.label, "pipeline": pipeline_id,
                "stage_timeout": request.stage_timeout}
        return client.submit(build_task, spec, key=pipeline_id, resources={SLOT: 1, arch_resource(arch): 1})

    async def build_all(self, ctx: BuildContext, client: Any, planned: Sequence[Step], request: Request,
                        arch: str) -> None:
        """Submit each pipeline once the planned pipelines it needs are built, replay its events when it
        ends; the first failure raises as the local build's would, and cancels the rest.

        The order is kept here rather than as Dask dependencies: Dask runs a task where its dependencies'
        results are, and a pipeline's results are only its events (its tree is in the registry), so every
        image built on one build root would queue on the worker that built the root."""
        send, receive = anyio.create_memory_object_stream[str](len(planned))  # keys of the futures done
        live_send, live_receive = anyio.create_memory_object_stream[tuple[str, Any]](math.inf)
        deliver_done, deliver_live = from_dask_threads(send), from_dask_threads(live_send)
        waiting = {str(item.pipeline.id): item for item in planned}
        futures: dict[str, Any] = {}
        built: set[str] = set()

        def done(future: Any) -> None:  # in a thread of Dask's client
            deliver_done(str(future.key))

        def heard(pipeline_id: str) -> Callable[[tuple[float, Any]], None]:
            def handler(event: tuple[float, Any]) -> None:  # in the Dask client's event-loop thread
                deliver_live((pipeline_id, event[1]))
            return handler

        def subscribe_and_submit(item: Step) -> Any:
            pipeline_id = str(item.pipeline.id)
            client.subscribe_topic(progress_topic(pipeline_id), heard(pipeline_id))
            return self.submit(client, item, request, arch)

        async def submit_ready() -> None:
            for pipeline_id, item in list(waiting.items()):
                if all(dep in built or (dep not in waiting and dep not in futures) for dep in item.waits_for):
                    del waiting[pipeline_id]
                    futures[pipeline_id] = await anyio.to_thread.run_sync(subscribe_and_submit, item)
                    futures[pipeline_id].add_done_callback(done)

        async def show_live() -> None:
            """What the workers say while a pipeline runs (a stage starting, finishing), as it happens."""
            async for pipeline_id, message in live_receive:
                pipeline = ctx.manifest.by_id(pipeline_id)
                if pipeline_id not in built and isinstance(message, dict):
                    ctx.monitor.worker_log(str(message.get("name")), str(message.get("message")), pipeline)

        def unsubscribe() -> None:
            for pipeline_id in futures:
                client.unsubscribe_topic(progress_topic(pipeline_id))

        replayer = Replayer(ctx.manifest, ctx.monitor)
        try:
            async with send, receive, live_send, live_receive, anyio.create_task_group() as tg:
                tg.start_soon(show_live)
                await submit_ready()
                while len(built) < len(planned):
                    key = await receive.receive()
                    if key in built or key not in futures:
                        continue
                    await self.collect(ctx, replayer, key, futures[key])
                    built.add(key)
                    await submit_ready()
                tg.cancel_scope.cancel()
        except BaseException:
            with anyio.CancelScope(shield=True):  # Ctrl-C, a failure: the workers stop ours
                await anyio.to_thread.run_sync(client.cancel, [f for f in futures.values() if not f.done()])
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(unsubscribe)

    async def collect(self, ctx: BuildContext, replayer: Replayer, key: str, future: Any) -> None:
        """Replay a pipeline's events from the worker that built it; raise its failure as ours."""
        pipeline = ctx.manifest.by_id(key)
        assert pipeline is not None
        failure: RemoteFailure | None = None
        if future.status == "finished":
            outcome = await anyio.to_thread.run_sync(future.result)
        else:
            error = await anyio.to_thread.run_sync(future.exception) if future.status == "error" else None
            if not isinstance(error, RemoteFailure):
                raise DispatchedError(f"pipeline {pipeline.name} ({key}) was not built on the Dask cluster: "
                                      f"{error or future.status}; the logs of the workers (and of the scheduler) "
                                      "say why, or build it here without --dispatch")
            failure, outcome = error, error.outcome
        how = "failed on" if failure else "built by"
        ctx.monitor.worker_log(outcome["worker"], f"pipeline {pipeline.name} {how} worker {outcome['worker']}\n",
                               pipeline)
        replayer.replay(pipeline, outcome["events"])
        if failure is not None:
            raise rebuild_error(outcome["error"], outcome["worker"])


def from_dask_threads(send: MemoryObjectSendStream[T]) -> Callable[[T], None]:
    """A callback for Dask's threads that hands an item to `send` in this event loop (the engine's: the
    one this is called in). Once the build has ended nobody listens, and the item is dropped."""
    token = anyio.lowlevel.current_token()

    def deliver(item: T) -> None:
        with contextlib.suppress(Exception):  # the loop has closed, or the stream
            anyio.from_thread.run_sync(send.send_nowait, item, token=token)
    return deliver
