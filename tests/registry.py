"""A real OCI registry for tests: Debian's `docker-registry` (CNCF distribution) on 127.0.0.1.

Each one gets a free port, its own storage directory and an htpasswd file (bcrypt, from `htpasswd -Bbn`),
optionally TLS from a certificate the test made; it is started from a config YAML in its directory, waited
for until `/v2/` answers, and stopped by its own pid.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .readiness import wait_until_ready

REGISTRY = "/usr/bin/docker-registry"
USER = "builder"
PASSWORD = "s3cret-Pa55word-never-logged"
START_TIMEOUT = 20.0


def basic_auth(user: str = USER, password: str = PASSWORD) -> str:
    """`user:password` in base64: what an auth file keeps for a registry, and what no log may show."""
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def write_auth_file(path: Path, *hosts: str) -> Path:
    """An auth file as `skopeo login` writes it, the test registry's credentials for each host: what
    `REGISTRY_AUTH_FILE` names for the processes under test."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": {host: {"auth": basic_auth()} for host in hosts}}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Registry:
    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    tls: tuple[Path, Path] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.directory / "storage"

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (distribution's filesystem driver layout)."""
        hexdigest = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def _config(directory: Path, port: int, tls: tuple[Path, Path] | None) -> str:
    lines = [
        "version: 0.1",
        "log:",
        "  level: error",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {directory / 'storage'}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        "auth:",
        "  htpasswd:",
        "    realm: aosbuild-test",
        f"    path: {directory / 'htpasswd'}",
    ]
    if tls:
        lines[lines.index("http:") + 2:lines.index("http:") + 2] = [
            "  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
    return "\n".join(lines) + "\n"


@contextmanager
def run_registry(directory: Path, *, tls: tuple[Path, Path] | None = None) -> Iterator[Registry]:
    """A registry serving from `directory` until the block ends (its storage is left for the caller)."""
    if not shutil.which("htpasswd"):
        raise RuntimeError("htpasswd is missing: apt-get install -y apache2-utils")
    directory.mkdir(parents=True, exist_ok=True)
    entry = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True).stdout
    (directory / "htpasswd").write_bytes(entry.strip() + b"\n")
    port = free_port()
    config = directory / "config.yml"
    config.write_text(_config(directory, port, tls))
    with open(directory / "registry.log", "ab") as log:
        process = subprocess.Popen([REGISTRY, "serve", os.fspath(config)], stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL)
    registry = Registry(directory, port, process, tls)

    def answers() -> bool:  # asks for credentials: it serves
        try:
            url = f"{'https' if tls else 'http'}://{registry.host}/v2/"
            return httpx.get(url, timeout=1, verify=False).status_code == 401
        except httpx.TransportError:
            return False

    try:
        wait_until_ready(process, answers, what="docker-registry", log=directory / "registry.log",
                         timeout=START_TIMEOUT)
        yield registry
    finally:
        registry.stop()


@pytest.fixture
def served(workdir: Path) -> Iterator[Registry]:
    """A registry of the test's own, in its work directory."""
    with run_registry(workdir / "registry") as running:
        yield running
