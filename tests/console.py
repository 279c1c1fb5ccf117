"""Driving a QEMU guest over its serial console: wait for text, type lines, with deadlines."""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from pathlib import Path
from types import TracebackType


class ConsoleTimeout(AssertionError):
    pass


class SerialConsole:
    """A QEMU process (TCG, no display) whose serial console is its stdin and stdout."""

    def __init__(self, image: Path, *, memory: str = "1024", log: Path | None = None, nic: str = "none") -> None:
        """`nic` is QEMU's `-nic` (e.g. `user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:2222-:22`)."""
        self.argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", memory, "-nographic", "-no-reboot",
                     "-drive", f"file={image},if=virtio,format=qcow2,snapshot=on", "-nic", nic]
        self.log = log
        self.transcript = b""
        self._consumed = 0  # where the next expect() starts looking
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SerialConsole:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        if self.log is not None:
            self.log.write_bytes(self.transcript)

    def expect(self, pattern: str, timeout: float) -> re.Match[bytes]:
        """Read until `pattern` (a regex) appears after the text already matched; fail after `timeout`."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        regex = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.transcript, self._consumed)
            if match:
                self._consumed = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                tail = self.transcript[-2000:].decode(errors="replace")
                raise ConsoleTimeout(f"no {pattern!r} within {timeout:.0f} s; the console showed:\n{tail}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(remaining, 1.0))
            if ready:
                chunk = self.proc.stdout.read()
                if chunk:
                    self.transcript += chunk

    def send(self, line: str) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\r")
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)
