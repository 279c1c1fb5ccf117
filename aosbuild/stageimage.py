"""A stage's result in a registry, both ways: stage id -> tag -> OCI image manifest -> config + layers.

The format of the remote cache (README, "The remote cache: `--cache-remote`"). A stage's manifest is an OCI image
manifest under `stage-<id>`: its layers are the tree after the stage, lowest first (ocilayer's tars),
its config an OCI image config whose `aosbuild` key says which store entry each layer is (`stack`:
`{"id", "flat"}`, bottom first) and holds the results of the stages up to it (`results`), so a pushed
tree is also an image that container tools fetch. Manifests and configs are canonical JSON: the same
stage pushed from two machines is the same bytes, so concurrent pushes agree.

Reading is checked here, before anything is downloaded past the manifest and the config: what a
registry serves names entries in the store, so a manifest or config that is not of this format is a
`RemoteMiss` (whether the stack fits the pipeline that asked is the remote cache's check).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .ocilayer import MEDIA_TYPES, LayerInfo
from .registry import CONFIG_TYPE, DIGEST_RE, MANIFEST_TYPE, RegistryClient, RegistryError, RemoteMiss, canonical_json

STAGE_ID_ANNOTATION = "org.aosbuild.stage-id"
LAYER_TYPES = frozenset(MEDIA_TYPES.values())
STAGE_ID = re.compile(r"[0-9a-f]{64}")
SQUASHED = ".squashed"  # the builder's squashed tree of a stage: an entry id beside the stage's own
ENTRY_ID = re.compile(r"[0-9a-f]{64}(\.squashed)?")
CONFIG_MAX = 64 << 20  # a config holds the results of its stages: JSON, read whole

Stack = list[tuple[str, bool]]  # (entry id, flat) of each layer, bottom first


def stage_tag(stage_id: str) -> str:
    """The tag that names a stage's manifest: `stage-` and its 64-hex id (70 characters, a valid tag)."""
    if not STAGE_ID.fullmatch(stage_id):
        raise RegistryError(f"{stage_id!r} is not a stage id (64 hex digits)")
    return f"stage-{stage_id}"


# -- writing -------------------------------------------------------------------------------------------


def image_config(*, diff_ids: Sequence[str], stack: Sequence[tuple[str, bool]], results: Sequence[Mapping[str, Any]],
                 architecture: str = "amd64") -> bytes:
    """An OCI image config for a stack of layers, carrying aosbuild's `stack` and stage `results` under
    `aosbuild` (image tools ignore keys they do not know, so the image stays an image)."""
    aosbuild = {"stack": [{"id": entry_id, "flat": flat} for entry_id, flat in stack], "results": list(results)}
    return canonical_json({"architecture": architecture, "os": "linux", "config": {},
                           "rootfs": {"type": "layers", "diff_ids": list(diff_ids)}, "aosbuild": aosbuild})


def image_manifest(*, config: bytes, layers: Sequence[LayerInfo], stage_id: str) -> dict[str, Any]:
    """An OCI image manifest (schema 2) for a config blob and layers, lowest first."""
    return {
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                   "size": len(config)},
        "layers": [{"mediaType": i.media_type, "digest": i.digest, "size": i.size} for i in layers],
        "annotations": {STAGE_ID_ANNOTATION: stage_id}}


async def push_image(remote: RegistryClient, stage_id: str, layers: Sequence[LayerInfo],
                     stack: Sequence[tuple[str, bool]], results: Sequence[Mapping[str, Any]]) -> str:
    """Push the config and the manifest of a stage whose layer blobs the registry has (the caller pushes
    and counts those); the tag goes last, so it never names content that is not all there. Returns the
    manifest's digest."""
    config = image_config(diff_ids=[info.diff_id for info in layers], stack=stack, results=results)
    await remote.push_blob("sha256:" + hashlib.sha256(config).hexdigest(), config)
    manifest = image_manifest(config=config, layers=layers, stage_id=stage_id)
    return await remote.put_manifest(stage_tag(stage_id), manifest)


# -- reading -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Blob:
    """A descriptor of a manifest, checked: its size bounds the download (`fetch_blob(size=...)`)."""

    digest: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StageManifest:
    """A stage image's manifest as far as a pull needs it: its config and its layers, lowest first."""

    config: Blob
    layers: tuple[Blob, ...]


def _blob(descriptor: Any, media_types: frozenset[str] | None, most: int | None = None) -> Blob | None:
    if not isinstance(descriptor, dict) or (media_types is not None and descriptor.get("mediaType") not in media_types):
        return None
    digest, size = descriptor.get("digest"), descriptor.get("size")
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        return None
    if type(size) is not int or size < 0 or (most is not None and size > most):
        return None
    return Blob(digest=digest, size=size)


async def get_manifest(remote: RegistryClient, stage_id: str) -> StageManifest:
    """The manifest of stage `stage_id`'s image; one that is not a stage image (no layers, a descriptor
    without a digest or a size, a layer of no layer type) is a `RemoteMiss`, as is a missing one."""
    manifest, _ = await remote.get_manifest(stage_tag(stage_id))
    layers = manifest.get("layers")
    config = _blob(manifest.get("config"), None, CONFIG_MAX)
    blobs = [_blob(d, LAYER_TYPES) for d in layers] if isinstance(layers, list) else []
    if manifest.get("mediaType") != MANIFEST_TYPE or config is None or not blobs or None in blobs:
        raise RemoteMiss(f"stage {stage_id}", "its tag is not an aosbuild stage image")
    return StageManifest(config=config, layers=tuple(b for b in blobs if b is not None))


def well_formed(record: Any) -> bool:
    """A stage result as the store keeps it (`StageResult.to_record`): what a cache hit reports again."""
    return (isinstance(record, dict) and isinstance(record.get("id"), str) and STAGE_ID.fullmatch(record["id"])
            is not None and isinstance(record.get("type"), str) and isinstance(record.get("output", ""), str)
            and type(record.get("duration", 0.0)) in (int, float) and isinstance(record.get("metadata") or {}, dict))


def read_config(data: bytes, stage_id: str, count: int) -> tuple[Stack, list[dict[str, Any]]]:
    """The stack and the stage results the config of stage `stage_id`'s image (of `count` layers)
    carries, checked: ids are entry names in the store, so nothing else may pass, only the bottom layer
    may be flat, the top one is the stage, and every layer has its stage's result."""
    what = f"stage {stage_id}"
    try:
        document = json.loads(data)["aosbuild"]
        stack = [(str(item["id"]), bool(item["flat"])) for item in document["stack"]]
        records = document["results"]
    except (ValueError, KeyError, TypeError):
        raise RemoteMiss(what, "its config is not an aosbuild stage image's") from None
    if (len(stack) != count or stack[-1][0] != stage_id or not all(ENTRY_ID.fullmatch(i) for i, _ in stack)
            or any(flat for _, flat in stack[1:]) or not isinstance(records, list)
            or not all(well_formed(r) for r in records)):
        raise RemoteMiss(what, "its config does not describe its layers")
    ids = [r["id"] for r in records]
    if any(i.removesuffix(SQUASHED) not in ids for i, _ in stack):
        raise RemoteMiss(what, "its config lacks the results of some of its layers")
    return stack, records
