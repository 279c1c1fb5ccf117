"""Attacks by manifest: paths and names that try to reach outside the tree, the inputs or the output directory.

A manifest is data: whatever it says, nothing outside the store and the output directory changes, and a
path it cannot have is refused at its JSON path (exit 2), never with a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aosbuild.errors import SandboxError
from aosbuild.inputs import map_input
from aosbuild.manifest import PIPELINE_ORIGIN, Input
from aosbuild.runnerlib import make_mount_point
from aosbuild.sandbox import INPUTS
from aosbuild.store import layers

from .conftest import FAST_TMP, TEST_LIBDIR, Aosbuild, manifest, pipeline, stage
from .test_devices import SIZE, START, disk_manifest, loopback

PYTHON3 = Path("/usr/bin/python3")
# `link` points five directories deep, so `link/../../../../..` is the tree's root once resolved, but
# five levels above the input's mount point when taken lexically: the sandbox's `/`
CLIMB = "link/../../../../../usr/bin/python3"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def planted() -> dict[str, Any]:
    """A pipeline whose tree holds a symlink five levels deep and a file where the runner would be."""
    return pipeline(
        "planted",
        stage("org.osbuild.mkdir", paths=[{"path": "/d1/d2/d3/d4/d5", "parents": True},
                                          {"path": "/usr/bin", "parents": True}]),
        stage("org.osbuild.truncate", filename="/usr/bin/python3", size="1"),
        stage("org.osbuild.ln", paths=[{"target": "d1/d2/d3/d4/d5", "link_name": "tree:///link",
                                        "symbolic": True}]))


def consumer(name: str, file: str) -> dict[str, Any]:
    return pipeline(name, {"type": "org.osbuild.noop", "inputs": {"image": {
        "type": "org.osbuild.files", "origin": PIPELINE_ORIGIN,
        "references": {"name:planted": {"file": file}}}}})


def test_file_input_climbing_through_a_planted_symlink_is_refused(aosbuild: Aosbuild) -> None:
    canary = aosbuild.workdir / "canary"
    canary.write_text("untouched")
    before = digest(PYTHON3)
    result = aosbuild(manifest(planted(), consumer("attack", CLIMB)), "--export", "attack",
                      "--output-directory", str(aosbuild.output))
    assert result.returncode == 2, result.stdout + result.stderr
    assert ".pipelines[1].stages[0].inputs.image.references.'name:planted'.file" in result.stdout \
        or ".pipelines[1].stages[0].inputs.image.references.name:planted.file" in result.stdout, result.stdout
    assert "contains '..'" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert canary.read_text() == "untouched"
    assert digest(PYTHON3) == before


def test_file_input_bind_target_comes_from_the_confined_name(tmp_path: Path) -> None:
    """The engine's own check, behind the loader's: a name that resolves outside the tree is refused, and
    one that resolves inside is mounted where its checked name says, never above the input."""
    tree = tmp_path / "tree"
    (tree / "d1/d2").mkdir(parents=True)
    (tree / "disk.img").write_bytes(b"x")
    (tree / "d1/d2/f").write_bytes(b"y")
    (tree / "link").symlink_to("d1/d2")
    (tree / "out").symlink_to("/usr/bin")
    (tmp_path / "scratch").mkdir()

    def files_input(file: str) -> Input:
        return Input(name="image", type="org.osbuild.files", origin=PIPELINE_ORIGIN,
                     refs={"0" * 64: {"file": file}}, options={})

    def mapped(file: str) -> list[str]:
        def file_of(_: str, name: str) -> Path | None:
            resolved = layers.file_in([tree], name)
            return None if resolved is None else tree / resolved

        binds, _ = map_input(files_input(file), scratch=tmp_path / "scratch", tree_of=lambda _: tree,
                             file_of=file_of, source_item=lambda _: tree)
        return [b.target for b in binds]

    assert mapped("/link/f") == [f"{INPUTS}/image/link/f"]
    assert mapped("./disk.img") == [f"{INPUTS}/image/disk.img"]
    for bad in (CLIMB, "../disk.img", "out/python3", "", "/", "a\0b"):
        with pytest.raises(SandboxError):
            mapped(bad)


def test_mount_point_through_a_symlink_out_of_the_mounts_is_refused(tmp_path: Path) -> None:
    """A filesystem mounted first (its content made from manifest data) holds `boot -> /elsewhere`: the
    next mount's point must not follow it out of the mounts directory."""
    mounts, elsewhere = tmp_path / "mounts", tmp_path / "elsewhere"
    mounts.mkdir()
    elsewhere.mkdir()
    (mounts / "boot").symlink_to(elsewhere)
    (mounts / "real").mkdir()
    (mounts / "inside").symlink_to("real")
    for target in (mounts / "boot", mounts / "boot/efi"):
        with pytest.raises(OSError, match="resolves outside"):
            make_mount_point(str(target), str(mounts))
    assert list(elsewhere.iterdir()) == []
    make_mount_point(str(mounts / "inside/efi"), str(mounts))
    assert (mounts / "real/efi").is_dir()


@pytest.mark.usefixtures("nodev_store")
def test_a_refused_mount_point_is_one_error_line(aosbuild: Aosbuild) -> None:
    """The first stage plants `boot -> /tmp` in the filesystem; the next mounts it at `/` and again at
    `/boot/efi`. The runner refuses that mount point: a stage error of one line, no traceback anywhere."""
    ln = {"type": "org.osbuild.ln", "devices": {"disk": loopback(start=START, size=SIZE)},
          "mounts": [{"name": "root", "type": "org.osbuild.ext4", "source": "disk", "target": "/"}],
          "options": {"paths": [{"target": "/tmp", "link_name": "mount://root/boot", "symbolic": True}]}}
    attack = {"type": "org.osbuild.noop", "devices": {"disk": loopback(start=START, size=SIZE)},
              "mounts": [{"name": "root", "type": "org.osbuild.ext4", "source": "disk", "target": "/"},
                         {"name": "efi", "type": "org.osbuild.ext4", "source": "disk", "target": "/boot/efi"}]}
    document = disk_manifest(ln, attack)
    result = aosbuild(document)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "org.osbuild.noop" in errors[0]
    assert "could not be run: mount point /boot/efi resolves outside the stage's mounts" in errors[0]
    assert "Last output" not in result.stderr
    as_json = aosbuild(document, "--json")
    assert as_json.returncode == 1
    stage_error = json.loads(as_json.stdout)["error"]["details"]["stage"]["error"]["data"]
    assert stage_error["value"].startswith("mount point /boot/efi resolves outside")
    for text in (result.stdout, result.stderr, as_json.stdout, as_json.stderr):
        assert "Traceback" not in text


def test_loopback_file_with_dotdot_is_refused(aosbuild: Aosbuild) -> None:
    document = manifest(pipeline("image", {
        "type": "org.osbuild.noop",
        "devices": {"disk": {"type": "org.osbuild.loopback", "options": {"filename": "../../../../etc/passwd"}}}}))
    result = aosbuild(document)
    assert result.returncode == 2, result.stdout + result.stderr
    assert ".pipelines[0].stages[0].devices.disk.options.filename" in result.stdout
    assert "contains '..'" in result.stdout


def test_loopback_file_symlinked_out_of_the_tree_is_refused(aosbuild: Aosbuild) -> None:
    """An earlier stage plants `disk.img -> a host file`: the engine must not attach the host file."""
    canary = aosbuild.workdir / "canary.img"
    canary.write_bytes(b"\0" * 4096)
    document = manifest(pipeline(
        "image",
        stage("org.osbuild.ln", paths=[{"target": str(canary), "link_name": "tree:///disk.img",
                                        "symbolic": True}]),
        {"type": "org.osbuild.noop",
         "devices": {"disk": {"type": "org.osbuild.loopback", "options": {"filename": "disk.img"}}}}))
    result = aosbuild(document)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "loopback device file 'disk.img' is outside the tree" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert canary.read_bytes() == b"\0" * 4096


def test_mount_target_with_dotdot_is_refused(aosbuild: Aosbuild) -> None:
    document = manifest(pipeline("image", {
        "type": "org.osbuild.noop",
        "devices": {"disk": {"type": "org.osbuild.loopback", "options": {"filename": "disk.img"}}},
        "mounts": [{"name": "root", "type": "org.osbuild.ext4", "source": "disk", "target": "/../../usr"}]}))
    result = aosbuild(document)
    assert result.returncode == 2, result.stdout + result.stderr
    assert ".pipelines[0].stages[0].mounts[0].target" in result.stdout
    assert "contains '..'" in result.stdout


@pytest.mark.parametrize("name", ["..", ".", "", "ABSOLUTE", "../escaped", "a/b", "x" * 256])
def test_pipeline_names_that_are_not_one_directory_are_refused(aosbuild: Aosbuild, name: str) -> None:
    escaped = aosbuild.workdir / "escaped"
    name = str(escaped) if name == "ABSOLUTE" else name
    aosbuild.output.mkdir()
    path = aosbuild.write_manifest(manifest(pipeline(name, stage("org.osbuild.truncate", filename="f", size="1"))))
    outside = set(os.listdir(aosbuild.workdir)) | {"store"}
    result = aosbuild(path, "--export", name, "--output-directory", str(aosbuild.output))
    assert result.returncode == 2, result.stdout + result.stderr
    assert ".pipelines[0].name" in result.stdout
    assert "one path component" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert set(os.listdir(aosbuild.workdir)) <= outside
    assert os.listdir(aosbuild.output) == []
    assert not escaped.exists()


def test_tree_input_by_pipeline_id_is_refused(aosbuild: Aosbuild) -> None:
    os_pipeline = pipeline("os", stage("org.osbuild.mkdir", paths=[{"path": "/srv"}]))
    built = aosbuild(manifest(os_pipeline), "--export", "os", "--output-directory", str(aosbuild.output))
    assert built.returncode == 0, built.stdout + built.stderr
    inspected = aosbuild(manifest(os_pipeline), "--inspect")
    os_id = json.loads(inspected.stdout)["pipelines"][0]["stages"][-1]["id"]
    assert (aosbuild.store / "objects").is_dir()

    by_id = manifest(os_pipeline, pipeline("archive", {
        "type": "org.osbuild.tar", "options": {"filename": "os.tar"},
        "inputs": {"tree": {"type": "org.osbuild.tree", "origin": PIPELINE_ORIGIN, "references": [os_id]}}}))
    result = aosbuild(by_id, "--export", "archive", "--output-directory", str(aosbuild.output))
    assert result.returncode == 2, result.stdout + result.stderr
    assert ".pipelines[1].stages[0].inputs.tree.references" in result.stdout
    assert "not a 'name:<pipeline>' reference" in result.stdout
    assert not (aosbuild.output / "archive").exists()
    # --inspect still prints osbuild's ids, for which the reference is dropped
    assert aosbuild(by_id, "--inspect").returncode == 0


# -- fuzzing --------------------------------------------------------------------------------------------

NASTY = ["..", ".", "", "/", "/etc/passwd", "../../../../etc/passwd", CLIMB, "link/../x", "link",
         "link/../../../../../../tmp/aosbuild-fuzz-escaped", "a\0b", "\udcff", "x" * 300, "y/" * 400,
         "/usr/bin/python3", "usr/bin/python3", "name:planted", "a/b"]
names = st.sampled_from(NASTY) | st.text(max_size=8) | st.lists(st.sampled_from(NASTY), min_size=1,
                                                                 max_size=4).map("/".join)


def snapshot(root: Path, skip: set[Path]) -> dict[str, tuple[int, int]]:
    """Every path under `root` except `skip`, with its size and mtime."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
        for name in [*dirnames, *filenames]:
            st_ = os.lstat(os.path.join(dirpath, name))
            seen[os.path.join(dirpath, name)] = (st_.st_size, st_.st_mtime_ns)
    return seen


@pytest.fixture(scope="module")
def fuzz_dir() -> Any:
    with tempfile.TemporaryDirectory(dir=FAST_TMP, prefix="aosbuild-fuzz-") as d:
        (Path(d) / "canary").write_text("untouched")
        yield Path(d)


@settings(max_examples=30, deadline=None)
@given(file=names, export_name=names)
def test_fuzzed_paths_and_names_stay_inside(fuzz_dir: Path, file: str, export_name: str) -> None:
    store, output = fuzz_dir / "store", fuzz_dir / "output"
    before = snapshot(fuzz_dir, {store, output})
    python_before = digest(PYTHON3)
    document = manifest(planted(), consumer("consume", file), pipeline(export_name, stage(
        "org.osbuild.truncate", filename="f", size="1")))
    path = fuzz_dir / "manifest.json"
    path.write_text(json.dumps(document, ensure_ascii=True))
    proc = subprocess.run([sys.executable, "-m", "aosbuild", "--libdir", str(TEST_LIBDIR), "--store", str(store),
                           "--export", "consume", "--output-directory", str(output), str(path)],
                          capture_output=True, text=True, timeout=120, errors="replace")
    text = proc.stdout + proc.stderr
    assert proc.returncode in (0, 1, 2), text
    assert "Traceback" not in text
    after = snapshot(fuzz_dir, {store, output})
    after.pop(str(path), None)
    before.pop(str(path), None)
    assert after == before
    assert (fuzz_dir / "canary").read_text() == "untouched"
    assert digest(PYTHON3) == python_before
    assert not Path("/tmp/aosbuild-fuzz-escaped").exists()
    if proc.returncode == 0:
        assert os.listdir(output) == ["consume"]


def test_copy_through_a_planted_symlink_to_proc_sys_is_refused(aosbuild: Aosbuild) -> None:
    """`k -> /proc/sys/kernel` in the tree, then a copy to `tree:///k/...`: with the stage's capabilities
    that would write the kernel's settings; the copy stage refuses to follow the symlink out."""
    # hostname: a file the sandbox's own UTS namespace holds, so even a broken check harms no host
    before = Path("/proc/sys/kernel/hostname").read_text()
    document = manifest(pipeline(
        "attack",
        stage("org.osbuild.truncate", filename="/f", size="0"),
        stage("org.osbuild.ln", paths=[{"target": "/proc/sys/kernel", "link_name": "tree:///k", "symbolic": True}]),
        stage("org.osbuild.copy", paths=[{"from": "tree:///f", "to": "tree:///k/hostname"}])))
    result = aosbuild(document)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "resolves outside its root" in result.stdout + result.stderr
    assert Path("/proc/sys/kernel/hostname").read_text() == before


def test_ln_into_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    from aosbuild import stageapi

    tree, elsewhere = tmp_path / "tree", tmp_path / "elsewhere"
    tree.mkdir()
    elsewhere.mkdir()
    (tree / "out").symlink_to(elsewhere)
    (tree / "etc").mkdir()
    args = {"tree": str(tree), "paths": {"mounts": str(tmp_path / "mounts")}}
    with pytest.raises(ValueError, match="resolves outside"):
        stageapi.resolve_confined("tree:///out/x", args, follow_last=False)
    with pytest.raises(ValueError, match="resolves outside"):
        stageapi.resolve_confined("tree:///out", args, follow_last=True)
    with pytest.raises(ValueError, match="resolves outside"):
        stageapi.resolve_confined("tree:///out/", args, follow_last=False)
    assert stageapi.resolve_confined("tree:///out", args, follow_last=False) == str(tree / "out")
    assert stageapi.resolve_confined("/etc/x", args, follow_last=True) == str(tree / "etc/x")


def test_replace_file_replaces_a_symlink_without_following_it(tmp_path: Path) -> None:
    from aosbuild import stageapi

    outside, link = tmp_path / "outside", tmp_path / "hostname"
    outside.write_text("host\n")
    link.symlink_to(outside)
    with stageapi.replace_file(str(link), 0o600) as f:
        f.write("tree\n")
    assert not link.is_symlink()
    assert link.read_text() == "tree\n"
    assert link.stat().st_mode & 0o777 == 0o600 & ~os.umask(os.umask(0))
    assert outside.read_text() == "host\n"


@pytest.mark.parametrize("attack", [
    stage("org.osbuild.truncate", filename="/out/planted", size="0"),
    stage("org.osbuild.mkdir", paths=[{"path": "/out/planted"}]),
])
def test_any_stage_location_through_a_planted_symlink_is_refused(aosbuild: Aosbuild, attack: dict[str, Any]) -> None:
    """Every bundled stage resolves its locations with `stageapi.resolve_location`, which refuses a
    directory that a planted symlink sends out of the tree (here to the sandbox's `/tmp`, a place that no
    stage may write through its tree)."""
    document = manifest(pipeline(
        "attack",
        stage("org.osbuild.ln", paths=[{"target": "/tmp", "link_name": "tree:///out", "symbolic": True}]),
        attack))
    result = aosbuild(document)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "resolves outside its root" in result.stdout + result.stderr
