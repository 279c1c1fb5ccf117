"""Building one pipeline: resume from its newest cached stage, run the rest in the sandbox, commit.

Every stage's result is a layer (see `store.layers`): the stage runs on an overlay mount whose lower
layers are the pipeline's layers so far and whose upper directory is a fresh entry of the store, which
is committed under the stage's id when the stage succeeds. So every stage is cached, and nothing is
copied to keep a stage's tree, to resume from it or to start the next stage; a rebuild resumes at the
first stage whose id is not in the store. Past `MAX_LAYERS` layers, the tree is squashed into one flat
entry first. A failing stage commits nothing. Every entry keeps the results of the stages that made its
tree, so a pipeline resumed from the store reports the stages it did not run exactly as the build that
ran them did.

With `AOSBUILD_FLAT=1` (for comparisons: tests of tree fidelity, the cold-build bench) a pipeline is
built as before layers: in one plain directory, committed under the pipeline's id, with a copy kept
before the last stage and at each `--checkpoint`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import structlog

from . import buildroot, mountns, osbuild_api, sandbox
from .accounts import Accounts, make_accounts
from .context import BuildContext
from .devices import DevDir, open_dev_dir, open_devices
from .errors import AosbuildError, SandboxError, StageError, StoreError
from .hostservices import (
    StoreApi,
    open_host_inputs,
    open_host_mounts,
    open_host_tree,
    open_store_api,
    split_mounts,
)
from .inputs import NATIVE_INPUTS, map_input
from .layercheck import LayerCheck
from .library import choose_runner, is_osbuild_library, read_os_release
from .loop import LoopServer, open_loop_server
from .manifest import Pipeline, Stage
from .moduleinfo import ModuleInfo
from .mounts import FSTYPES, plan_mounts
from .process import CommandError, explain_status
from .results import StageResult
from .rpc import Handler, HandlerError
from .sandboxside.runnerlib import MOUNTS_ENV, RUNNER_ERROR
from .sizes import format_size
from .store import EXISTS, NO_ROOM, STORED, TOO_LARGE, UNSTORED_BELOW, NewEntry, entries
from .store import layers as overlay
from .store.pins import TreeView

FLAT_ENV = "AOSBUILD_FLAT"  # "1": trees in one plain directory, as before layers
OUTPUT_KEEP = 1 << 20  # bytes of a stage's output kept in memory; the monitor saw it all already
ERROR_TAIL_LINES = 20

log = structlog.get_logger(__name__)


class StageSession:
    """What the engine knows while one stage runs: its output, metadata, progress and exception."""

    def __init__(self, ctx: BuildContext, pipeline: Pipeline, stage: Stage, arguments: dict[str, Any], *,
                 loops: LoopServer, devdir: DevDir, on_set_up: Callable[[], None] | None = None,
                 gate: Callable[[], Awaitable[None]] | None = None) -> None:
        self.ctx = ctx
        # a stage started ahead of its turn: what it says waits for `gate` (its tree attached), its output
        # is held until then
        self._gate = gate
        self._held: list[str] | None = [] if gate is not None else None
        self._held_size = 0
        self.on_set_up = on_set_up  # once the sandbox has made its binds: what then leaves the host
        self.loops = loops
        self.devdir = devdir
        self.pipeline = pipeline
        self.stage = stage
        self.arguments = arguments
        self.metadata: dict[str, Any] = {}
        self.exception: dict[str, Any] | None = None
        self._chunks: list[str] = []
        self._size = 0
        self.dropped = 0

    def output_line(self, text: str) -> None:
        if self._held is not None:  # bounded as what is kept is: a stage may print while it waits
            self._held.append(text)
            self._held_size += len(text)
            while self._held_size > OUTPUT_KEEP and len(self._held) > 1:
                self._held_size -= len(self._held.pop(0))
            return
        self.ctx.monitor.stage_output(self.pipeline, self.stage, text)
        self._chunks.append(text)
        self._size += len(text)
        while self._size > OUTPUT_KEEP and len(self._chunks) > 1:
            dropped = self._chunks.pop(0)
            self._size -= len(dropped)
            self.dropped += len(dropped)

    @property
    def output(self) -> str:
        text = "".join(self._chunks)
        return f"[...{self.dropped} bytes hidden...]\n{text}" if self.dropped else text

    def output_tail(self) -> str:
        return "".join("".join(self._chunks).splitlines(keepends=True)[-ERROR_TAIL_LINES:])

    # -- RPC handlers --------------------------------------------------------------------------------

    async def on_arguments(self, params: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        return self.arguments, []

    async def on_metadata(self, params: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        data = params.get("metadata")
        if not isinstance(data, dict):
            raise HandlerError("metadata must be a JSON object")
        self.metadata.update(data)
        return None, []

    async def on_log(self, params: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        message = str(params.get("message", ""))
        self.output_line(message if message.endswith("\n") else message + "\n")
        return None, []

    async def on_progress(self, params: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        done, total = params.get("done"), params.get("total")
        if isinstance(done, int) and isinstance(total, int):
            self.ctx.monitor.stage_progress(self.pipeline, self.stage, done, total,
                                            str(params.get("message", "")))
        return None, []

    async def on_exception(self, params: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        self.exception = {"type": "exception", "data": params}
        return None, []

    async def on_loop_attach(self, params: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        """A loop device over the descriptor the stage passed, visible in its /dev until it ends."""
        if not fds:
            raise HandlerError("loop.attach needs the backing file's descriptor")
        try:
            device = await self.loops.attach(
                fds[0], offset=int(params.get("offset", 0)), size=int(params.get("size", 0)),
                sector_size=int(params.get("sector-size", 512)), read_only=bool(params.get("read-only")),
                partscan=bool(params.get("partscan")))
        except AosbuildError as exc:
            raise HandlerError(str(exc)) from exc
        return {"path": self.devdir.add_loop(device)}, []

    def handlers(self) -> dict[str, Handler]:
        handlers: dict[str, Handler] = {
            "arguments": self.on_arguments, "metadata": self.on_metadata, "log": self.on_log,
            "progress": self.on_progress, "exception": self.on_exception, "loop.attach": self.on_loop_attach}
        return {name: self._from_inside(handler) for name, handler in handlers.items()}

    @property
    def begun(self) -> bool:
        """Whether the stage has its tree: always, unless it was started ahead and has not spoken yet."""
        return self._gate is None

    async def begin(self) -> None:
        """The stage's turn has come: what it said waits no more (`gate`), its held output goes out."""
        if self._gate is not None:
            await self._gate()
            self._gate = None
            held, self._held = self._held or [], None
            for text in held:
                self.output_line(text)

    def _from_inside(self, handler: Handler) -> Handler:
        async def call(params: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
            # a message from the stage means bwrap has made its mounts: its /dev need not stay on the host
            self.devdir.leave_host_soon()
            await self.begin()
            return await handler(params, fds)
        return call


def wanted_runner(ctx: BuildContext, pipeline: Pipeline) -> str:
    """The runner the pipeline's build root asks for, as osbuild names it: the host's distribution without a
    build pipeline, else the build pipeline's `runner`, else its tree's distribution."""
    if pipeline.build is None:
        info = read_os_release(Path("/etc/os-release"))
    else:
        build = ctx.manifest.by_id(pipeline.build)
        if build is not None and build.runner:
            return build.runner
        view = ctx.pins.view(pipeline.build)
        name = overlay.resolve(view.layers, "usr/lib/os-release")
        path = overlay.find(view.layers, name) if name else None
        info = read_os_release(path) if path is not None else {}
    return f"org.osbuild.{info.get('ID', 'linux')}{info.get('VERSION_ID', '').replace('.', '')}"


class Runners:
    """The runner of each stage of a pipeline: osbuild's library's own for its modules (chosen by osbuild's
    rule), aosbuild's for the others (the same distribution, closest version, else `org.osbuild.linux`)."""

    def __init__(self, ctx: BuildContext, wanted: str) -> None:
        self.ctx = ctx
        self.wanted = wanted
        distro, version = osbuild_api.runner_version(wanted.removeprefix("org.osbuild."))
        self.aosbuild_name = choose_runner(ctx.library.runner_names(), distro, str(version) if version else "")
        self._accounts: list[Accounts | None] = []  # made once, for the first stage that needs them
        self._making = anyio.Lock()  # that stage and the next one, started ahead, may ask at once

    async def accounts(self, build: TreeView | None, scratch: Path) -> Accounts | None:
        """The /etc/passwd and /etc/group aosbuild's runner gives its stages: as osbuild's distribution
        runners make them in the build root (`aosbuild.accounts`)."""
        async with self._making:
            if not self._accounts:
                layers = (Path("/"),) if build is None else build.layers
                self._accounts.append(await make_accounts(layers, scratch))
        return self._accounts[0]

    def for_module(self, info: ModuleInfo) -> tuple[str, Path]:
        """The runner's name and file for a module."""
        if is_osbuild_library(info.root):
            return osbuild_api.library_runner(info.root, self.wanted)
        return self.aosbuild_name, self.ctx.library.runner(self.aosbuild_name)

    def shown(self, pipeline: Pipeline) -> str:
        """The runner the log names for the pipeline: its first stage's."""
        first = self.ctx.library.find(pipeline.stages[0].kind, pipeline.stages[0].type) if pipeline.stages else None
        if first is None:
            return self.aosbuild_name
        try:
            return self.for_module(first)[0]
        except SandboxError:
            return self.aosbuild_name


def osbuild_contract(scratch: Path, info: ModuleInfo, arguments: dict[str, Any],
                     mounts: bool) -> sandbox.OsbuildSandbox:
    """The files a module of an osbuild library gets: arguments, meta, /var, /proc/cmdline (osbuild's)."""
    api_files = scratch / "api"
    api_files.mkdir()
    meta = scratch / "meta"
    meta.touch()
    var = scratch / "var"
    (var / "tmp").mkdir(parents=True)
    os.chmod(var / "tmp", 0o1777)
    cmdline = scratch / "cmdline"
    cmdline.write_text("root=/dev/osbuild\n")
    return sandbox.OsbuildSandbox(libdir=info.root, package=osbuild_api.osbuild_package(info.root),
                                  arguments=osbuild_api.write_arguments(api_files, arguments), meta=meta,
                                  api=scratch / "sockets", var=var, cmdline=cmdline, mount_wrapper=mounts)


class Views:
    """The overlay mounts one stage's sandbox needs, made in its own mount namespace when it starts:
    its tree (the layers below, and its new layer on top), its build root, its inputs' trees."""

    def __init__(self, ctx: BuildContext, scratch: Path) -> None:
        self.ctx = ctx
        self.scratch = scratch
        self.empty = scratch / "empty"
        self.empty.mkdir()
        self.overlays: list[overlay.Overlay] = []
        self._mounted: dict[tuple[Path, ...], Path] = {}
        self._tree: overlay.Overlay | None = None

    def tree(self, below: TreeView | None, upper: Path) -> Path:
        """Where the stage's tree is: the new layer over the layers below."""
        target, work = self.scratch / "tree", self.scratch / "work"
        target.mkdir()
        work.mkdir()
        self._tree = overlay.Overlay(target=target, lowers=below.layers if below else (), empty=self.empty,
                                     upper=upper, work=work)
        self.overlays.append(self._tree)
        return target

    def placeholder(self) -> Path:
        """Where the tree of a stage started ahead will be attached (`mountns.LateTree`)."""
        target = self.scratch / "tree"
        target.mkdir()
        (self.scratch / "work").mkdir()
        return target

    def late_tree(self, below: TreeView, upper: Path) -> tuple[str, str]:
        """The mount options (relative to the store) and workdir of the placeholder's overlay."""
        tree = overlay.Overlay(target=self.scratch / "tree", lowers=below.layers, empty=self.empty, upper=upper,
                               work=self.scratch / "work")
        return tree.options(self.ctx.store.root), os.fspath(self.scratch / "work")

    def take_tree(self) -> overlay.Overlay:
        """The tree's overlay, which the caller mounts on the host instead of in the stage's namespace."""
        assert self._tree is not None
        self.overlays.remove(self._tree)
        return self._tree

    def show(self, view: TreeView) -> Path:
        """A directory that shows `view` read-only: a flat tree itself, else a mount of its layers."""
        if view.flat:
            return view.layers[0]
        if view.layers not in self._mounted:
            target = self.scratch / "views" / str(len(self._mounted))
            target.mkdir(parents=True)
            self.overlays.append(overlay.Overlay(target=target, lowers=view.layers, empty=self.empty))
            self._mounted[view.layers] = target
        return self._mounted[view.layers]

    def tree_of(self, object_id: str) -> Path:
        return self.show(self.ctx.pins.view(object_id))

    def file_of(self, object_id: str, name: str) -> Path | None:
        """The regular file `name` of a pipeline's tree (symlinks resolved inside it), as the stage's
        sandbox will see it; None if there is none."""
        view = self.ctx.pins.view(object_id)
        resolved = overlay.file_in(view.layers, name)
        return None if resolved is None else self.show(view) / resolved

    def namespace(self, needed: list[str], late: mountns.LateTree | None = None) -> mountns.MountNamespace | None:
        """The mount namespace with these mounts for the stage's bwrap, which binds the host's `needed`."""
        return mountns.for_overlays(self.ctx.store.root, self.overlays, needed, late)


def root_entries(view: TreeView) -> dict[str, str]:
    """What the build root's top-level directories are (sandbox.ROOT_DIRS): "" a directory, else a
    symlink's target; looked up in the layers, as the sandbox's mount will show them."""
    found = {}
    for name in sandbox.ROOT_DIRS:
        path = overlay.find(view.layers, name)
        if path is not None and path.is_symlink():
            found[name] = os.readlink(path)
        elif path is not None and path.is_dir():
            found[name] = ""
    return found


AHEAD_ENV = "AOSBUILD_AHEAD"  # "0": no stage's sandbox starts before its turn (for comparisons)


@dataclasses.dataclass(eq=False)
class Ahead:
    """A stage whose sandbox starts while the stage before it runs (`build_layers`), so that its bwrap and
    Python start overlap that stage's run and commit. Its tree is attached as soon as `take` gives it its
    entry and the tree below (its sandbox may still be starting); until then what it says waits and its
    output is held, and it is reported started at its first word (or its end). One that ended before its
    tree was attached (it wrote to the read-only mount point before asking for its arguments, say) did
    nothing that counts: `take` gives None, and the stage is run again the usual way."""

    stage: Stage
    opened: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    finished: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    entry: NewEntry | None = None
    below: TreeView | None = None
    outcome: tuple[StageResult, str] | None = None
    error: Exception | None = None
    begun: bool = False  # its tree attached: from here on, what happens to it is the stage's

    async def take(self, entry: NewEntry, below: TreeView) -> tuple[StageResult, str] | None:
        self.entry, self.below = entry, below
        self.opened.set()
        await self.finished.wait()
        if self.error is not None:
            raise self.error
        return self.outcome


def starts_ahead(ctx: BuildContext, stage: Stage) -> bool:
    """Whether a stage's sandbox may start before the stage below it is done: one of aosbuild's own
    modules (it asks for its arguments before it touches its tree), with no devices or mounts (made from
    the tree) and only inputs the engine maps itself (no host service runs for it)."""
    if os.environ.get(AHEAD_ENV) == "0" or stage.devices or stage.mounts:
        return False
    if any(inp.type not in NATIVE_INPUTS for inp in stage.inputs.values()):
        return False
    info = ctx.library.find(stage.kind, stage.type)
    return info is not None and info.path is not None and not is_osbuild_library(info.root)


async def run_ahead(ctx: BuildContext, pipeline: Pipeline, ahead: Ahead, build: TreeView | None,
                    runners: Runners) -> None:
    """Start `ahead`'s stage and run it once it is taken; an error before its tree was attached is left
    to the usual run to meet again and report."""
    try:
        await ctx.sources.wait_for(ahead.stage.source_refs())
        ahead.outcome = await run_stage(ctx, pipeline, ahead.stage, None, None, build, runners, layered=True,
                                        ahead=ahead)
    except Exception as exc:
        if ahead.begun:
            ahead.error = exc
        else:
            log.debug("stage.ahead_failed", stage_id=ahead.stage.id, error=repr(exc))
    finally:
        ahead.finished.set()


async def run_stage(ctx: BuildContext, pipeline: Pipeline, stage: Stage, entry: NewEntry | None,
                    below: TreeView | None, build: TreeView | None, runners: Runners, *,
                    layered: bool, ahead: Ahead | None = None) -> tuple[StageResult, str] | None:
    """Run one stage in its sandbox, with its inputs, devices and mounts; returns its result and last lines.

    Layered, the stage's tree is an overlay of `entry` (its new layer) over `below`; else it is `entry`.
    With `ahead`, the sandbox starts at once and the tree is attached from `ahead` when the stage first
    speaks; None if it ended before (see `Ahead`).
    """
    info = ctx.library.find(stage.kind, stage.type)
    if info is None or info.path is None:
        raise SandboxError(f"{stage.kind.lower()} {stage.type} is not in the library")
    from_osbuild = is_osbuild_library(info.root)
    runner_name, runner = runners.for_module(info)

    def service_line(text: str) -> None:
        ctx.monitor.stage_output(pipeline, stage, text)

    # the header first: host services log while they set the stage up, and their lines belong to it
    if ahead is None:
        log.debug("stage.starting", stage_id=stage.id, t=round(time.monotonic(), 4))
        ctx.monitor.stage_started(pipeline, stage)
    # the stage's mounts and devices go first, then its input services, its /dev, loop devices, scratch
    async with ctx.store.stage() as scratch, open_loop_server() as loops, \
            open_dev_dir(scratch.path / "dev", osbuild_layout=from_osbuild) as devdir, \
            AsyncExitStack() as services:
        views = Views(ctx, scratch.path)
        build_root = Path("/") if build is None else views.show(build)
        binds: list[sandbox.Bind] = []
        inputs: dict[str, Any] = {}
        foreign = [inp for inp in stage.inputs.values() if inp.type not in NATIVE_INPUTS]
        # the host's own view of pipeline trees (their layers mounted read-only), for input services
        store_api = StoreApi(view_of=ctx.pins.view, store_root=ctx.store.root, empty=views.empty,
                             sources=ctx.store.sources, scratch=scratch.path)
        if foreign:
            # mapped by osbuild's input services, which read pipeline trees through the `store` endpoint
            socket_path = await services.enter_async_context(open_store_api(scratch.path / "store-api", store_api))
            input_binds, inputs = await services.enter_async_context(open_host_inputs(
                foreign, find=lambda name: ctx.library.find("Input", name), store_api=socket_path,
                root=scratch.path / "host-inputs", on_line=service_line))
            binds += input_binds
        for inp in stage.inputs.values():
            if inp.type in NATIVE_INPUTS:
                input_binds, inputs[inp.name] = map_input(
                    inp, scratch=scratch.path, tree_of=views.tree_of, file_of=views.file_of,
                    source_item=ctx.sources.path)
                binds += input_binds
        inputs = {name: inputs[name] for name in stage.inputs}  # the manifest's order
        # copying a loop device's file up into the new layer is part of the stage, as overlayfs's own
        # copy-up on a first write would be: no gap between stages
        started = time.monotonic()
        late = None
        if ahead is not None:
            tree = views.placeholder()
            late = mountns.LateTree(tree)
        elif layered and below is not None:
            assert entry is not None
            await anyio.to_thread.run_sync(overlay.copy_attributes, below.layers[0], entry.tree)
            for name in loopback_files(stage):
                resolved = overlay.resolve(below.layers, name)
                if resolved is None:
                    # it leads out of the tree: the link itself comes up, for the device's own check
                    # to refuse it by name ("outside the tree"), as on one plain directory
                    parts = [p for p in name.split("/") if p not in ("", ".")]
                    resolved = "/".join(parts) if ".." not in parts else None
                if resolved:
                    await overlay.copy_up(below.layers, entry.tree, resolved)
            tree = views.tree(below, entry.tree)
        else:
            # flat, or the pipeline's first stage: with nothing below, its new layer is its whole tree,
            # and an overlay mount would only make every file operation of the stage slower
            assert entry is not None
            tree = entry.tree
        async with open_devices(stage.devices, tree=tree if entry is None else entry.tree, devdir=devdir, loops=loops,
                                find=lambda name: ctx.library.find("Device", name),
                                on_line=service_line) as devices, \
                AsyncExitStack() as host_mounts:
            by_service, native_mounts = split_mounts(stage.mounts, lambda name: name in FSTYPES)
            mounts: dict[str, Any] = {}
            if by_service:
                # mounted on the host by osbuild's services, seen through a bind of their root, as in osbuild;
                # native ones are made in the sandbox on top of them. The services read and mount into the
                # tree the stage sees: layered, that is the merged overlay, so it is mounted on the host for
                # them (and the sandbox binds it) rather than in the stage's namespace
                if layered:
                    tree = await host_mounts.enter_async_context(
                        open_host_tree(views.take_tree(), ctx.store.root, service_line))
                root = scratch.path / "mounts"
                os.mkdir(root)
                mounts = await host_mounts.enter_async_context(open_host_mounts(
                    by_service, find=lambda name: ctx.library.find("Mount", name), devices=devices,
                    root=root, tree=tree, on_line=service_line))
                binds.append(sandbox.Bind(root, sandbox.MOUNTS, read_only=False))
            mount_plan, native_arguments = plan_mounts(native_mounts, devices)
            mounts.update(native_arguments)
            mounts = {m.name: mounts[m.name] for m in stage.mounts}  # the manifest's order
            meta: dict[str, Any] = {"id": stage.id}
            env = {}
            if mount_plan:
                env[MOUNTS_ENV] = json.dumps(mount_plan)
            if pipeline.source_epoch is not None:
                meta["source-epoch"] = pipeline.source_epoch
                env["SOURCE_DATE_EPOCH"] = str(pipeline.source_epoch)
            arguments = {"tree": sandbox.TREE,
                         "paths": {"devices": "/dev", "inputs": sandbox.INPUTS, "mounts": sandbox.MOUNTS},
                         "devices": devices, "inputs": inputs, "mounts": mounts, "options": stage.options,
                         "meta": meta}
            timeout = ctx.options.stage_timeout
            timing: list[anyio.CancelScope] = []
            attached = anyio.Event()

            async def attach() -> None:
                """The stage's turn: its tree mounted where its sandbox sees it, as soon as it is taken
                (while its sandbox may still be starting); its time and --stage-timeout begin."""
                nonlocal started
                assert ahead is not None
                assert late is not None
                await ahead.opened.wait()
                assert ahead.entry is not None
                assert ahead.below is not None
                ahead.begun = True
                await late.attach(*views.late_tree(ahead.below, ahead.entry.tree), before=functools.partial(
                    overlay.copy_attributes, ahead.below.layers[0], ahead.entry.tree))
                started = time.monotonic()
                if timeout is not None and timing:
                    timing[0].deadline = anyio.current_time() + timeout
                attached.set()

            async def turn() -> None:
                """The stage's first word, or its end: it is reported started once its tree is there."""
                await attached.wait()
                log.debug("stage.starting", stage_id=stage.id, t=round(started, 4), ahead=True)
                ctx.monitor.stage_started(pipeline, stage)

            # the store endpoint's binds of pipeline trees stay in the sandbox, and leave the host once it has
            # them, so that a killed engine leaves them nowhere
            session = StageSession(ctx, pipeline, stage, arguments, loops=loops, devdir=devdir,
                                   on_set_up=store_api.release if store_api.binds else None,
                                   gate=turn if ahead is not None else None)
            contract = osbuild_contract(scratch.path, info, arguments, bool(mount_plan)) if from_osbuild else None
            # osbuild's runners make their own accounts in the sandbox
            accounts = await runners.accounts(build, scratch.path) if contract is None else None
            spec = sandbox.SandboxSpec(
                build_root=build_root, tree=tree, executable=info.path, runner=runner, runner_name=runner_name,
                dev=devdir.path, binds=tuple(binds), env=env, osbuild=contract,
                capabilities=tuple(sorted(info.capabilities)),
                root_entries=None if build is None or build.flat else root_entries(build), accounts=accounts)
            namespace = views.namespace(sandbox.sources(spec), late)
            if not devdir.on_host:  # attached only where bwrap runs: an engine's death leaves it nowhere
                namespace = dataclasses.replace(namespace or mountns.MountNamespace.bare(),
                                                dev=(devdir.fd, os.fspath(devdir.path)))
            spec = dataclasses.replace(spec, namespace=namespace)
            reason = ""
            try:
                # started ahead, the stage's time begins with its turn (`attach`)
                with anyio.fail_after(None if ahead is not None else timeout) as scope:
                    timing.append(scope)
                    if ahead is not None:
                        async with anyio.create_task_group() as attaching:
                            attaching.start_soon(attach)
                            returncode = await sandbox.run(spec, handlers=session.handlers(),
                                                           on_line=session.output_line, on_set_up=session.on_set_up)
                            attaching.cancel_scope.cancel()
                        if attached.is_set():
                            await session.begin()  # it ran with its tree, whether or not it spoke
                    elif contract is None:
                        returncode = await sandbox.run(spec, handlers=session.handlers(),
                                                       on_line=session.output_line, on_set_up=session.on_set_up)
                    else:
                        returncode = await run_osbuild_module(spec, contract, session)
            except TimeoutError:
                returncode, reason = -1, f"timed out after {ctx.options.stage_timeout:g}s (--stage-timeout)"
    if not session.begun:
        return None  # started ahead, it ended before it had its tree: it is run again the usual way
    if returncode != 0 and not reason:
        reason = explain_status(returncode)
        if session.exception:
            data = session.exception["data"]
            if data.get("type") == RUNNER_ERROR:
                reason = f"could not be run: {data.get('value')}"
            else:
                reason += f": {data.get('type')}: {data.get('value')}"
    return StageResult(id=stage.id, type=stage.type, success=returncode == 0, output=session.output,
                       duration=time.monotonic() - started, metadata=session.metadata,
                       error=session.exception, reason=reason), session.output_tail()


async def run_osbuild_module(spec: sandbox.SandboxSpec, contract: sandbox.OsbuildSandbox,
                             session: StageSession) -> int:
    """Run a module of an osbuild library with osbuild's endpoints served; its metadata from its meta file."""

    def on_exception(data: dict[str, Any]) -> None:
        session.exception = {"type": "exception", "data": data}

    async with osbuild_api.open_api(contract.api, on_exception=on_exception, loops=session.loops) as api:
        returncode = await sandbox.run(spec, handlers={}, on_line=session.output_line,
                                       on_dev_bound=session.devdir.leave_host_soon, on_set_up=session.on_set_up)
        await api.drain()
    session.metadata.update(osbuild_api.read_metadata(contract.meta))
    return returncode


def loopback_files(stage: Stage) -> list[str]:
    """The tree's files the stage's loop devices are backed by: the engine opens them itself."""
    return [str(device.options["filename"]) for device in stage.devices.values()
            if device.type == "org.osbuild.loopback" and device.options.get("filename")]


def clamp_mtimes(tree: Path, epoch: int) -> None:
    """Pin every mtime newer than the source epoch to it, for reproducible trees."""
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_mtime > epoch:
                os.utime(path, (epoch, epoch), follow_symlinks=False)
    if os.lstat(tree).st_mtime > epoch:
        os.utime(tree, (epoch, epoch))


def report_restored(ctx: BuildContext, pipeline: Pipeline, cached_id: str) -> list[dict[str, Any]]:
    """Report the stages up to the cached one as they were; their result records."""
    stages = {stage.id: stage for stage in pipeline.stages}
    records = list(ctx.pins.results(cached_id))
    for record in records:
        result = StageResult.from_record(record)
        if result.id in stages:
            ctx.monitor.stage_finished(pipeline, stages[result.id], result)
    return records


async def restore_flat(ctx: BuildContext, pipeline: Pipeline, resume: int, entry: NewEntry) -> None:
    """Start a flat entry from the newest cached stage (a copy of its tree)."""
    cached_id = pipeline.stages[resume - 1].id
    await ctx.store.copy_view(ctx.pins.view(cached_id), entry.tree, f"cannot resume from {cached_id}")
    await ctx.store.copy(ctx.pins.get(cached_id).meta, entry.meta, f"cannot resume from {cached_id}")
    entry.results += report_restored(ctx, pipeline, cached_id)


def keep_after(ctx: BuildContext, pipeline: Pipeline, stage: Stage) -> bool:
    """Whether the tree after `stage` is kept besides the pipeline's final tree: where `--checkpoint`
    asks, and always before the last stage, so that a change to the last stage reruns that stage alone
    rather than the whole pipeline (at the price of one copy of the tree per pipeline built)."""
    if stage is pipeline.stages[-1]:
        return False
    return stage.id in ctx.options.checkpoints or stage is pipeline.stages[-2]


async def checkpoint(ctx: BuildContext, pipeline: Pipeline, stage: Stage, entry: NewEntry) -> None:
    """Commit a copy of the entry as it is after `stage`, which the pipeline goes on building on.

    A checkpoint is a keep for later builds, never needed by this one, so failing to store it (a full
    store, any store error) never fails the build: the build goes on without it and says so, as it does
    when a tree is larger than the bound. That holds for the automatic copy before the last stage and
    for a `--checkpoint` the user asked for alike; the latter is also warned about on stderr, so that it
    is seen with `--json` or `--quiet` too.
    """
    if ctx.store.contains(stage.id):
        return
    try:
        async with ctx.store.store(stage.id, flat=True) as copy:
            await ctx.store.copy(entry.tree, copy.tree, f"cannot store checkpoint {stage.id}")
            await ctx.store.copy(entry.meta, copy.meta, f"cannot store checkpoint {stage.id}")
            copy.results = list(entry.results)
    except (StoreError, CommandError) as exc:
        asked = stage.id in ctx.options.checkpoints
        which = "asked for with --checkpoint" if asked else "before the last stage"
        message = (f"warning: the tree after {stage.type} {stage.id} ({which}) is not kept, "
                   f"the build goes on without it: {exc}")
        if asked:
            log.warning("checkpoint.not_kept", stage=stage.type, stage_id=stage.id, error=str(exc))
        else:
            log.debug("store.optional_keep_failed", stage_id=stage.id, error=str(exc))
        ctx.monitor.log(message, pipeline)
        return
    report_outcome(ctx, pipeline, copy, f"checkpoint {stage.type} {stage.id}")


def report_outcome(ctx: BuildContext, pipeline: Pipeline, entry: NewEntry, what: str) -> None:
    """Tell people when a tree was not stored, and why: they may want a larger bound."""
    log.debug("store.outcome", what=what, outcome=entry.outcome, size=entry.size)
    if entry.outcome == STORED:
        return
    limit = format_size(ctx.store.limits().max_size)
    message = {
        EXISTS: f"another build stored {what} first; this copy is discarded",
        TOO_LARGE: f"{what} is not stored: its tree ({format_size(entry.size)}) is larger than the cache "
                   f"bound ({limit}); raise it with --cache-max-size",
        NO_ROOM: f"{what} is not stored: the cache bound ({limit}) is taken by trees that running builds "
                 "are using",
        UNSTORED_BELOW: f"{what} is not stored: a layer below it is not stored either",
    }[str(entry.outcome)]
    ctx.monitor.log(message, pipeline)


async def build_pipeline(ctx: BuildContext, pipeline: Pipeline, resume: int) -> None:
    """Run the stages of `pipeline` after index `resume`; the tree after its last one is its tree."""
    assert pipeline.id is not None
    build = None if pipeline.build is None else ctx.pins.view(pipeline.build)
    runners = Runners(ctx, wanted_runner(ctx, pipeline))
    if build is not None:
        found = (ctx.library.find(stage.kind, stage.type) for stage in pipeline.stages[resume:])
        buildroot.check(ctx.manifest, pipeline, build.layers,
                        (runners.for_module(info) for info in found if info is not None))
    ctx.monitor.pipeline_started(pipeline, build_root=str(pipeline.build or "<host>"), runner=runners.shown(pipeline))
    if os.environ.get(FLAT_ENV) == "1":
        await build_flat(ctx, pipeline, resume, build, runners)
    else:
        await build_layers(ctx, pipeline, resume, build, runners)
    ctx.monitor.pipeline_finished(pipeline, success=True)


async def run_and_check(ctx: BuildContext, pipeline: Pipeline, stage: Stage, entry: NewEntry,
                        below: TreeView | None, build: TreeView | None, runners: Runners, *,
                        layered: bool, ahead: Ahead | None = None,
                        check: LayerCheck | None = None) -> StageResult | None:
    """Run a stage (or take it, started `ahead`); a failure ends the pipeline with a StageError. None: the
    stage ran on a bottom layer that its `check` found it saw wrong (and made right): run it again on a
    fresh layer."""
    outcome = None
    if ahead is not None:
        assert below is not None  # a stage is started ahead only above another one
        outcome = await ahead.take(entry, below)
        if outcome is None:
            log.debug("stage.ahead_unused", stage_id=stage.id)  # it ended before it had its tree: run again
    if outcome is None:
        await ctx.sources.wait_for(stage.source_refs())
        outcome = await run_stage(ctx, pipeline, stage, entry, below, build, runners, layered=layered)
    assert outcome is not None
    result, tail = outcome
    if check is not None and not await check.stands():
        ctx.monitor.log(f"{stage.type} runs again: the tree below it held xattrs named like overlayfs's own, "
                        "now escaped\n", pipeline)
        return None
    ctx.monitor.stage_finished(pipeline, stage, result)
    log.debug("stage.finished", t=round(time.monotonic(), 4), pipeline=pipeline.name, stage=stage.type,
              stage_id=stage.id, duration=result.duration, success=result.success)
    if not result.success:
        ctx.monitor.pipeline_finished(pipeline, success=False)
        raise StageError(pipeline=pipeline.name, stage=stage.type, stage_id=stage.id,
                         reason=result.reason, output_tail=tail)
    try:
        entry.add_result(result.to_record())
    except OSError as exc:
        raise ctx.store.write_error(f"cannot keep the metadata of stage {stage.id}", exc) from exc
    return result


async def build_layers(ctx: BuildContext, pipeline: Pipeline, resume: int, build: TreeView | None,
                       runners: Runners) -> None:
    """Each stage a layer over the ones before, committed under the stage's id: nothing is copied.

    The next stage's sandbox starts while a stage runs and is committed (`Ahead`). The bottom layer of a
    pipeline with more stages is committed pending and checked beside the second stage (`layercheck`);
    the second stage's commit waits for that check."""
    below_id = pipeline.stages[resume - 1].id if resume else None
    records = report_restored(ctx, pipeline, below_id) if below_id else []
    stages = pipeline.stages[resume:]
    check: LayerCheck | None = None
    async with anyio.create_task_group() as background:
        try:
            ahead: Ahead | None = None
            for index, stage in enumerate(stages):
                if check is None and below_id is not None and len(ctx.pins.stack(below_id)) >= overlay.MAX_LAYERS:
                    below_id = await squash(ctx, pipeline, below_id)
                # the next stage's sandbox starts now, while this one runs and is committed
                mine, ahead = ahead, None
                if index + 1 < len(stages) and starts_ahead(ctx, stages[index + 1]):
                    ahead = Ahead(stage=stages[index + 1])
                    background.start_soon(run_ahead, ctx, pipeline, ahead, build, runners)
                entry = await build_layer(ctx, pipeline, stage, below_id, check, records, build, runners, mine)
                check = None
                if entry.pending and entry.outcome == STORED:  # else the winner's copy, or ours made plain
                    report = (functools.partial(report_outcome, ctx, pipeline, entry, layer_name(stage))
                              if stage.id in ctx.options.checkpoints else None)
                    check = LayerCheck(ctx, stage.id, entry, report)
                    background.start_soon(check.run)
                records, below_id = list(entry.results), stage.id
        finally:
            if check is not None:
                await check.finish()  # the stage above it failed or was cancelled: the layer is kept


async def build_layer(ctx: BuildContext, pipeline: Pipeline, stage: Stage, below_id: str | None,
                      check: LayerCheck | None, records: list[dict[str, Any]], build: TreeView | None,
                      runners: Runners, ahead: Ahead | None) -> NewEntry:
    """Run one stage on a new layer over `below_id` (or over the pending bottom layer `check` walks,
    which it finishes), or take it from `ahead`, and commit it; the bottom layer of a longer pipeline is
    committed pending. A stage run again after its check runs the usual way."""
    stack = (check.id,) if check else ctx.pins.stack(below_id) if below_id else ()
    stored_below = all(not ctx.pins.floating(i) for i in stack)
    last = stage is pipeline.stages[-1]
    async with ctx.store.store(stage.id, keep=ctx.pins, layers=stack, commit=stored_below) as entry:
        entry.results, entry.pipeline = list(records), pipeline.name
        below = check.view if check else ctx.pins.view(below_id) if below_id else None
        while await run_and_check(ctx, pipeline, stage, entry, below, build, runners, layered=True,
                                  ahead=ahead, check=check) is None:
            ahead = None
            await anyio.to_thread.run_sync(fresh_layer, entry.tree)
        if check is not None:
            await check.finish()
            entry.unstored_below = ctx.pins.floating(check.id)
            below = ctx.pins.view(check.id)
        if below is not None:
            await anyio.to_thread.run_sync(overlay.relink_copied_up, below.layers, entry.tree)
        elif not last and pipeline.source_epoch is None:
            entry.pending = True  # checked beside the next stage (clamping mtimes would walk it first anyway)
        else:
            started = time.monotonic()
            plain = await anyio.to_thread.run_sync(overlay.make_plain, entry.tree)
            entry.flat, entry.tree_size = plain.readable, plain.size
            log.debug("layer.plain", stage_id=stage.id, ms=round((time.monotonic() - started) * 1000, 1))
        if pipeline.source_epoch is not None:
            await anyio.to_thread.run_sync(clamp_mtimes, entry.tree, pipeline.source_epoch)
        committing = time.monotonic()
    log.debug("layer.committed", t=round(time.monotonic(), 4), stage_id=stage.id,
              ms=round((time.monotonic() - committing) * 1000, 1))
    what = f"pipeline {pipeline.name} ({pipeline.id})" if last else layer_name(stage)
    if entry.pending and entry.outcome == STORED:
        log.debug("store.outcome", what=what, outcome="pending")  # known once checked: `LayerCheck.report`
    elif last or stage.id in ctx.options.checkpoints:
        report_outcome(ctx, pipeline, entry, what)
    else:
        log.debug("store.outcome", what=what, outcome=entry.outcome, size=entry.size)
    return entry


def layer_name(stage: Stage) -> str:
    return f"the layer of {stage.type} {stage.id}"


def fresh_layer(tree: Path) -> None:
    """Empty a stage's new layer for it to run again (its root too, which a mount marks)."""
    entries.remove_contents(tree)
    os.rmdir(tree)
    os.mkdir(tree)


async def squash(ctx: BuildContext, pipeline: Pipeline, below_id: str) -> str:
    """The tree `below_id` copied into one flat entry, so the stages above it stack fewer layers."""
    squashed_id = f"{below_id}.squashed"
    if ctx.pins.try_pin(squashed_id):
        return squashed_id
    async with ctx.store.store(squashed_id, keep=ctx.pins, flat=True) as entry:
        await ctx.store.copy_view(ctx.pins.view(below_id), entry.tree, f"cannot squash {below_id}")
        # a stage's own trusted.overlay.* xattrs come out of the mount as they are: escaped again here
        plain = await anyio.to_thread.run_sync(overlay.make_plain, entry.tree)
        entry.flat, entry.tree_size = plain.readable, plain.size
        entry.results, entry.pipeline = list(ctx.pins.results(below_id)), pipeline.name
    report_outcome(ctx, pipeline, entry, f"the squashed tree of {below_id}")
    return squashed_id


async def build_flat(ctx: BuildContext, pipeline: Pipeline, resume: int, build: TreeView | None,
                     runners: Runners) -> None:
    """The whole pipeline in one directory, committed under the pipeline's id (AOSBUILD_FLAT)."""
    assert pipeline.id is not None
    async with ctx.store.store(pipeline.id, keep=ctx.pins, flat=True) as entry:
        entry.pipeline = pipeline.name
        if resume:
            await restore_flat(ctx, pipeline, resume, entry)
        for stage in pipeline.stages[resume:]:
            await run_and_check(ctx, pipeline, stage, entry, None, build, runners, layered=False)
            if keep_after(ctx, pipeline, stage):
                await checkpoint(ctx, pipeline, stage, entry)
        if pipeline.source_epoch is not None:
            await anyio.to_thread.run_sync(clamp_mtimes, entry.tree, pipeline.source_epoch)
    report_outcome(ctx, pipeline, entry, f"pipeline {pipeline.name} ({pipeline.id})")
