"""Attacks by network on `aosbuild worker`: plain TCP is allowed to a loopback scheduler only, because
anyone who reaches a Dask worker's port runs code on it as root (Dask's `run`). So the worker itself must
then listen on loopback only, and its HTTP server (health, metrics) too, whatever the scheduler's address.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .daskcluster import START_TIMEOUT, start_scheduler

NOWHERE = "127.0.0.1:9/aosbuild/cache"  # a worker needs a remote cache to start; none is used here


def listening(pid: int) -> list[str]:
    """The local addresses (`ip:port`) that the process `pid` listens on over TCP, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append(f"{ipaddress.ip_address(packed)}:{int(port, 16)}")
    return found


def test_a_worker_of_a_plain_scheduler_listens_on_loopback_only(workdir: Path) -> None:
    """A scheduler on 127.0.0.2 is on loopback, yet the worker of 4151408 listened on every interface
    (plain TCP: `0.0.0.0` and `[::]`), its HTTP server too: it took only 127.0.0.1 and `localhost` for
    loopback (tidy's on_loopback since fixed that much; a --host elsewhere it still took, see below)."""
    scheduler, address = start_scheduler(workdir / "scheduler", "--host", "127.0.0.2")
    log = workdir / "worker.log"
    try:
        assert address.startswith("tcp://127.0.0.2:"), address
        with open(log, "wb") as out:
            worker = subprocess.Popen([sys.executable, "-m", "aosbuild", "worker", "--scheduler", address,
                                       "--store", str(workdir / "store"), "--cache-remote", NOWHERE],
                                      stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while b"ready at" not in log.read_bytes():
                assert worker.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)  # another process's readiness: its log is the only sign
            addresses = listening(worker.pid)
            assert len(addresses) >= 2, addresses  # the Dask comm and the HTTP server
            assert all(ipaddress.ip_address(a.rsplit(":", 1)[0]).is_loopback for a in addresses), addresses
        finally:
            os.kill(worker.pid, signal.SIGTERM)
            worker.wait(timeout=30)
    finally:
        os.kill(scheduler.pid, signal.SIGKILL)
        scheduler.wait(timeout=30)


def test_a_worker_of_a_plain_scheduler_refuses_to_listen_elsewhere(workdir: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "aosbuild", "worker", "--scheduler", "tcp://127.0.0.1:9",
                           "--host", "0.0.0.0", "--store", str(workdir / "store"), "--cache-remote", NOWHERE],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--host 0.0.0.0: a worker of a plain tcp:// scheduler listens on loopback only" in done.stderr
    assert not (workdir / "store").exists()
