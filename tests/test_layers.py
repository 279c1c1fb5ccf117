"""Trees built as stacks of layers are exactly the trees built in one plain directory.

One manifest does, over four stages, every kind of change a stage may make to the tree the stages before
it left (contents, modes, owners, times, xattrs of each namespace, ACLs, hard links, device nodes, fifos,
sockets, deletions, directory renames, opaque directories); it is built layered and with AOSBUILD_FLAT=1,
and the full digests of the trees (tests/treedigest.py) are compared: as the kernel's overlay mount shows
the layers, as exported, and as an `org.osbuild.tar` stage of another pipeline reads them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aosbuild.store import Store, entries, layers

from .conftest import FAST_TMP, Aosbuild, manifest, pipeline, stage
from .treedigest import digest

EPOCH = 1_500_000_000
T = 1_400_000_000  # explicit mtimes, older than the epoch: they must survive as they are
DIGEST_SCRIPT = Path(__file__).with_name("treedigest.py")

BASE = [
    ["mkdir", "etc", 0o755], ["file", "etc/hostname", "one\n", 0o644, T],
    ["file", "h1", "linked\n", 0o644, T], ["link", "h1", "h2"],          # changed in place later
    ["file", "x1", "x\n", 0o600, T + 1], ["link", "x1", "x2"],            # linked again later
    ["file", "meta", "m\n", 0o644, T + 2],                                 # metadata changes later
    ["file", "owned", "o\n", 0o640, T + 3], ["chown", "owned", 1234, 5678],
    ["xattr", "meta", "user.kept", "u"], ["xattr", "meta", "trusted.kept", "t"],
    ["xattr", "meta", "security.kept", "s"], ["xattr", "meta", "user.dropped", "gone"],
    ["acl", "owned", 4321],
    ["symlink", "etc/hostname", "link"], ["symlink", "/nowhere", "dangling"],
    ["mknod", "null", "c", 1, 3], ["mknod", "blk", "b", 7, 200], ["fifo", "fifo"], ["socket", "sock"],
    ["mkdir", "olddir", 0o750], ["mkdir", "olddir/sub", 0o755], ["file", "olddir/sub/inner", "i\n", 0o644, T + 4],
    ["file", "olddir/kept", "k\n", 0o644, T + 5], ["utime", "olddir/sub", T + 6],
    ["mkdir", "opaque", 0o755], ["file", "opaque/a", "a\n", 0o644, T], ["file", "opaque/b", "b\n", 0o644, T],
    ["file", "doomed", "d\n", 0o644, T], ["mkdir", "doomeddir", 0o755], ["file", "doomeddir/f", "f\n", 0o644, T],
    ["file", "replaced", "old\n", 0o644, T],
]
CHANGES = [
    ["append", "h1", "changed in place\n"],                 # h2 is the same inode: it changes too
    ["link", "x1", "x3"],                                   # a third name for a file of a lower layer
    ["chmod", "meta", 0o604], ["chown", "meta", 42, 43], ["utime", "meta", T + 10],
    ["xattr", "meta", "user.new", "n"], ["rmxattr", "meta", "user.dropped"], ["xattr", "etc", "user.dir", "d"],
    ["rename", "olddir", "newdir"],                         # a directory of a lower layer renamed
    ["rmtree", "opaque"], ["mkdir", "opaque", 0o700], ["file", "opaque/c", "c\n", 0o644, T],  # opaque
    ["rm", "doomed"], ["rmtree", "doomeddir"],
    ["file", "replaced.new", "new\n", 0o600, T + 11], ["rename", "replaced.new", "replaced"],
    ["rm", "link"], ["symlink", "meta", "link"], ["rm", "fifo"], ["mknod", "fifo", "c", 1, 5],
]
MORE = [
    ["append", "newdir/sub/inner", "through the renamed directory\n"], ["rm", "newdir/kept"],
    ["rename", "newdir", "renamed-twice"], ["file", "doomed", "back\n", 0o644, T + 12],
    ["append", "h2", "and through the other name\n"], ["mkdir", "doomeddir", 0o711],
]
FINAL = [["chmod", "x2", 0o640], ["rmdir", "doomeddir"], ["rename", "renamed-twice/sub", "sub-moved"]]


def fidelity_manifest() -> dict[str, Any]:
    ops = "org.aosbuild.test.tree-ops"
    tree_input = {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": ["name:tree"]}
    return manifest(
        pipeline("tree", stage(ops, ops=BASE), stage(ops, ops=CHANGES), stage(ops, ops=MORE),
                 stage(ops, ops=FINAL), **{"source-epoch": EPOCH}),
        pipeline("archive", {"type": "org.osbuild.tar", "inputs": {"tree": tree_input},
                             "options": {"filename": "tree.tar"}}))


def mounted_digest(store: Path, object_id: str) -> dict[str, Any]:
    """The digest of a stored tree as an overlay mount of its layers shows it (a mount of the test's own,
    in a namespace of its own)."""
    objects = store / "objects"
    info = json.loads((objects / object_id / "object.info").read_text())
    if info.get("flat"):
        return digest(str(objects / object_id / "data" / "tree"))
    with tempfile.TemporaryDirectory(dir=store.parent) as scratch:
        empty, point = Path(scratch, "empty"), Path(scratch, "point")
        empty.mkdir()
        point.mkdir()
        stack = [objects / i / "data" / "tree" for i in reversed([*info["layers"], object_id])]
        script = 'mount -t overlay test -o "ro,redirect_dir=on,lowerdir=$1" "$2" && exec "$3" "$4" "$2"'
        out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                              ":".join(map(str, [*stack, empty])), str(point), sys.executable,
                              str(DIGEST_SCRIPT)], check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out))


def tar_members(path: Path) -> tuple[list[tuple[Any, ...]], list[list[str]]]:
    """A tarball's members in name order (a file and a hard link to it alike), and its hard-link groups:
    which name comes first in a tarball follows directory order, which differs between filesystems."""
    groups: dict[str, list[str]] = {}
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            kind = tarfile.REGTYPE if m.islnk() else m.type
            members.append((m.name, kind, m.mode, m.uid, m.gid, m.linkname if m.issym() else "", m.devmajor,
                            m.devminor, m.mtime, sorted(m.pax_headers)))
            if m.islnk():
                groups.setdefault(m.linkname, [m.linkname]).append(m.name)
    return sorted(members), sorted(sorted(g) for g in groups.values())


def assert_no_overlay_traces(tree: dict[str, Any]) -> None:
    for name, entry in tree.items():
        assert not (entry.get("rdev") == [0, 0]), f"a whiteout: {name}"
        assert not [x for x in entry["xattrs"] if x.startswith("trusted.overlay.")], f"overlay xattrs on {name}"


@pytest.fixture(scope="module")
def built() -> Iterator[dict[str, Any]]:
    """The manifest built layered and flat, each in a store of its own; their trees' digests."""
    found: dict[str, Any] = {}
    for mode in ("layered", "flat"):
        cli = Aosbuild(Path(tempfile.mkdtemp(prefix=f"layers-{mode}-", dir=FAST_TMP)))
        m = fidelity_manifest()
        env = {**os.environ, "AOSBUILD_FLAT": "1" if mode == "flat" else "0"}
        command = cli.command(m, "--export", "tree", "--export", "archive", "--output-directory", str(cli.output))
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        tree_id = json.loads(cli(m, "--inspect").stdout)["pipelines"][0]["stages"][-1]["id"]
        found[mode] = {"cli": cli, "stored": mounted_digest(cli.store, tree_id),
                       "exported": digest(str(cli.output / "tree")),
                       "tar": tar_members(cli.output / "archive" / "tree.tar"),
                       "objects": sorted(os.listdir(cli.store / "objects"))}
    yield found
    for mode in found.values():
        shutil.rmtree(mode["cli"].workdir, ignore_errors=True)


def test_layered_trees_equal_plain_directory_trees(built: dict[str, Any]) -> None:
    layered, flat = built["layered"], built["flat"]
    assert len(layered["objects"]) == 5  # a layer per stage
    assert len(flat["objects"]) == 3     # flat: the two pipelines' trees, and the one before the last stage
    assert layered["stored"] == flat["stored"]
    assert layered["exported"] == flat["exported"] == flat["stored"]
    assert layered["tar"] == flat["tar"]
    for tree in (layered["stored"], layered["exported"]):
        assert_no_overlay_traces(tree)


def test_the_manifest_exercises_every_case(built: dict[str, Any]) -> None:
    """The digest shows what each operation left, so a digest that cannot see a case cannot hide it."""
    tree = built["layered"]["exported"]
    assert tree["h1"]["links"] == tree["h2"]["links"] == "h1"
    assert tree["x3"]["links"] == tree["x2"]["links"] == "x1"
    assert tree["x2"]["mode"] == 0o640
    assert (tree["meta"]["mode"], tree["meta"]["uid"], tree["meta"]["gid"]) == (0o604, 42, 43)
    assert tree["meta"]["mtime"] == (T + 10) * 10**9
    assert sorted(tree["meta"]["xattrs"]) == ["security.kept", "trusted.kept", "user.kept", "user.new"]
    assert "system.posix_acl_access" in tree["owned"]["xattrs"]
    assert (tree["owned"]["uid"], tree["owned"]["gid"]) == (1234, 5678)
    assert tree["link"]["target"] == "meta"
    assert [tree[n]["rdev"] for n in ("null", "blk", "fifo")] == [[1, 3], [7, 200], [1, 5]]
    assert "sock" in tree
    assert "olddir" not in tree
    assert "newdir" not in tree
    assert sorted(k for k in tree if k.startswith(("renamed-twice", "sub-moved"))) == [
        "renamed-twice", "sub-moved", "sub-moved/inner"]
    assert sorted(k for k in tree if k.startswith("opaque")) == ["opaque", "opaque/c"]
    assert "doomeddir" not in tree
    assert tree["doomed"]["mtime"] == (T + 12) * 10**9
    assert tree["renamed-twice"]["mode"] == 0o750
    assert tree["etc"]["xattrs"] == {"user.dir": b"d".hex()}


def test_a_layer_holds_only_its_changes(built: dict[str, Any]) -> None:
    """The last stage's layer holds what it changed (and the directories above), not the whole tree."""
    cli = built["layered"]["cli"]
    tree_id = json.loads(cli(fidelity_manifest(), "--inspect").stdout)["pipelines"][0]["stages"][-1]["id"]
    top = cli.store / "objects" / tree_id / "data" / "tree"
    names = sorted(os.path.relpath(os.path.join(d, n), top) for d, ds, fs in os.walk(top) for n in ds + fs)
    assert "h1" not in names
    assert "etc" not in names
    assert {"x2", "sub-moved", "doomeddir"} <= set(names)
    assert layers.find([top], "doomeddir") is None  # a whiteout: deleted in this layer


def test_past_the_bound_the_tree_is_squashed_into_one_flat_entry(aosbuild: Aosbuild) -> None:
    """A stage never sees more than MAX_LAYERS layers: past them the tree is copied once into one flat
    entry, and the stages above stack on it. The tree is the same, and a rebuild is fully cached."""
    count = layers.MAX_LAYERS + 3
    m = manifest(pipeline("deep", *(stage("org.aosbuild.test.files", seed=f"s{i}", count=1, size=64)
                                     for i in range(count))))
    described = json.loads(aosbuild(m, "--inspect").stdout)["pipelines"][0]["stages"]
    run = aosbuild(m, "--export", "deep", "--output-directory", str(aosbuild.output), timeout=300)
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(aosbuild.output / "deep")) == sorted(f"s{i}-0" for i in range(count))
    squashed = f"{described[layers.MAX_LAYERS - 1]['id']}.squashed"
    info = json.loads((aosbuild.store / "objects" / squashed / "object.info").read_text())
    assert info["flat"]
    assert info["layers"] == []
    top = json.loads((aosbuild.store / "objects" / described[-1]["id"] / "object.info").read_text())
    assert top["layers"] == [squashed, described[-3]["id"], described[-2]["id"]]
    assert sorted(os.listdir(aosbuild.stored_tree(described[-1]["id"]))) == sorted(f"s{i}-0" for i in range(count))
    again = aosbuild(m, "--monitor", "jsonseq")
    assert again.returncode == 0, again.stderr
    assert '"Starting module' not in again.stdout



@pytest.mark.slow
def test_the_sample_os_tree_is_the_same_layered_and_flat() -> None:
    """`aosbuild sample debian`'s build root and os tree (with a source epoch: then the tree is
    reproducible, initramfs and all), built layered and flat: the same tree, file for file."""
    work = Path(tempfile.mkdtemp(prefix="layers-sample-", dir=FAST_TMP))
    path = work / "debian.json"
    generated = subprocess.run([sys.executable, "-m", "aosbuild", "sample", "debian", "--password", "x",
                                "--output", str(path)], capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr
    m = json.loads(path.read_text())
    m["pipelines"] = [p for p in m["pipelines"] if p["name"] in ("build", "os")]
    for p in m["pipelines"]:
        p["source-epoch"] = EPOCH
    trees = {}
    for mode in ("layered", "flat"):
        cli = Aosbuild(work / mode)
        cli.workdir.mkdir()
        env = {**os.environ, "AOSBUILD_FLAT": "1" if mode == "flat" else "0"}
        run = subprocess.run(cli.command(m, "--export", "os", "--output-directory", str(cli.output)),
                             capture_output=True, text=True, env=env, timeout=1800)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        trees[mode] = digest(str(cli.output / "os"))
        assert_no_overlay_traces(trees[mode])
    layered, flat = trees["layered"], trees["flat"]
    assert len(layered) > 10000  # a whole Debian system
    assert sorted(layered) == sorted(flat)
    assert sorted(name for name in layered if layered[name] != flat[name]) == []
    shutil.rmtree(work, ignore_errors=True)


def test_a_layer_evicted_under_others_makes_them_a_miss_not_a_hole(aosbuild: Aosbuild) -> None:
    """The middle layer of a tree is evicted: the layer above it is a miss (and goes first when room is
    needed), the rebuild resumes below the hole, and the tree comes out whole."""
    m = manifest(pipeline("tree", *(stage("org.aosbuild.test.files", seed=f"s{i}", count=1, size=64)
                                    for i in range(3))))
    first, middle, top = (s["id"] for s in json.loads(aosbuild(m, "--inspect").stdout)["pipelines"][0]["stages"])
    assert aosbuild(m, "-q").returncode == 0
    store = Store.open(aosbuild.store, use=False)
    lock = entries.take_for_eviction(store.objects, middle)
    assert lock is not None
    entries.remove(entries.move_out(store.objects, middle, store.staging, lock))

    listed = entries.list_committed(store.objects)
    assert listed[0].id == top  # its layers are not all there: worth nothing, evicted first
    rebuilt = aosbuild(m, "--monitor", "jsonseq", "--export", "tree", "--output-directory", str(aosbuild.output))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rebuilt.stdout.count('"Starting module') == 2
    assert sorted(os.listdir(aosbuild.output / "tree")) == ["s0-0", "s1-0", "s2-0"]
    assert sorted(os.listdir(aosbuild.store / "objects")) == sorted([first, middle, top])


def test_a_lower_layer_counts_as_used_when_a_layer_above_it_is(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store", use=False)
    made = []
    for name, below in (("bottom", []), ("top", ["bottom"]), ("other", [])):
        entry = entries.create(store.staging)
        entry.layers = below
        entry.write_info()
        assert entries.commit(entry, store.objects, name)
        entry.lock.close()
        made.append(entry)
    os.utime(store.objects / "bottom" / entries.LOCK, (1000, 1000))
    os.utime(store.objects / "other" / entries.LOCK, (2000, 2000))
    os.utime(store.objects / "top" / entries.LOCK, (3000, 3000))
    assert [(c.id, c.last_used) for c in entries.list_committed(store.objects)] == [
        ("other", 2000), ("top", 3000), ("bottom", 3000)]  # as recent as the top, which goes first


# a bottom stage (nothing below: it runs on its new layer as on a plain directory) setting xattrs that
# overlayfs would take for its own; the stage above changes the file in place (a copy-up) and adds one
OVERLAY_NAMED = [
    ["mkdir", "d", 0o755], ["file", "d/inner", "i\n", 0o644, T], ["xattr", "d", "trusted.overlay.opaque", "y"],
    ["file", "f", "f\n", 0o644, T], ["xattr", "f", "trusted.overlay.foo", "bar"], ["file", "g", "g\n", 0o644, T],
]
ABOVE = [["append", "f", "more\n"], ["xattr", "g", "trusted.overlay.redirect", "/elsewhere"]]


def without_mtimes(tree: dict[str, Any]) -> dict[str, Any]:
    return {name: {k: v for k, v in entry.items() if k != "mtime"} for name, entry in tree.items()}


def test_a_stages_own_overlay_named_xattrs_are_kept_as_on_a_plain_directory() -> None:
    """xattrs named like overlayfs's own that stages set are content: kept, whether the stage ran on a
    plain directory (the bottom layer) or through a mount; the plain bottom layer is then read through
    a mount too (not flat), where a clean one is read as it is."""
    ops = "org.aosbuild.test.tree-ops"
    epoch = {"source-epoch": EPOCH}
    # without a source epoch (whose clamping walks the bottom layer before the next stage anyway), the
    # next stage runs beside the walk that finds the xattrs to escape (`layercheck`), and again after it
    m = manifest(pipeline("named", stage(ops, ops=OVERLAY_NAMED), stage(ops, ops=ABOVE), **epoch),
                 pipeline("clean", stage(ops, ops=BASE), **epoch),
                 pipeline("unclamped", stage(ops, ops=OVERLAY_NAMED), stage(ops, ops=ABOVE)))
    exported, info = {}, {}
    for mode in ("layered", "flat"):
        cli = Aosbuild(Path(tempfile.mkdtemp(prefix=f"layers-named-{mode}-", dir=FAST_TMP)))
        env = {**os.environ, "AOSBUILD_FLAT": "1" if mode == "flat" else "0"}
        command = cli.command(m, "--export", "named", "--export", "clean", "--export", "unclamped",
                              "--output-directory", str(cli.output))
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        # layered, the stage above the unclamped bottom layer ran beside the walk of it, which found
        # xattrs to escape: it ran again on the escaped layer
        reruns = (run.stdout + run.stderr).count("runs again: the tree below it held xattrs")
        assert reruns == (1 if mode == "layered" else 0), run.stdout + run.stderr
        exported[mode] = {name: digest(str(cli.output / name)) for name in ("named", "clean", "unclamped")}
        if mode == "layered":
            described = json.loads(cli(m, "--inspect").stdout)["pipelines"]
            info = {p["name"]: json.loads((cli.store / "objects" / p["stages"][0]["id"] / "object.info").read_text())
                    for p in described}
            exported["stored"] = mounted_digest(cli.store, described[0]["stages"][-1]["id"])
        shutil.rmtree(cli.workdir, ignore_errors=True)
    unclamped = {mode: without_mtimes(exported[mode].pop("unclamped")) for mode in ("layered", "flat")}
    assert exported["layered"] == exported["flat"]
    assert unclamped["layered"] == unclamped["flat"] == without_mtimes(exported["flat"]["named"])
    assert exported["stored"] == exported["flat"]["named"]
    assert not info["named"]["flat"]
    assert info["clean"]["flat"]
    named = exported["flat"]["named"]
    assert sorted(named["d"]["xattrs"]) == ["trusted.overlay.opaque"]
    assert sorted(named["f"]["xattrs"]) == ["trusted.overlay.foo"]
    assert sorted(named["g"]["xattrs"]) == ["trusted.overlay.redirect"]
    assert sorted(named) == [".", "d", "d/inner", "f", "g"]


def test_find_follows_no_redirect_out_of_the_layers(tmp_path: Path) -> None:
    """A redirect with `..` (overlayfs refuses those) would send the lookup in the layers below to
    `LOWER/../../..`: `find`, and so a file input's bind or a loop file's copy-up, would leave the store."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "shadow").write_text("root:$6$...")
    top, lower = tmp_path / "store/top", tmp_path / "store/lower"
    (top / "d").mkdir(parents=True)
    (lower / "d").mkdir(parents=True)
    (lower / "d/shadow").write_text("the layer's own")
    os.setxattr(top / "d", layers.REDIRECT, b"/../../secret")
    assert layers.find([top, lower], "d/shadow") is None
    assert layers.file_in([top, lower], "d/shadow") is None
    os.setxattr(top / "d", layers.REDIRECT, b"/d")  # a redirect inside the stack still works
    assert layers.find([top, lower], "d/shadow") == lower / "d/shadow"
