"""The store's second tier: stage images in OCI registries (`--cache-remote`), pulled before building a
stage that is not in the local store, pushed after a successful build.

The local store stays the source of truth of a running build: what is pulled becomes ordinary committed
entries (same locks, pins and eviction as entries built here), each made in a staging entry under the
store and committed by rename, and only after every blob it needs has been downloaded and verified, so a
failed pull leaves nothing behind. The remote is optional at every moment: a registry that cannot be
reached, is slow or serves bad bytes is said once (a warning on the monitor and on stderr) and not used
again in this build, which goes on locally and exits as it would have.

A stage image (`stageimage`: tag `stage-<id>`) holds the whole tree after that stage, lowest layer first.
Its config's `aosbuild` key says which store entry each layer is (`stack`: ids bottom first, `flat` for
a whole tree) and carries the results of every stage up to it (`results`), so each pulled layer is
committed under its own stage id with the results the build that made it reported. Which layers a
push sends (the store's, or the lower ones flattened into one) is `layerchoice`'s.

`fetch_newest` (pull a pipeline's newest remote stage past its resume point) and `push_stages` are the
two entry points a scheduler needs; `pull_ahead` and `push_built` are the local engine's use of them.
"""

from __future__ import annotations

import os
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import zstandard

from . import formats, layerchoice, ocilayer, stageimage
from .errors import AosbuildError, StoreError
from .logs import get_logger
from .manifest import Pipeline
from .process import CommandError
from .registry import (
    DIGEST_RE,
    MANIFEST_TYPE,
    Reference,
    RegistryClient,
    RegistryError,
    RegistryOptions,
    RemoteMiss,
    open_registry,
)
from .remotesettings import RemoteSettings
from .sizes import format_size

if TYPE_CHECKING:
    from .context import BuildContext
    from .planner import Plan, Step

log = get_logger(__name__)

PROBES = 4  # manifest lookups in flight at once, per build
SOURCE_TAG = "source-"
SOURCE_TYPE = "application/vnd.aosbuild.source.v1"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"  # OCI 1.1's empty config of an artifact
EMPTY_CONFIG = b"{}"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def check_ref(text: str) -> str:
    """A reference as the user wrote it, checked: HOST[:PORT]/REPOSITORY, no tag, no credentials."""
    ref = Reference.parse(text)
    if "@" in ref.registry:
        raise RegistryError(f"a remote cache is named HOST[:PORT]/REPOSITORY, without credentials: put them in "
                            f"an auth file (`skopeo login {ref.registry.rpartition('@')[2]}`)")
    if ref.tag is not None:
        raise RegistryError(f"{text!r}: a remote cache is a repository, without a tag (aosbuild tags its "
                            "stages itself)")
    return text


@dataclass
class Remote:
    """One registry repository as this build uses it; `usable` goes False after its first failure."""

    name: str
    client: RegistryClient
    usable: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Hit:
    """A remote that has the image of one of a pipeline's stages."""

    remote: Remote
    index: int  # the stages of the pipeline the image holds (its last one is stages[index - 1])


class RemoteCache:
    """The registries of one build, and what went to and from them."""

    def __init__(self, settings: RemoteSettings, remotes: list[Remote], warn: Callable[[str], None]) -> None:
        self.settings = settings
        self.remotes = remotes
        self._warn = warn
        self._probes = anyio.CapacityLimiter(PROBES)
        self.bytes_pulled = 0
        self.bytes_pushed = 0
        self.stages_pulled = 0
        self.images_pushed = 0
        self.sources_pushed = 0

    @property
    def readers(self) -> list[Remote]:
        """The remotes pulled from, in order: those that have not failed in this build."""
        return [r for r in self.remotes if r.usable]

    @property
    def writer(self) -> Remote | None:
        """The remote pushed to (the first), unless it has failed or `--cache-push none` says not to."""
        remote = self.remotes[0]
        return remote if remote.usable and self.settings.push != "none" else None

    def give_up(self, remote: Remote, what: str, exc: BaseException, then: str = "building locally") -> None:
        """Say once why `remote` is no use any more, and stop using it in this build."""
        if not remote.usable:
            return
        remote.usable = False
        self._warn(f"warning: remote cache {remote.name}: {what}: {exc}; {then}, and not using this remote "
                   "again in this build")

    # -- pulling ---------------------------------------------------------------------------------------

    async def find_newest(self, pipeline: Pipeline, resume: int) -> Hit | None:
        """The remote image of the pipeline's newest stage past `resume` (probing tags from the last stage
        backwards, a few at once), the first remote winning a tie."""
        found: list[Hit] = []

        async def probe(remote: Remote, index: int) -> None:
            async with self._probes:
                if not remote.usable:
                    return
                try:
                    if await remote.client.has_manifest(stageimage.stage_tag(pipeline.stages[index - 1].id)):
                        found.append(Hit(remote=remote, index=index))
                except RegistryError as exc:
                    self.give_up(remote, f"cannot look up pipeline {pipeline.name}", exc)

        async with anyio.create_task_group() as tg:
            for remote in self.readers:
                for index in range(len(pipeline.stages), resume, -1):
                    tg.start_soon(probe, remote, index)
        order = {id(r): n for n, r in enumerate(self.remotes)}
        usable = [h for h in found if h.remote.usable]
        return max(usable, key=lambda h: (h.index, -order[id(h.remote)]), default=None)

    async def fetch_newest(self, ctx: BuildContext, pipeline: Pipeline, resume: int, hit: Hit | None = None) -> int:
        """Pull the newest stage of `pipeline` a remote has past `resume` into the store (pinned for the
        build); the new resume point, or `resume` when there is none or the pull fails (said once)."""
        if resume >= len(pipeline.stages):
            return resume
        if hit is None:
            hit = await self.find_newest(pipeline, resume)
        if hit is None or hit.index <= resume or not hit.remote.usable:
            return resume
        stage = pipeline.stages[hit.index - 1]
        try:
            pulled, size = await self.pull(ctx, hit.remote, stage.id, pipeline)
        except (RegistryError, ocilayer.LayerError) as exc:  # a miss, refused credentials, a layer unsafe to unpack
            self.give_up(hit.remote, f"cannot pull {stage.type} {stage.id}", exc)
            return resume
        if not ctx.pins.try_pin(stage.id):
            return resume
        self.stages_pulled += 1
        ctx.monitor.log(f"remote cache hit: pipeline {pipeline.name} up to {stage.type} {stage.id}, from "
                        f"{hit.remote.name} ({pulled} layers, {format_size(size)} pulled)\n", pipeline)
        log.info("remote.hit", pipeline=pipeline.name, stage_id=stage.id, remote=hit.remote.name, layers=pulled,
                 bytes=size)
        return hit.index

    async def pull(self, ctx: BuildContext, remote: Remote, stage_id: str, pipeline: Pipeline) -> tuple[int, int]:
        """Fetch stage `stage_id`'s image and commit the layers the store lacks; (layers, bytes) pulled.

        Every blob is downloaded and verified (into scratch space under the store) before the first
        entry is made; a miss raises `RemoteMiss`, a layer unsafe to unpack `ocilayer.LayerError`, and
        either leaves nothing."""
        client = remote.client
        image = await stageimage.get_manifest(client, stage_id)
        async with ctx.store.stage() as scratch:
            config_path = scratch.path / "config.json"
            size = await client.fetch_blob(image.config.digest, config_path, size=image.config.size)
            stack, records = stageimage.read_config(await anyio.Path(config_path).read_bytes(), stage_id,
                                                    len(image.layers))
            check_stack(stack, records, pipeline, stage_id)
            # the layers from the topmost one this store has already (pinned with its own stack) are not pulled
            have = next((n for n in range(len(stack) - 1, -1, -1) if ctx.pins.try_pin(stack[n][0])), -1)
            below: tuple[str, ...] = ctx.pins.stack(stack[have][0]) if have >= 0 else ()
            blobs: list[Path] = []
            for n in range(have + 1, len(stack)):
                path = scratch.path / f"layer-{n}"
                size += await client.fetch_blob(image.layers[n].digest, path, size=image.layers[n].size)
                blobs.append(path)
            self.bytes_pulled += size
            for n, blob in zip(range(have + 1, len(stack)), blobs, strict=True):
                entry_id, flat = stack[n]
                await commit_layer(ctx, entry_id, flat, blob, below, records, pipeline)
                below = ctx.pins.stack(entry_id)
        return len(blobs), size

    async def fetch_source(self, checksum: str, target: Path, *, most: int | None = None) -> str | None:
        """Fetch a source item (a sha256 blob) from the first remote that has it, verified, to `target`;
        the remote's name, or None if none has it (a plain miss is no warning; a broken remote is). A
        source has no size to check its body against: `most` (the store's bound of sources) ends one
        that runs on."""
        if not DIGEST_RE.fullmatch(checksum):
            return None
        for remote in self.readers:
            try:
                size = await remote.client.fetch_blob(checksum, target, size=most)
            except RegistryError as exc:
                if not (isinstance(exc, RemoteMiss) and exc.reason == "not in the registry"):
                    self.give_up(remote, f"cannot fetch source item {checksum}", exc, "fetching it from its URL")
                continue
            self.bytes_pulled += size
            return remote.name
        return None

    # -- pushing ---------------------------------------------------------------------------------------

    async def push_stages(self, ctx: BuildContext, stage_ids: Sequence[str]) -> None:
        """Push the image of each stage (pinned in `ctx`) to the first remote, unless it is there; a
        failure is said once and ends the pushing."""
        remote = self.writer
        if remote is None:
            return
        try:
            async with ctx.store.stage() as scratch:
                blobs = layerchoice.LayerBlobs(ctx, scratch.path)
                for stage_id in stage_ids:
                    tag = stageimage.stage_tag(stage_id)
                    if await remote.client.has_manifest(tag):
                        continue
                    stack = ctx.pins.stack(stage_id)
                    layers = await blobs.for_stack(stack)
                    for layer in layers:
                        started = time.monotonic()
                        if await remote.client.push_blob(layer.info.digest, layer.blob):
                            self.bytes_pushed += layer.info.size
                            log.debug("remote.layer.uploaded", digest=layer.info.digest, size=layer.info.size,
                                      seconds=round(time.monotonic() - started, 3))
                    await stageimage.push_image(remote.client, stage_id, [layer.info for layer in layers],
                                                [(layer.entry_id, layer.flat) for layer in layers],
                                                ctx.pins.results(stage_id))
                    self.images_pushed += 1
        except (RegistryError, ocilayer.LayerError, StoreError, CommandError, OSError) as exc:
            self.give_up(remote, "cannot push", exc, "the build's exit code is unchanged")

    async def push_sources(self, items: Sequence[Path]) -> None:
        """Push source items (files named by their sha256) as blobs, each kept from the registry's garbage
        collection by a manifest tagged `source-<hex>` (an OCI artifact: the empty config, the item its
        one layer), unless it is there."""
        remote = self.writer
        if remote is None:
            return
        try:
            await remote.client.push_blob(EMPTY_DIGEST, EMPTY_CONFIG)
            for path in items:
                checksum = path.name.removeprefix("sha256:")
                digest, tag = f"sha256:{checksum}", SOURCE_TAG + checksum
                if not DIGEST_RE.fullmatch(digest) or await remote.client.has_manifest(tag):
                    continue
                size = (await anyio.Path(path).stat()).st_size
                if await remote.client.push_blob(digest, path):
                    self.bytes_pushed += size
                await remote.client.put_manifest(tag, source_manifest(digest, size))
                self.sources_pushed += 1
        except (RegistryError, OSError) as exc:
            self.give_up(remote, "cannot push source items", exc, "the build's exit code is unchanged")


def source_manifest(digest: str, size: int) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": SOURCE_TYPE,
            "config": {"mediaType": EMPTY_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY_CONFIG)},
            "layers": [{"mediaType": "application/octet-stream", "digest": digest, "size": size}]}


def check_stack(stack: stageimage.Stack, records: list[dict[str, Any]], pipeline: Pipeline, stage_id: str) -> None:
    """The entries an image of `stage_id` makes are that stage and stages before it in its pipeline, in
    order, and its results are of those stages: an image for one stage writes no entry, and no result
    (whose id names a metadata file), for any other stage of this or another manifest."""
    what = f"stage {stage_id}"
    position = {stage.id: n for n, stage in enumerate(pipeline.stages)}
    top = position.get(stage_id, -1)
    ahead = [position.get(entry_id.removesuffix(stageimage.SQUASHED), -1) for entry_id, _ in stack]
    if any(n < 0 for n in ahead) or ahead != sorted(set(ahead)) or ahead[-1] != top:
        raise RemoteMiss(what, f"its layers are not stages of pipeline {pipeline.name} up to it")
    if not all(0 <= position.get(r["id"], -1) <= top for r in records):
        raise RemoteMiss(what, f"its results are not of stages of pipeline {pipeline.name} up to it")


async def commit_layer(ctx: BuildContext, entry_id: str, flat: bool, blob: Path, below: tuple[str, ...],
                       records: list[dict[str, Any]], pipeline: Pipeline) -> None:
    """One pulled layer as a committed entry (an ordinary one: the builder's `store` and pins)."""
    if ctx.pins.try_pin(entry_id):  # another build pulled or built it meanwhile
        return
    stage_id = entry_id.removesuffix(stageimage.SQUASHED)
    upto = [r["id"] for r in records].index(stage_id) + 1
    stored_below = all(not ctx.pins.floating(i) for i in below)
    bound = ctx.store.limits().max_size  # a layer larger than the whole store is worth no pull
    async with ctx.store.store(entry_id, keep=ctx.pins, layers=() if flat else below, flat=flat,
                               commit=stored_below) as entry:
        await anyio.to_thread.run_sync(unpack_blob, blob, entry.tree, flat, bound)
        entry.pipeline = pipeline.name
        if entry_id.endswith(stageimage.SQUASHED):  # the builder's squashed tree: the results of the stages below it
            entry.results = list(records[:upto])
        else:
            entry.results = list(records[:upto - 1])
            entry.add_result(records[upto - 1])


def unpack_blob(blob: Path, tree: Path, flat: bool, max_bytes: int | None = None) -> None:
    """A layer blob into an entry's tree; a blob that is no layer tar (its digest matched: the registry
    made it so) or that cannot be unpacked here is a `LayerError`, a failed pull, never the build's end."""
    try:
        with open(blob, "rb") as f:
            ocilayer.unpack_layer(f, tree, into="tree" if flat else "upper", max_bytes=max_bytes)
    except (OSError, EOFError, tarfile.TarError, zstandard.ZstdError, UnicodeError, ValueError) as exc:
        raise ocilayer.LayerError(os.fspath(blob), f"cannot be unpacked: {exc}") from None


@asynccontextmanager
async def open_remote_cache(settings: RemoteSettings | None, warn: Callable[[str], None], *,
                            environ: Mapping[str, str] | None = None) -> AsyncIterator[RemoteCache | None]:
    """The build's registries, each checked at once (`/v2/`): one that cannot be used is said once and
    left out. None without settings."""
    if settings is None:
        yield None
        return
    options = RegistryOptions(insecure=settings.insecure, timeout=settings.timeout)
    remotes = [Remote(name=str(Reference.parse(ref)), client=open_registry(ref, options, environ=environ))
               for ref in settings.refs]
    cache = RemoteCache(settings, remotes, warn)
    try:
        async def ping(remote: Remote) -> None:
            try:
                await remote.client.ping()
            except AosbuildError as exc:
                cache.give_up(remote, "cannot be used", exc)

        async with anyio.create_task_group() as tg:
            for remote in remotes:
                tg.start_soon(ping, remote)
        yield cache
    finally:
        with anyio.CancelScope(shield=True):
            for remote in remotes:
                await remote.client.aclose()


# -- the local engine's use ----------------------------------------------------------------------------


async def pull_ahead(ctx: BuildContext, plan: Plan, replan: Callable[[], Plan]) -> Plan:
    """Before the build: for each planned pipeline not whole in the store, pull its newest remote stage
    past its resume point; the plan made again if anything came. Pipelines that depend on others go
    first, so that a pipeline pulled whole spares pulling (or building) what only it needed."""
    remote = ctx.remote
    if remote is None or not remote.readers:
        return plan
    pending = [item for item in reversed(plan.build) if item.resume < len(item.pipeline.stages)]
    hits: dict[str, Hit] = {}

    async def find(item: Step) -> None:
        hit = await remote.find_newest(item.pipeline, item.resume)
        if hit is not None:
            hits[str(item.pipeline.id)] = hit

    async with anyio.create_task_group() as tg:
        for item in pending:
            tg.start_soon(find, item)
    pulled = False
    for item in pending:
        pipeline_id = str(item.pipeline.id)
        current = next((p for p in plan.build if p.pipeline.id == pipeline_id), None)
        hit = hits.get(pipeline_id)
        if current is None or hit is None or hit.index <= current.resume:
            continue  # no longer needed, or nothing newer remotely
        if await remote.fetch_newest(ctx, item.pipeline, current.resume, hit) > current.resume:
            plan = replan()
            pulled = True
    if pulled and formats.of(ctx.manifest).SOURCES_THROUGH_INPUTS:
        # what was pulled needs no sources: an offline builder fetches only what its stages left use
        ctx.sources.restrict({ref for item in plan.build for stage in item.pipeline.stages[item.resume:]
                              for ref in stage.source_refs()})
    return plan


def pushed_stages(ctx: BuildContext, plan: Plan) -> list[str]:
    """What `--cache-push` sends after a build, of the pipelines it built or found whole in the store:
    every stage the store holds (`all`), or each pipeline's final stage and the one before it
    (`pipelines`): as the local store keeps the tree before the last stage, so that another machine
    that changes a pipeline's last stage runs that stage alone. The image before the last shares all
    its blobs but one with the final one: it costs a config and a manifest."""
    mode = ctx.remote.settings.push if ctx.remote else "none"
    if mode == "none":
        return []
    wanted: list[str] = []
    for pipeline in [*plan.cached, *(item.pipeline for item in plan.build)]:
        stages = pipeline.stages if mode == "all" else pipeline.stages[-2:]
        wanted += [s.id for s in stages if s.id in ctx.pins and s.id not in wanted]
    return wanted


async def push_built(ctx: BuildContext, plan: Plan) -> None:
    """After a successful build (and its exports): push per `--cache-push`, and say what went."""
    remote = ctx.remote
    if remote is None:
        return
    stage_ids = pushed_stages(ctx, plan)
    if stage_ids:
        await remote.push_stages(ctx, stage_ids)
    if remote.settings.push != "none":
        await remote.push_sources([ctx.sources.path(item.checksum) for items in ctx.sources.results.values()
                                   for item in items if item.error is None])
    if remote.images_pushed or remote.sources_pushed:
        ctx.monitor.log(f"remote cache: pushed {remote.images_pushed} stage images and {remote.sources_pushed} "
                        f"source items to {remote.remotes[0].name} ({format_size(remote.bytes_pushed)} of new "
                        "blobs)\n")
    log.info("remote.pushed", images=remote.images_pushed, sources=remote.sources_pushed, bytes=remote.bytes_pushed)
