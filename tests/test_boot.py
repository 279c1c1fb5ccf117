"""The main job: the Debian 12 VM image of `aosbuild sample debian`, built and booted in QEMU (TCG).

Slow: the session's `debian_sample` depsolves against the mirror in the host's apt configuration,
downloads about 190 MB of packages and builds a build root, the system and the disk. One boot per suite:
QEMU with user networking and the guest's port 22 forwarded to a free local port; the test logs in over
SSH with the key given to `--ssh-key`, as a user would, and checks the system as that user (no sudo). A
TCG boot to `login:` takes 40-90 s on a quiet machine, more on a busy one.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import DebianSample, check_jsonseq
from .console import SerialConsole

BOOT_BUDGET = 420  # seconds from starting QEMU to powered off, on a loaded 2-core machine
GROWN = 3 << 30  # the disk the guest boots from: the 2 GiB image behind a larger overlay


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Guest:
    """Runs commands in the guest over SSH as the sample's user, with its key and nothing else."""

    def __init__(self, sample: DebianSample, port: int) -> None:
        self.sample = sample
        options = ("StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "BatchMode=yes", "ConnectTimeout=20",
                   "LogLevel=ERROR", "IdentitiesOnly=yes")
        self.argv = ["ssh", "-p", str(port), "-i", str(sample.key), *(f"-o{option}" for option in options)]

    def run(self, command: str, *options: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.argv, *options, f"{self.sample.user}@127.0.0.1", command],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def wait_until_up(self, deadline: float) -> None:
        while True:
            try:
                if self.run("true", timeout=40).returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("no SSH login within the boot budget")
            time.sleep(2)  # polling a guest's port: there is nothing to wait on


@pytest.mark.slow
def test_sample_debian_builds(debian_sample: DebianSample) -> None:
    build = debian_sample.build
    assert build.returncode == 0, build.stderr[-4000:]
    check_jsonseq(build.stdout)
    described = json.loads(debian_sample.manifest.read_text())
    assert [p["name"] for p in described["pipelines"]] == ["build", "os", "image", "qcow2"]
    info = json.loads(subprocess.run(["qemu-img", "info", "--output", "json", str(debian_sample.image)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2"
    tree = debian_sample.output / "os"
    # every machine makes its own host keys at first boot: none is in the image
    assert sorted(p.name for p in (tree / "etc/ssh").glob("ssh_host_*")) == []
    assert (tree / "usr/lib/systemd/system/sshd-keygen.service").is_file()
    assert Path("../run/systemd/resolve/stub-resolv.conf") == (tree / "etc/resolv.conf").readlink()
    keys = (tree / "home" / debian_sample.user / ".ssh/authorized_keys").read_text()
    assert Path(f"{debian_sample.key}.pub").read_text().strip() in keys
    assert (tree / "etc/hostname").read_text().strip() == debian_sample.hostname


@pytest.mark.slow
def test_sample_debian_image_boots_and_logs_in_over_ssh(debian_sample: DebianSample) -> None:
    assert debian_sample.build.returncode == 0, "the sample did not build: see test_sample_debian_builds"
    port = free_port()
    log = debian_sample.workdir / "console.log"
    started = time.monotonic()
    guest = Guest(debian_sample, port)
    disk = debian_sample.workdir / "grown.qcow2"  # the root is grown to the end of the disk at boot
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(debian_sample.image),
                    str(disk), str(GROWN)], check=True)
    try:
        with SerialConsole(disk, log=log,
                           nic=f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:22") as console:
            console.expect(rf"{debian_sample.hostname} login: ", BOOT_BUDGET)
            guest.wait_until_up(started + BOOT_BUDGET)
            state = guest.run("systemctl is-system-running --wait", timeout=240)
            failed = guest.run("systemctl --failed --no-legend")
            route = guest.run("ip route show default")
            dns = guest.run("resolvectl status")
            hostname = guest.run("hostnamectl")
            clock = guest.run("timedatectl show")
            sessions = guest.run("loginctl list-sessions --no-legend")
            root_size = guest.run("findmnt --bytes --noheadings --output SIZE /")
            # password login over SSH is off: the server offers public keys only
            password = guest.run("true", "-o", "PubkeyAuthentication=no",
                                 "-o", "PreferredAuthentications=password,keyboard-interactive")
            guest.run(f"echo {debian_sample.password} | sudo -S poweroff")
            console.expect(r"reboot: Power down", 180)  # reading the console all the way: QEMU never blocks on it
            assert console.wait_exit(60) == 0
    except BaseException:
        print(log.read_text(errors="replace")[-5000:] if log.exists() else "no console log")
        raise
    assert state.stdout.strip() == "running", (state.stdout, failed.stdout)
    assert re.search(r"^default via \S+ dev \S+", route.stdout, re.MULTILINE), route.stdout
    assert re.search(r"DNS Servers?: \S+", dns.stdout), dns.stdout + dns.stderr
    assert re.search(rf"Static hostname: {debian_sample.hostname}$", hostname.stdout, re.MULTILINE), hostname.stdout
    assert "Timezone=UTC" in clock.stdout, clock.stdout + clock.stderr
    assert debian_sample.user in sessions.stdout, sessions.stdout + sessions.stderr
    assert int(root_size.stdout) > GROWN - (200 << 20), root_size.stdout + root_size.stderr  # ext4's own share
    assert password.returncode == 255
    assert "Permission denied (publickey)" in password.stderr, password.stderr
    assert time.monotonic() - started < BOOT_BUDGET
