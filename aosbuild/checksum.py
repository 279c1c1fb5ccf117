"""Checksums of source items, and the one way a file enters `store/sources/`.

An item is named by `<algorithm>:<hex digest>` of its bytes, with the algorithms osbuild accepts. A
`VerifiedFile` is written to `.unverified-<name>` beside its final name, hashed as the bytes arrive, and
renamed into place by `commit` only when the digest matches; otherwise the partial file is removed when
the `VerifiedFile` closes. So a file present under its checksum is a good file.

The partial file's name is fixed, not random: whoever writes an item holds that item's lock (see
`aosbuild.sources`), so a name left behind by a killed process is simply overwritten by the next writer
instead of piling up.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import ChecksumMismatch

ALGORITHMS = ("md5", "sha1", "sha256", "sha384", "sha512")
PARTIAL_PREFIX = ".unverified-"
# osbuild's sources store items 0666 less the umask, and a copying stage keeps that mode
ITEM_MODE = 0o666


def split_checksum(checksum: str) -> tuple[str, str]:
    """`("sha256", "<hex>")` from `"sha256:<hex>"`; ValueError for an algorithm osbuild does not accept."""
    algorithm, _, digest = checksum.partition(":")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unsupported checksum algorithm '{algorithm}' in '{checksum}'")
    return algorithm, digest


def new_hash(algorithm: str) -> Any:
    # md5 and sha1 name content here, they protect nothing: allowed even where FIPS forbids them
    return hashlib.new(algorithm, usedforsecurity=False)


def checksum_of(path: Path, algorithm: str) -> str:
    h = new_hash(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"{algorithm}:{h.hexdigest()}"


class VerifiedFile:
    """A file being written under its checksum; use as a context manager, then `write`, then `commit`."""

    def __init__(self, target: Path, checksum: str) -> None:
        self.algorithm, _ = split_checksum(checksum)
        self.checksum = checksum
        self.target = target
        self.partial = target.with_name(PARTIAL_PREFIX + target.name)
        self.size = 0
        self.committed = False
        self._hash = new_hash(self.algorithm)
        self._fd = -1

    def __enter__(self) -> VerifiedFile:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, ITEM_MODE)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        os.close(self._fd)
        if not self.committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.partial)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._hash.update(data)
        self.size += len(data)

    def rewind(self) -> None:
        """Throw away what was written, to start the file over."""
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._hash = new_hash(self.algorithm)
        self.size = 0

    @property
    def actual(self) -> str:
        return f"{self.algorithm}:{self._hash.hexdigest()}"

    def commit(self) -> None:
        """Move the file to its checksum's name; ChecksumMismatch (and nothing moved) if the bytes differ."""
        actual = self.actual
        if actual != self.checksum:
            raise ChecksumMismatch(self.checksum, actual)
        os.rename(self.partial, self.target)
        self.committed = True
