"""A stage's result in a registry: stage id -> tag -> OCI image manifest -> config (results) + layers.

The format of the remote cache (README, "The remote cache's format"). A stage's manifest is an OCI image
manifest under `stage-<id>`: its layers are the stage's tree, lowest first (ocilayer's tars), its config
an OCI image config whose `aosbuild` key holds the stage's results, so a pushed tree is also an image
that container tools fetch. Manifests and configs are canonical JSON: the same stage pushed from two
machines is the same bytes, so concurrent pushes agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from .ocilayer import MEDIA_TYPES, LayerInfo
from .registry import CONFIG_TYPE, DIGEST_RE, MANIFEST_TYPE, RegistryClient, RegistryError, RemoteMiss, canonical_json

STAGE_ID_ANNOTATION = "org.aosbuild.stage-id"
LAYER_TYPES = frozenset(MEDIA_TYPES.values())


def stage_tag(stage_id: str) -> str:
    """The tag that names a stage's manifest: `stage-` and its 64-hex id (70 characters, a valid tag)."""
    if not re.fullmatch(r"[0-9a-f]{64}", stage_id):
        raise RegistryError(f"{stage_id!r} is not a stage id (64 hex digits)")
    return f"stage-{stage_id}"


def image_config(*, diff_ids: Sequence[str], results: Mapping[str, Any], architecture: str = "amd64") -> bytes:
    """An OCI image config for a stack of layers, carrying aosbuild's stage results under `aosbuild`
    (image tools ignore keys they do not know, so the image stays an image)."""
    return canonical_json({"architecture": architecture, "os": "linux", "config": {},
                           "rootfs": {"type": "layers", "diff_ids": list(diff_ids)}, "aosbuild": dict(results)})


def image_manifest(*, config: bytes, layers: Sequence[LayerInfo], stage_id: str) -> dict[str, Any]:
    """An OCI image manifest (schema 2) for a config blob and layers, lowest first."""
    return {
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                   "size": len(config)},
        "layers": [{"mediaType": i.media_type, "digest": i.digest, "size": i.size} for i in layers],
        "annotations": {STAGE_ID_ANNOTATION: stage_id}}


async def push_stage(remote: RegistryClient, stage_id: str, layers: Sequence[tuple[Path, LayerInfo]],
                     results: Mapping[str, Any], *, architecture: str = "amd64") -> str:
    """Push a stage's layers (blob files and what `write_layer` said of them), then its image
    (`push_image`). Returns the manifest's digest."""
    for path, info in layers:
        await remote.push_blob(info.digest, path)
    return await push_image(remote, stage_id, [info for _, info in layers], results, architecture=architecture)


async def push_image(remote: RegistryClient, stage_id: str, layers: Sequence[LayerInfo], results: Mapping[str, Any],
                     *, architecture: str = "amd64") -> str:
    """Push the config and the manifest of a stage whose layer blobs the registry has; the tag goes
    last, so it never names content that is not all there. Returns the manifest's digest."""
    config = image_config(diff_ids=[info.diff_id for info in layers], results=results, architecture=architecture)
    await remote.push_blob("sha256:" + hashlib.sha256(config).hexdigest(), config)
    manifest = image_manifest(config=config, layers=layers, stage_id=stage_id)
    return await remote.put_manifest(stage_tag(stage_id), manifest)


@dataclass(frozen=True, slots=True, kw_only=True)
class PulledStage:
    results: dict[str, Any]
    layers: tuple[Path, ...]  # the downloaded, verified layer blobs, lowest first
    manifest_digest: str


async def pull_stage(remote: RegistryClient, stage_id: str, directory: Path) -> PulledStage:
    """Fetch a stage's manifest, results and layer blobs into `directory`, each verified by its digest.

    Anything missing, corrupt or not of this format is a `RemoteMiss`, and then nothing this call
    downloaded is left in `directory`."""
    tag = stage_tag(stage_id)
    manifest, digest = await remote.get_manifest(tag)
    what = f"stage {stage_id}"
    layers = manifest.get("layers")
    config = manifest.get("config")
    if (manifest.get("mediaType") != MANIFEST_TYPE or not isinstance(layers, list) or not isinstance(config, dict)
            or not DIGEST_RE.fullmatch(str(config.get("digest")))
            or any(not isinstance(d, dict) or d.get("mediaType") not in LAYER_TYPES
                   or not DIGEST_RE.fullmatch(str(d.get("digest"))) for d in layers)):
        raise RemoteMiss(what, f"{tag} is not an aosbuild stage image")
    fetched: list[Path] = []
    try:
        config_path = directory / "config.json"
        await remote.fetch_blob(str(config.get("digest")), config_path)
        fetched.append(config_path)
        try:
            document = json.loads(await anyio.Path(config_path).read_bytes())
            valid = isinstance(document["aosbuild"], dict) and len(document["rootfs"]["diff_ids"]) == len(layers)
        except (ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            raise RemoteMiss(what, "its config is not an aosbuild stage's")
        for index, descriptor in enumerate(layers):
            path = directory / f"layer-{index}"
            await remote.fetch_blob(str(descriptor.get("digest")), path)
            fetched.append(path)
    except BaseException:
        for path in fetched:
            os.unlink(path)
        raise
    os.unlink(config_path)
    return PulledStage(results=document["aosbuild"], layers=tuple(fetched[1:]), manifest_digest=digest)
