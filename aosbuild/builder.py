"""Building one pipeline: resume from its newest cached stage, run the rest in the sandbox, commit.

The tree is built in a staging entry of the store and committed under the pipeline's id when the last
stage succeeds; `--checkpoint`ed stages are committed on the way. A failing stage commits nothing.
Every entry keeps the results of the stages that made it, so a pipeline resumed from the store reports
the stages it did not run exactly as the build that ran them did.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import structlog

from . import osbuild_api, sandbox
from .context import BuildContext
from .devices import DevDir, open_dev_dir, open_devices
from .errors import AosbuildError, SandboxError, StageError, StoreError
from .hostservices import needs_host_services, open_host_mounts
from .inputs import map_input
from .library import choose_runner, is_osbuild_library, read_os_release
from .loop import LoopServer, open_loop_server
from .manifest import Pipeline, Stage
from .moduleinfo import ModuleInfo
from .mounts import FSTYPES, plan_mounts
from .process import CommandError, explain_status
from .results import StageResult
from .rpc import Handler, HandlerError
from .runnerlib import MOUNTS_ENV
from .store import EXISTS, NO_ROOM, STORED, TOO_LARGE, NewEntry, format_size

OUTPUT_KEEP = 1 << 20  # bytes of a stage's output kept in memory; the monitor saw it all already
ERROR_TAIL_LINES = 20

log = structlog.get_logger(__name__)


class StageSession:
    """What the engine knows while one stage runs: its output, metadata, progress and exception."""

    def __init__(self, ctx: BuildContext, pipeline: Pipeline, stage: Stage, arguments: dict[str, Any], *,
                 loops: LoopServer, devdir: DevDir) -> None:
        self.ctx = ctx
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

    def _from_inside(self, handler: Handler) -> Handler:
        async def call(params: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
            # a message from the stage means bwrap has made its mounts: its /dev need not stay on the host
            self.devdir.leave_host_soon()
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
        info = read_os_release(ctx.pins.tree(pipeline.build) / "usr/lib/os-release")
    return f"org.osbuild.{info.get('ID', 'linux')}{info.get('VERSION_ID', '').replace('.', '')}"


class Runners:
    """The runner of each stage of a pipeline: osbuild's library's own for its modules (chosen by osbuild's
    rule), aosbuild's for the others (the same distribution, closest version, else `org.osbuild.linux`)."""

    def __init__(self, ctx: BuildContext, wanted: str) -> None:
        self.ctx = ctx
        self.wanted = wanted
        distro, version = osbuild_api.runner_version(wanted.removeprefix("org.osbuild."))
        self.aosbuild_name = choose_runner(ctx.library.runner_names(), distro, str(version) if version else "")

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


def resume_point(ctx: BuildContext, pipeline: Pipeline) -> int:
    """How many stages of the pipeline are already in the store (the newest cached stage wins); that
    entry is pinned for the rest of the build."""
    for index in range(len(pipeline.stages), 0, -1):
        if ctx.pins.try_pin(pipeline.stages[index - 1].id):
            return index
    return 0


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


async def run_stage(ctx: BuildContext, pipeline: Pipeline, stage: Stage, entry: NewEntry, build_root: Path,
                    runners: Runners) -> tuple[StageResult, str]:
    """Run one stage in its sandbox, with its inputs, devices and mounts; returns its result and last lines."""
    info = ctx.library.find(stage.kind, stage.type)
    if info is None or info.path is None:
        raise SandboxError(f"{stage.kind.lower()} {stage.type} is not in the library")
    from_osbuild = is_osbuild_library(info.root)
    runner_name, runner = runners.for_module(info)
    # the stage's /dev is unmounted first, then its loop devices are detached, then its scratch removed
    async with ctx.store.stage() as scratch, open_loop_server() as loops, \
            open_dev_dir(scratch.path / "dev", osbuild_layout=from_osbuild) as devdir:
        binds: list[sandbox.Bind] = []
        inputs: dict[str, Any] = {}
        for inp in stage.inputs.values():
            input_binds, inputs[inp.name] = map_input(
                inp, scratch=scratch.path, tree_of=ctx.pins.tree, source_item=ctx.sources.path)
            binds += input_binds
        async with open_devices(stage.devices, tree=entry.tree, devdir=devdir, loops=loops) as devices, \
                AsyncExitStack() as host_mounts:
            if needs_host_services(stage.mounts, lambda name: name in FSTYPES):
                # mounted on the host by osbuild's services, seen through a bind of their root, as in osbuild
                mount_plan: list[dict[str, Any]] = []
                root = scratch.path / "mounts"
                os.mkdir(root)
                mounts = await host_mounts.enter_async_context(open_host_mounts(
                    stage.mounts, find=lambda name: ctx.library.find("Mount", name), devices=devices,
                    root=root, tree=entry.tree, on_line=lambda text: ctx.monitor.stage_output(pipeline, stage, text)))
                binds.append(sandbox.Bind(root, sandbox.MOUNTS, read_only=False))
            else:
                mount_plan, mounts = plan_mounts(stage.mounts, devices)
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
            session = StageSession(ctx, pipeline, stage, arguments, loops=loops, devdir=devdir)
            contract = osbuild_contract(scratch.path, info, arguments, bool(mount_plan)) if from_osbuild else None
            spec = sandbox.SandboxSpec(build_root=build_root, tree=entry.tree, executable=info.path,
                                       runner=runner, runner_name=runner_name, dev=devdir.path, binds=tuple(binds),
                                       env=env, osbuild=contract, capabilities=tuple(sorted(info.capabilities)))
            ctx.monitor.stage_started(pipeline, stage)
            started = time.monotonic()
            reason = ""
            try:
                with anyio.fail_after(ctx.options.stage_timeout):
                    if contract is None:
                        returncode = await sandbox.run(spec, handlers=session.handlers(),
                                                       on_line=session.output_line)
                    else:
                        returncode = await run_osbuild_module(spec, contract, session)
            except TimeoutError:
                returncode, reason = -1, f"timed out after {ctx.options.stage_timeout:g}s (--stage-timeout)"
    if returncode != 0 and not reason:
        reason = explain_status(returncode)
        if session.exception:
            data = session.exception["data"]
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
                                       on_dev_bound=session.devdir.leave_host_soon)
        await api.drain()
    session.metadata.update(osbuild_api.read_metadata(contract.meta))
    return returncode


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


async def restore(ctx: BuildContext, pipeline: Pipeline, resume: int, entry: NewEntry) -> None:
    """Start the entry from the newest cached stage, and report the stages up to it as they were."""
    cached_id = pipeline.stages[resume - 1].id
    cached = ctx.pins.get(cached_id)
    await ctx.store.copy(cached.tree, entry.tree, f"cannot resume from {cached_id}")
    await ctx.store.copy(cached.meta, entry.meta, f"cannot resume from {cached_id}")
    stages = {stage.id: stage for stage in pipeline.stages}
    for record in ctx.pins.results(cached_id):
        result = StageResult.from_record(record)
        entry.results.append(record)
        if result.id in stages:
            ctx.monitor.stage_finished(pipeline, stages[result.id], result)


def keep_after(ctx: BuildContext, pipeline: Pipeline, stage: Stage) -> bool:
    """Whether the tree after `stage` is kept besides the pipeline's final tree: where `--checkpoint`
    asks, and always before the last stage, so that a change to the last stage reruns that stage alone
    rather than the whole pipeline (at the price of one copy of the tree per pipeline built)."""
    if stage is pipeline.stages[-1]:
        return False
    return stage.id in ctx.options.checkpoints or stage is pipeline.stages[-2]


async def checkpoint(ctx: BuildContext, pipeline: Pipeline, stage: Stage, entry: NewEntry) -> None:
    """Commit a copy of the entry as it is after `stage`, which the pipeline goes on building on.

    Only a `--checkpoint` the user asked for is required. The automatic copy before the last stage is
    optional, and an optional keep never fails a build: a full store or any store error is a warning.
    """
    if ctx.store.contains(stage.id):
        return
    try:
        async with ctx.store.store(stage.id) as copy:
            await ctx.store.copy(entry.tree, copy.tree, f"cannot store checkpoint {stage.id}")
            await ctx.store.copy(entry.meta, copy.meta, f"cannot store checkpoint {stage.id}")
            copy.results = list(entry.results)
    except (StoreError, CommandError) as exc:
        if stage.id in ctx.options.checkpoints:
            raise
        log.debug("store.optional_keep_failed", stage_id=stage.id, error=str(exc))
        ctx.monitor.log(f"warning: the tree after {stage.type} {stage.id} (before the last stage) is not kept, "
                        f"the build goes on without it: {exc}", pipeline)
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
    }[str(entry.outcome)]
    ctx.monitor.log(message, pipeline)


async def build_pipeline(ctx: BuildContext, pipeline: Pipeline, resume: int) -> None:
    """Run the stages of `pipeline` after index `resume` and commit its tree under its id."""
    assert pipeline.id is not None
    build_root = Path("/") if pipeline.build is None else ctx.pins.tree(pipeline.build)
    runners = Runners(ctx, wanted_runner(ctx, pipeline))
    ctx.monitor.pipeline_started(pipeline, build_root=str(pipeline.build or "<host>"), runner=runners.shown(pipeline))
    logger = log.bind(pipeline=pipeline.name, id=pipeline.id)
    async with ctx.store.store(pipeline.id, keep=ctx.pins) as entry:
        if resume:
            await restore(ctx, pipeline, resume, entry)
        for stage in pipeline.stages[resume:]:
            await ctx.sources.wait_for(stage.source_refs())
            result, tail = await run_stage(ctx, pipeline, stage, entry, build_root, runners)
            ctx.monitor.stage_finished(pipeline, stage, result)
            logger.debug("stage.finished", stage=stage.type, stage_id=stage.id, duration=result.duration,
                         success=result.success)
            if not result.success:
                ctx.monitor.pipeline_finished(pipeline, success=False)
                raise StageError(pipeline=pipeline.name, stage=stage.type, stage_id=stage.id,
                                 reason=result.reason, output_tail=tail)
            try:
                entry.add_result(result.to_record())
            except OSError as exc:
                raise ctx.store.write_error(f"cannot keep the metadata of stage {stage.id}", exc) from exc
            if keep_after(ctx, pipeline, stage):
                await checkpoint(ctx, pipeline, stage, entry)
        if pipeline.source_epoch is not None:
            await anyio.to_thread.run_sync(clamp_mtimes, entry.tree, pipeline.source_epoch)
    report_outcome(ctx, pipeline, entry, f"pipeline {pipeline.name} ({pipeline.id})")
    ctx.monitor.pipeline_finished(pipeline, success=True)
