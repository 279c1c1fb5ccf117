"""A stage's result as an image in a real registry: pushed, pulled whole, or a miss that leaves nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import anyio
import pytest

from aosbuild import ocilayer, registry, stageimage
from aosbuild.registry import RegistryOptions, RemoteMiss
from aosbuild.registryauth import Credentials

from .layertrees import make_upper, tree
from .registry import PASSWORD, USER, Registry

STAGE_ID = "a" * 64
RESULTS = {"id": STAGE_ID, "type": "org.osbuild.example", "metadata": {"packages": ["bash"]}, "success": True}


def client(served: Registry) -> registry.RegistryClient:
    return registry.open_registry(f"{served.host}/aosbuild/cache", RegistryOptions(timeout=10),
                                  credentials=Credentials(USER, PASSWORD), environ={})


async def two_layers(workdir: Path) -> list[tuple[Path, ocilayer.LayerInfo]]:
    lower = workdir / "lower"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc/os-release").write_text("ID=debian\n")
    upper = make_upper(workdir / "upper")
    layers = []
    for n, directory in enumerate([lower, upper]):
        path = workdir / f"blob-{n}"
        with open(path, "wb") as out:  # noqa: ASYNC230  # the test's own setup
            layers.append((path, ocilayer.write_layer(directory, out)))
    return layers


async def test_a_stage_pushed_is_pulled_whole_on_another_machine(served: Registry, workdir: Path) -> None:
    layers = await two_layers(workdir)
    async with client(served) as a:
        pushed = await stageimage.push_stage(a, STAGE_ID, layers, RESULTS)
        # pushing again (another machine with the same stage) is the same manifest, nothing re-sent
        assert await stageimage.push_stage(a, STAGE_ID, layers, RESULTS) == pushed
    machine_b = workdir / "b"
    machine_b.mkdir()
    async with client(served) as b:
        pulled = await stageimage.pull_stage(b, STAGE_ID, machine_b)
    assert pulled.results == RESULTS
    assert pulled.manifest_digest == pushed
    assert [p.read_bytes() for p in pulled.layers] == [p.read_bytes() for p, _ in layers]
    assert sorted(os.listdir(machine_b)) == ["layer-0", "layer-1"]
    upper = machine_b / "upper"
    upper.mkdir()
    with open(pulled.layers[1], "rb") as f:  # noqa: ASYNC230  # the test's own check
        ocilayer.unpack_layer(f, upper, into="upper")
    assert tree(upper) == tree(workdir / "upper")


async def test_a_stage_with_a_layer_gone_is_a_miss_and_leaves_nothing(served: Registry,
                                                                     workdir: Path) -> None:
    layers = await two_layers(workdir)
    async with client(served) as remote:
        await stageimage.push_stage(remote, STAGE_ID, layers, RESULTS)
    shutil.rmtree(served.blob_path(layers[1][1].digest).parent)
    pulled = workdir / "pulled"
    pulled.mkdir()
    async with client(served) as remote:
        with pytest.raises(RemoteMiss):
            await stageimage.pull_stage(remote, STAGE_ID, pulled)
        with pytest.raises(RemoteMiss, match="not in the registry"):
            await stageimage.pull_stage(remote, "b" * 64, pulled)
    assert os.listdir(pulled) == []


async def test_a_tag_that_is_not_a_stage_image_is_a_miss(served: Registry, workdir: Path) -> None:
    config = b'{"not": "a stage"}'
    async with client(served) as remote:
        digest = "sha256:" + hashlib.sha256(config).hexdigest()
        await remote.push_blob(digest, config)
        manifest = {"schemaVersion": 2, "mediaType": registry.MANIFEST_TYPE,
                    "config": {"mediaType": registry.CONFIG_TYPE, "digest": digest, "size": len(config)},
                    "layers": []}
        await remote.put_manifest(stageimage.stage_tag(STAGE_ID), manifest)
        with pytest.raises(RemoteMiss, match="not an aosbuild stage"):
            await stageimage.pull_stage(remote, STAGE_ID, workdir)
    assert not (workdir / "config.json").exists()


async def test_a_pull_cancelled_midway_leaves_nothing(served: Registry, workdir: Path) -> None:
    big = workdir / "big"
    big.mkdir()
    (big / "data").write_bytes(os.urandom(24 << 20))
    with open(workdir / "blob", "wb") as out:  # noqa: ASYNC230  # the test's own setup
        info = ocilayer.write_layer(big, out)
    async with client(served) as remote:
        await stageimage.push_stage(remote, STAGE_ID, [(workdir / "blob", info)], RESULTS)
    pulled = workdir / "pulled"
    pulled.mkdir()
    async with client(served) as remote:
        with anyio.CancelScope() as scope:
            await remote.fetch_blob(info.digest, pulled / "blob", progress=lambda _size: scope.cancel())
        assert scope.cancelled_caught
    assert os.listdir(pulled) == []
    assert json.loads(stageimage.image_config(diff_ids=[info.diff_id], results=RESULTS))["aosbuild"] == RESULTS
