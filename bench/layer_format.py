"""The layer format's cost on a Debian-sized tree: aosbuild's ocilayer against GNU tar, both ways.

Not part of `suite.py` yet (the remote cache is not wired into builds). Copies about 20k files of this
host's /usr and /etc into /dev/shm, then times writing that tree as a layer (zstd, gzip) and unpacking
it, next to `tar --sort=name --xattrs --numeric-owner` doing the same (GNU tar knows nothing of overlay
whiteouts, so it is the floor, not a replacement). Run: `.venv/bin/python bench/layer_format.py`.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from aosbuild import ocilayer  # the repository's, not an installed one

SOURCES = ["/etc", "/usr/sbin", "/usr/lib/python3", "/usr/share/doc", "/usr/share/perl", "/usr/share/zoneinfo",
           "/usr/share/i18n", "/usr/share/man/man1", "/usr/share/man/man3"]
REPEAT = 3


def cpu() -> float:
    """CPU seconds of this process and its waited-for children: the machine is shared, wall time is noisy."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn: object) -> tuple[float, float]:
    start, start_cpu = time.perf_counter(), cpu()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start, cpu() - start_cpu


def main() -> int:
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="aosbuild-bench-layer-") as scratch:
        root = Path(scratch)
        tree = root / "tree"
        for source in SOURCES:
            if os.path.isdir(source):
                target = tree / source.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(["cp", "-a", source, target], check=True)
        files = sum(len(d) + len(f) for _, d, f in os.walk(tree))
        size = int(subprocess.run(["du", "-sb", tree], capture_output=True, text=True, check=True).stdout.split()[0])
        print(f"tree: {files} entries, {size / 1e6:.0f} MB")
        rows: dict[str, list[tuple[float, float]]] = {}
        blob_sizes: dict[str, int] = {}

        def write(compression: ocilayer.Compression) -> None:
            with open(root / f"layer.{compression}", "wb") as out:
                blob_sizes[compression] = ocilayer.write_layer(tree, out, compression=compression).size

        def unpack() -> None:
            shutil.rmtree(root / "out", ignore_errors=True)
            (root / "out").mkdir()
            with open(root / "layer.zstd", "rb") as f:
                ocilayer.unpack_layer(f, root / "out", into="upper")

        def gnu_write() -> None:
            subprocess.run(["tar", "--zstd", "-c", "--sort=name", "--xattrs", "--xattrs-include=*",
                            "--numeric-owner", "--format=posix", "-f", root / "gnu.tar.zst", "-C", tree, "."],
                           check=True)

        def gnu_unpack() -> None:
            shutil.rmtree(root / "gnu", ignore_errors=True)
            (root / "gnu").mkdir()
            subprocess.run(["tar", "--zstd", "-x", "-p", "--xattrs", "--xattrs-include=*", "--numeric-owner",
                            "-f", root / "gnu.tar.zst", "-C", root / "gnu"], check=True)

        for _ in range(REPEAT):
            for name, fn in [("ocilayer write, zstd", lambda: write("zstd")),
                             ("ocilayer write, gzip", lambda: write("gzip")),
                             ("GNU tar write, zstd", gnu_write),
                             ("ocilayer unpack (zstd)", unpack),
                             ("GNU tar unpack (zstd)", gnu_unpack)]:
                rows.setdefault(name, []).append(timed(fn))
        print("| what | wall s, median | wall s, min-max | CPU s, median |\n|---|---|---|---|")
        for name, samples in rows.items():
            walls, cpus = [w for w, _ in samples], [c for _, c in samples]
            print(f"| {name} | {statistics.median(walls):.2f} | {min(walls):.2f}-{max(walls):.2f} "
                  f"| {statistics.median(cpus):.2f} |")
        print(f"blob sizes: zstd {blob_sizes['zstd'] / 1e6:.0f} MB, gzip {blob_sizes['gzip'] / 1e6:.0f} MB, "
              f"GNU tar zstd {(root / 'gnu.tar.zst').stat().st_size / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
