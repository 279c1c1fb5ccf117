"""Damaged store entries and cached source items, as attacks: each is found, removed and made again.

Through the real CLI, with real sandboxes, and downloads from a local HTTP server (tests/fileserver.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Aosbuild, Run, manifest, pipeline, stage
from .fileserver import FileServer, sha256
from .test_build import leftovers, started_stages
from .test_sources import CURL, DOWNLOADED, blob, copy_items, curl_manifest

FILES = "org.osbuild.files"


def os_manifest(hostname: str = "one") -> dict[str, Any]:
    """One pipeline of three stages: the store keeps each stage's layer."""
    return manifest(pipeline("os", stage("org.osbuild.mkdir", paths=[{"path": "/etc"}]),
                             stage("org.aosbuild.test.files", seed="os", lines=2),
                             stage("org.osbuild.hostname", hostname=hostname)))


def entries_by_stages(store: Path) -> dict[int, Path]:
    """The committed entries (layers), by how many stages their trees hold: 3 is the pipeline's tree."""
    found = {}
    for path in (store / "objects").iterdir():
        found[len(json.loads((path / "data" / "meta" / "results.json").read_text()))] = path
    return found


def store_verify(aosbuild: Aosbuild, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*aosbuild.command(Path("-"))[:3], "store", "verify", *args, "--store",
                           str(aosbuild.store)], capture_output=True, text=True, timeout=120, check=False)


def export(aosbuild: Aosbuild, m: dict[str, Any], name: str, *args: str) -> Run:
    shutil.rmtree(aosbuild.output, ignore_errors=True)
    return aosbuild(m, "--monitor", "jsonseq", "--export", name, "--output-directory", str(aosbuild.output), *args)


def remove_tree(entry: Path) -> None:
    shutil.rmtree(entry / "data" / "tree")


def corrupt_results(entry: Path) -> None:
    (entry / "data" / "meta" / "results.json").write_text("[{\"id\": ")


def corrupt_info(entry: Path) -> None:
    (entry / "object.info").write_text("{}")


@pytest.mark.parametrize("damage", [remove_tree, corrupt_results, corrupt_info])
def test_a_damaged_tree_is_built_again(aosbuild: Aosbuild, damage: Callable[[Path], None]) -> None:
    m = os_manifest()
    assert export(aosbuild, m, "os").returncode == 0
    final = entries_by_stages(aosbuild.store)[3]
    damage(final)

    again = export(aosbuild, m, "os")
    assert again.returncode == 0, again.stderr
    assert (aosbuild.output / "os" / "etc" / "hostname").read_text() == "one\n"
    assert started_stages(again.jsonseq()) == ["Starting module org.osbuild.hostname"]  # from the resume point
    assert again.stderr.count("store.damaged") == 1, again.stderr
    assert final.name in again.stderr
    assert "cannot stat" not in again.stderr
    assert sorted(entries_by_stages(aosbuild.store)) == [1, 2, 3]  # stored again, whole
    assert store_verify(aosbuild).returncode == 0
    assert leftovers(aosbuild.store) == []


def test_store_prune_removes_damaged_entries(aosbuild: Aosbuild) -> None:
    assert export(aosbuild, os_manifest(), "os").returncode == 0
    found = entries_by_stages(aosbuild.store)
    remove_tree(found[3])
    pruned = subprocess.run([*aosbuild.command(Path("-"))[:3], "store", "prune", "--to", "1GiB", "--store",
                             str(aosbuild.store)], capture_output=True, text=True, check=False)
    assert pruned.returncode == 0, pruned.stderr
    assert "trees: removed 1 damaged entries\n" in pruned.stdout
    assert sorted(os.listdir(aosbuild.store / "objects")) == sorted([found[1].name, found[2].name])


def test_a_damaged_resume_point_is_built_again(aosbuild: Aosbuild) -> None:
    assert export(aosbuild, os_manifest("one"), "os").returncode == 0
    remove_tree(entries_by_stages(aosbuild.store)[2])

    changed = export(aosbuild, os_manifest("two"), "os")  # would resume at stage 2: resumes at stage 1
    assert changed.returncode == 0, changed.stderr
    assert len(started_stages(changed.jsonseq())) == 2
    assert (aosbuild.output / "os" / "etc" / "hostname").read_text() == "two\n"
    assert changed.stderr.count("store.damaged") == 1, changed.stderr
    assert "cannot stat" not in changed.stderr
    assert leftovers(aosbuild.store) == []


def test_store_verify_reports_and_removes_damaged_entries(aosbuild: Aosbuild) -> None:
    assert export(aosbuild, os_manifest(), "os").returncode == 0
    found = entries_by_stages(aosbuild.store)
    good = store_verify(aosbuild)
    assert (good.returncode, good.stdout) == (0, "trees: 3 entries checked, 0 damaged\n"
                                                 "sources: 0 items checked, 0 damaged\n"), good.stderr
    remove_tree(found[3])
    corrupt_results(found[2])
    (found[2] / "object.lock").unlink()  # one that no lock can be taken on, until verify makes one
    info = json.loads(subprocess.run([*aosbuild.command(Path("-"))[:3], "store", "info", "--json", "--store",
                                      str(aosbuild.store)], capture_output=True, text=True, check=True).stdout)
    assert {e["id"]: e["damaged"].split(" ")[0] for e in info["entries"] if e["damaged"]} == \
        {found[3].name: "data/tree", found[2].name: "data/meta/results.json"}

    bad = store_verify(aosbuild, "--json")
    assert bad.returncode == 1, bad.stderr
    report = json.loads(bad.stdout)
    assert sorted((d["id"], d["problem"].split(" ")[0], d["removed"]) for d in report["entries"]["damaged"]) == \
        sorted([(found[3].name, "data/tree", True), (found[2].name, "data/meta/results.json", True)])
    assert report["entries"]["checked"] == 3
    assert os.listdir(aosbuild.store / "objects") == [found[1].name]
    assert leftovers(aosbuild.store) == []
    assert store_verify(aosbuild).returncode == 0


# -- source items ------------------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer().running() as files:
        yield files


def item_path(aosbuild: Aosbuild, checksum: str) -> Path:
    return aosbuild.store / "sources" / FILES / checksum


def same_size(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)


def other_size(data: bytes) -> bytes:
    return data + b"more"


@pytest.mark.parametrize("wrong", [same_size, other_size])
def test_a_corrupted_source_item_is_fetched_again(aosbuild: Aosbuild, server: FileServer,
                                                  wrong: Callable[[bytes], bytes]) -> None:
    data = blob("a")
    checksum = sha256(data)
    server.add("/a", data)
    assert aosbuild(curl_manifest({checksum: server.url("/a")}), "--sources-only").returncode == 0
    item = item_path(aosbuild, checksum)
    item.write_bytes(wrong(data))

    built = export(aosbuild, curl_manifest({checksum: server.url("/a")}, copy_items("tree", checksum)), "tree")
    assert built.returncode == 0, built.stderr
    assert (aosbuild.output / "tree" / checksum.split(":")[1]).read_bytes() == data
    assert server.count("/a") == 2
    said = [str(r.get("message", "")) for r in built.jsonseq()]
    assert sum(f"the stored item {checksum} is damaged" in line for line in said) == 1, said
    assert f"{DOWNLOADED}{server.url('/a')}\n" in said
    assert item.read_bytes() == data


def test_sources_only_hashes_every_cached_item(aosbuild: Aosbuild, server: FileServer) -> None:
    a, b = blob("a"), blob("b")
    m = curl_manifest({sha256(a): server.add("/a", a), sha256(b): server.add("/b", b)})
    assert aosbuild(m, "--sources-only").returncode == 0
    item = item_path(aosbuild, sha256(a))
    st = item.stat()
    item.write_bytes(same_size(a))
    os.utime(item, ns=(st.st_atime_ns, st.st_mtime_ns))  # the cheap check sees nothing

    again = aosbuild(m, "--sources-only")
    assert again.returncode == 0, again.stderr
    assert "already cached: 1\n" in again.stdout
    assert "downloaded:     1 (97.7 KiB)\n" in again.stdout
    assert f"the stored item {sha256(a)} is damaged" in again.stdout
    assert item.read_bytes() == a


def test_store_verify_hashes_source_items(aosbuild: Aosbuild, server: FileServer) -> None:
    a, b, c = blob("a"), blob("b"), blob("c")
    m = curl_manifest({sha256(a): server.add("/a", a), sha256(b): server.add("/b", b),
                       sha256(c): server.add("/c", c)})
    assert aosbuild(m, "--sources-only").returncode == 0
    assert store_verify(aosbuild).returncode == 0
    st = item_path(aosbuild, sha256(a)).stat()
    item_path(aosbuild, sha256(a)).write_bytes(same_size(a))
    os.utime(item_path(aosbuild, sha256(a)), ns=(st.st_atime_ns, st.st_mtime_ns))
    item_path(aosbuild, sha256(b)).write_bytes(other_size(b))

    found = store_verify(aosbuild, "--json")
    assert found.returncode == 1, found.stderr
    report = json.loads(found.stdout)
    assert report["sources"]["checked"] == 3
    assert sorted(d["checksum"] for d in report["sources"]["damaged"]) == sorted([sha256(a), sha256(b)])
    assert sorted(os.listdir(aosbuild.store / "sources" / FILES)) == [sha256(c)]
    assert store_verify(aosbuild).returncode == 0

    again = aosbuild(m, "--sources-only")
    assert again.returncode == 0, again.stderr
    assert "already cached: 1\n" in again.stdout
    assert (server.count("/a"), server.count("/b"), server.count("/c")) == (2, 2, 1)
    assert CURL in again.stdout
