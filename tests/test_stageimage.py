"""A stage's image in a real registry, written and read by the functions the remote cache's builds call:
what is pushed reads back, and a manifest or config not of the format is a miss before any layer moves."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aosbuild import ocilayer, registry, stageimage
from aosbuild.registry import RegistryOptions, RemoteMiss
from aosbuild.registryauth import Credentials

from .layertrees import make_upper, tree
from .registry import PASSWORD, USER, Registry

STAGE_ID = "a" * 64
LOWER_ID = "b" * 64
RESULTS: list[dict[str, Any]] = [
    {"id": LOWER_ID, "type": "org.osbuild.mkdir", "output": "", "duration": 0.5, "metadata": {}},
    {"id": STAGE_ID, "type": "org.osbuild.example", "metadata": {"packages": ["bash"]}}]
STACK = [(LOWER_ID, True), (STAGE_ID, False)]


def client(served: Registry) -> registry.RegistryClient:
    return registry.open_registry(f"{served.host}/aosbuild/cache", RegistryOptions(timeout=10),
                                  credentials=Credentials(USER, PASSWORD), environ={})


def two_layers(workdir: Path) -> list[tuple[Path, ocilayer.LayerInfo]]:
    lower = workdir / "lower"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc/os-release").write_text("ID=debian\n")
    upper = make_upper(workdir / "upper")
    layers = []
    for n, directory in enumerate([lower, upper]):
        path = workdir / f"blob-{n}"
        with open(path, "wb") as out:
            layers.append((path, ocilayer.write_layer(directory, out)))
    return layers


async def test_a_stage_image_pushed_is_read_back_on_another_machine(served: Registry, workdir: Path) -> None:
    layers = two_layers(workdir)
    infos = [info for _, info in layers]
    async with client(served) as a:
        for path, info in layers:
            await a.push_blob(info.digest, path)
        pushed = await stageimage.push_image(a, STAGE_ID, infos, STACK, RESULTS)
        # pushing again (another machine with the same stage) is the same manifest, byte for byte
        assert await stageimage.push_image(a, STAGE_ID, infos, STACK, RESULTS) == pushed
    machine_b = workdir / "b"
    machine_b.mkdir()
    async with client(served) as b:
        image = await stageimage.get_manifest(b, STAGE_ID)
        assert [(blob.digest, blob.size) for blob in image.layers] == [(i.digest, i.size) for i in infos]
        await b.fetch_blob(image.config.digest, machine_b / "config.json", size=image.config.size)
        for n, blob in enumerate(image.layers):
            await b.fetch_blob(blob.digest, machine_b / f"layer-{n}", size=blob.size)
        _, digest = await b.get_manifest(stageimage.stage_tag(STAGE_ID))
    assert digest == pushed
    stack, records = stageimage.read_config((machine_b / "config.json").read_bytes(), STAGE_ID, len(image.layers))
    assert (stack, records) == (STACK, RESULTS)
    upper = machine_b / "upper"
    upper.mkdir()
    with open(machine_b / "layer-1", "rb") as f:  # noqa: ASYNC230  # the test's own check, the client done
        ocilayer.unpack_layer(f, upper, into="upper")
    assert tree(upper) == tree(workdir / "upper")


def descriptor(data: bytes, media_type: str) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}


NOT_STAGE_IMAGES: dict[str, Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]] = {
    "no layers": lambda config, layer: {"config": config, "layers": []},
    "a layer of no layer type": lambda config, layer: {"config": config, "layers": [
        {**layer, "mediaType": "application/octet-stream"}]},
    "a layer without a size": lambda config, layer: {"config": config, "layers": [
        {k: v for k, v in layer.items() if k != "size"}]},
    "a negative size": lambda config, layer: {"config": config, "layers": [{**layer, "size": -1}]},
    "a config larger than configs are": lambda config, layer: {"config": {**config, "size": 1 << 40},
                                                               "layers": [layer]},
}


@pytest.mark.parametrize("flaw", list(NOT_STAGE_IMAGES))
async def test_a_tag_that_is_not_a_stage_image_is_a_miss(served: Registry, flaw: str) -> None:
    config, layer = b'{"not": "a stage"}', b"a layer"
    async with client(served) as remote:
        for blob in (config, layer):
            await remote.push_blob("sha256:" + hashlib.sha256(blob).hexdigest(), blob)
        body = NOT_STAGE_IMAGES[flaw](descriptor(config, registry.CONFIG_TYPE),
                                      descriptor(layer, ocilayer.MEDIA_TYPE_GZIP))
        await remote.put_manifest(stageimage.stage_tag(STAGE_ID),
                                  {"schemaVersion": 2, "mediaType": registry.MANIFEST_TYPE, **body})
        with pytest.raises(RemoteMiss, match="not an aosbuild stage image"):
            await stageimage.get_manifest(remote, STAGE_ID)
        with pytest.raises(RemoteMiss, match="not in the registry"):
            await stageimage.get_manifest(remote, LOWER_ID)


def config_of(stack: list[Any], results: list[Any]) -> bytes:
    return json.dumps({"aosbuild": {"stack": stack, "results": results}}).encode()


def test_a_config_that_does_not_describe_its_layers_is_a_miss() -> None:
    good = [{"id": i, "flat": flat} for i, flat in STACK]
    assert stageimage.read_config(config_of(good, RESULTS), STAGE_ID, 2) == (STACK, RESULTS)
    cases = [
        (b"not json", "not an aosbuild stage image's"),
        (json.dumps({"architecture": "amd64"}).encode(), "not an aosbuild stage image's"),
        (config_of(good[:1], RESULTS), "does not describe its layers"),                # one layer short
        (config_of([good[1], good[0]], RESULTS), "does not describe its layers"),      # not the stage on top
        (config_of([good[0], {**good[1], "flat": True}], RESULTS), "does not describe its layers"),  # flat above
        (config_of([{"id": "../../etc", "flat": True}, good[1]], RESULTS), "does not describe its layers"),
        (config_of(good, [RESULTS[0], {"id": STAGE_ID}]), "does not describe its layers"),  # a result of no type
        (config_of(good, RESULTS[1:]), "lacks the results"),
    ]
    for data, reason in cases:
        with pytest.raises(RemoteMiss, match=reason):
            stageimage.read_config(data, STAGE_ID, 2)
