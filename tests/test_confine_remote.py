"""Attacks by registry: a remote cache is a trust domain of its own, and what it serves stays in the store.

Each test pushes a crafted stage image to a real registry (tests/registry.py) under the tag of a stage of
the manifest, as a hostile or broken registry would serve it, then builds with that registry as the
remote cache. Whatever the image says, nothing outside the store changes, nothing half-made is left in it,
the build says once why it did not use the remote and builds locally, with the exit code it would have.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import anyio
import pytest

from aosbuild import ocilayer, registry, stageimage
from aosbuild.registry import RegistryOptions

from .conftest import Aosbuild, manifest, pipeline, stage
from .registry import Registry
from .test_registry import CREDENTIALS
from .test_remotecache import REPOSITORY, assert_nothing_partial, auth_file, stages_run, warnings

MKDIR = "org.osbuild.mkdir"


def the_manifest() -> dict[str, Any]:
    return manifest(pipeline("tree", stage(MKDIR, paths=[{"path": "/x"}]), stage(MKDIR, paths=[{"path": "/y"}])),
                    pipeline("other", stage(MKDIR, paths=[{"path": "/other"}])))


def stage_ids(aosbuild: Aosbuild, document: dict[str, Any]) -> dict[str, list[str]]:
    run = aosbuild(document, "--inspect")
    assert run.returncode == 0, run.stderr
    return {p["name"]: [s["id"] for s in p["stages"]] for p in json.loads(run.stdout)["pipelines"]}


def member(name: str, kind: bytes = tarfile.REGTYPE, *, linkname: str = "", data: bytes = b"",
           xattrs: dict[str, str] | None = None) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(data)
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in (xattrs or {}).items()}
    return info, data


def layer_blob(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def push_crafted(served: Registry, stage_id: str, blobs: list[bytes], stack: list[tuple[str, bool]],
                 records: list[dict[str, Any]]) -> None:
    """Layers and a config with aosbuild's `stack` and `results`, pushed as the image of `stage_id`."""
    infos = []
    for blob in blobs:
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        infos.append(ocilayer.LayerInfo(digest=digest, size=len(blob), diff_id=digest,
                                        media_type=ocilayer.MEDIA_TYPE_GZIP))

    async def push() -> None:
        client = registry.open_registry(f"{served.host}/{REPOSITORY}", RegistryOptions(timeout=10),
                                        credentials=CREDENTIALS, environ={})
        async with client:
            for blob, info in zip(blobs, infos, strict=True):
                await client.push_blob(info.digest, blob)
            config = stageimage.image_config(diff_ids=[i.diff_id for i in infos], stack=stack, results=records)
            await client.push_blob("sha256:" + hashlib.sha256(config).hexdigest(), config)
            await client.put_manifest(stageimage.stage_tag(stage_id),
                                      stageimage.image_manifest(config=config, layers=infos, stage_id=stage_id))

    anyio.run(push)


def record(stage_id: str) -> dict[str, Any]:
    return {"id": stage_id, "type": MKDIR, "output": "", "duration": 0.1, "metadata": {}}


def victim(workdir: Path) -> Path:
    outside = workdir / "outside"
    (outside / "etc").mkdir(parents=True)
    (outside / "etc/passwd").write_text("root:x:0:0\n")
    return outside


def build(aosbuild: Aosbuild, served: Registry, document: dict[str, Any], *exports: str,
          extra: tuple[str, ...] = ()) -> Any:
    args = [a for name in exports for a in ("--export", name)]
    run = aosbuild(document, "--cache-remote", f"{served.host}/{REPOSITORY}", "--cache-push", "none",
                   "--monitor", "jsonseq", "--output-directory", str(aosbuild.output), *args, *extra, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    return run


def attacks(outside: Path) -> dict[str, list[tuple[tarfile.TarInfo, bytes]]]:
    return {
        # a/etc checked as a directory, then a made a symlink out, then written below
        "symlink swap": [member("a", tarfile.DIRTYPE), member("a/etc", tarfile.DIRTYPE),
                         member("a", tarfile.SYMTYPE, linkname=os.fspath(outside)),
                         member("a/etc/passwd", data=b"pwned\n")],
        "hard link through it": [member("a", tarfile.DIRTYPE), member("a/etc", tarfile.DIRTYPE),
                                 member("a", tarfile.SYMTYPE, linkname=os.fspath(outside)),
                                 member("passwd", tarfile.LNKTYPE, linkname="a/etc/passwd")],
        "whiteout of ..": [member("d", tarfile.DIRTYPE), member("d/.wh...")],
        "overlay redirect": [member("d", tarfile.DIRTYPE,
                                    xattrs={"trusted.overlay.redirect": "/../../../../../../outside"})],
        "not a tar": [],  # its digest matches: the registry made it so
    }


@pytest.mark.usefixtures("nodev_store")
@pytest.mark.parametrize("attack", ["symlink swap", "hard link through it", "whiteout of ..", "overlay redirect",
                                    "not a tar"])
def test_a_hostile_layer_is_one_warning_and_a_local_build(aosbuild: Aosbuild, served: Registry,
                                                          monkeypatch: pytest.MonkeyPatch, attack: str) -> None:
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file(aosbuild.workdir, served.host)))
    outside = victim(aosbuild.workdir)
    document = the_manifest()
    ids = stage_ids(aosbuild, document)["tree"]
    blob = layer_blob(attacks(outside)[attack]) if attack != "not a tar" else os.urandom(4096)
    push_crafted(served, ids[-1], [blob], [(ids[-1], True)], [record(i) for i in ids])
    run = build(aosbuild, served, document, "tree")
    assert len(warnings(run)) == 1, run.stdout
    assert f"cannot pull {MKDIR} {ids[-1]}" in warnings(run)[0]
    assert stages_run(run) == [MKDIR, MKDIR]  # built here instead
    assert sorted(os.listdir(aosbuild.output / "tree")) == ["x", "y"]
    assert os.listdir(outside / "etc") == ["passwd"]
    assert (outside / "etc/passwd").read_text() == "root:x:0:0\n"
    assert os.stat(outside / "etc/passwd").st_nlink == 1
    assert_nothing_partial(aosbuild)


@pytest.mark.parametrize("claim", ["another pipeline's stage", "a result with no type"])
def test_an_image_makes_no_entry_of_a_stage_it_is_not_nor_an_unreadable_result(
        aosbuild: Aosbuild, served: Registry, monkeypatch: pytest.MonkeyPatch, claim: str) -> None:
    """The image of `tree`'s last stage claims as its lower layer `other`'s stage (main committed it:
    poison for a pipeline no pull asked about), or carries a result the cache hit cannot report (main
    committed it, then failed the build with a KeyError)."""
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file(aosbuild.workdir, served.host)))
    document = the_manifest()
    ids = stage_ids(aosbuild, document)
    top, theirs = ids["tree"][-1], ids["other"][0]
    blob = layer_blob([member("y", tarfile.DIRTYPE)])
    if claim == "another pipeline's stage":
        push_crafted(served, top, [blob, blob], [(theirs, True), (top, False)],
                     [record(theirs), record(top)])
    else:
        push_crafted(served, top, [blob], [(top, True)],
                     [record(ids["tree"][0]), {k: v for k, v in record(top).items() if k != "type"}])
    run = build(aosbuild, served, document, "tree")
    assert len(warnings(run)) == 1, run.stdout
    assert ("are not stages of pipeline tree" if claim == "another pipeline's stage"
            else "does not describe its layers") in warnings(run)[0], warnings(run)[0]
    assert stages_run(run) == [MKDIR, MKDIR]  # built here instead
    assert sorted(os.listdir(aosbuild.store / "objects")) == sorted(ids["tree"])
    assert_nothing_partial(aosbuild)


def test_what_a_pull_puts_in_the_store_is_out_of_other_users_reach(aosbuild: Aosbuild, served: Registry,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer may hold a setuid-root program or a device node anyone may open (so may a stage's tree):
    in the store, no user but root reaches them (main's entries were 0755, like osbuild's)."""
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file(aosbuild.workdir, served.host)))
    document = the_manifest()
    ids = stage_ids(aosbuild, document)["tree"]
    shell, disk = member("x/sh", data=b"#!/bin/sh\n"), member("y/disk", tarfile.BLKTYPE)
    shell[0].mode, disk[0].mode = 0o4755, 0o666
    disk[0].devmajor, disk[0].devminor = 7, 0
    blob = layer_blob([member("x", tarfile.DIRTYPE), shell, member("y", tarfile.DIRTYPE), disk])
    push_crafted(served, ids[-1], [blob], [(ids[-1], True)], [record(i) for i in ids])
    os.chmod(aosbuild.workdir, 0o755)  # the test's directory itself is 0700: open it, as a user's may be
    run = build(aosbuild, served, document, "tree")
    assert warnings(run) == [], run.stdout
    assert stages_run(run) == []  # pulled
    tree = aosbuild.store / "objects" / ids[-1] / "data/tree"
    assert os.stat(tree / "x/sh").st_mode & 0o4000
    for path in (tree / "x/sh", tree / "y/disk"):
        nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "stat", "-c", "%a",
                                 os.fspath(path)], capture_output=True, text=True)
        assert nobody.returncode != 0, nobody  # main: nobody could stat (and run, and open) them
        assert "Permission denied" in nobody.stderr, nobody
    for directory in ("objects", "stage", "tmp"):
        assert stat.S_IMODE(os.stat(aosbuild.store / directory).st_mode) == 0o700


def test_a_layer_that_unpacks_to_more_than_the_store_may_hold_is_refused(aosbuild: Aosbuild, served: Registry,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """64 MiB of zeros are a 64 KiB gzip blob: without a bound, a registry can fill the store's filesystem
    (tmpfs: memory) from a small download. A layer is cut off past the store's bound (here 4 MiB)."""
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file(aosbuild.workdir, served.host)))
    document = the_manifest()
    ids = stage_ids(aosbuild, document)["tree"]
    zeros = b"\0" * (64 << 20)
    raw = layer_blob([member("x", tarfile.DIRTYPE), member("y", tarfile.DIRTYPE), member("y/zeros", data=zeros)])
    blob = gzip.compress(raw, compresslevel=9, mtime=0)
    assert len(blob) < 1 << 20
    push_crafted(served, ids[-1], [blob], [(ids[-1], True)], [record(i) for i in ids])
    run = build(aosbuild, served, document, "tree", extra=("--cache-max-size", "4MiB"))
    assert len(warnings(run)) == 1, run.stdout  # main: a cache hit, 64 MiB unpacked
    assert "unpacks to more than the store may hold" in warnings(run)[0]
    assert stages_run(run) == [MKDIR, MKDIR]
    assert_nothing_partial(aosbuild)
