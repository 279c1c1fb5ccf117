"""The tests' leftover finders see what is the test's wherever it is: in another process's mount namespace,
and a loop device whose file is named by a path that exists only in a sandbox."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .leftovers import loops_backed_by, mounts_under


def test_a_mount_in_another_namespace_is_found(workdir: Path) -> None:
    point = workdir / "m"
    point.mkdir()
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             f"mount -t tmpfs aosbuild-probe {point} && echo ready && exec sleep 60"],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"ready\n"
        assert str(point) not in Path("/proc/self/mountinfo").read_text()  # not in the test's own namespace
        assert [(m.point, m.source, m.pid) for m in mounts_under(workdir)] == [(str(point), "aosbuild-probe",
                                                                                proc.pid)]
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert mounts_under(workdir) == []


def test_a_loop_device_named_by_a_sandbox_path_is_found(workdir: Path) -> None:
    fs = workdir / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "aosbuild-probe", str(fs)], check=True)
    try:
        subprocess.run(["truncate", "-s", "1M", str(fs / "disk.img")], check=True)
        # attached in a namespace of its own, through a bind mount the host does not have
        attached = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                   f"mount --bind {fs} /mnt && losetup --find --show /mnt/disk.img"],
                                  capture_output=True, text=True, check=True).stdout.strip()
        try:
            name = Path(attached).name
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text()
            assert not backing.startswith(str(workdir))
            assert loops_backed_by(workdir) == [name]
        finally:
            subprocess.run(["losetup", "--detach", attached], check=True)
        assert loops_backed_by(workdir) == []
    finally:
        subprocess.run(["umount", str(fs)], check=True)
