"""Fetchers: how the items of each source type get their bytes.

A fetcher writes one item into the `VerifiedFile` it is given and commits it; `aosbuild.sources` decides
which items to fetch, holds their locks and reports on them. `FETCHERS` maps a source type to a factory
that gets the run's `Downloader` (v1's `org.osbuild.files` is loaded as `org.osbuild.curl`).
"""

from __future__ import annotations

import base64
import lzma
from collections.abc import Callable
from typing import Any, Protocol

from .checksum import VerifiedFile
from .download import Downloader, Progress


class Fetcher(Protocol):
    def label(self, description: Any) -> str | None:
        """Where the item comes from, for messages (a URL); None when that says nothing."""

    async def fetch(self, checksum: str, description: Any, out: VerifiedFile, progress: Progress) -> None:
        """Write the item's bytes to `out` and commit it."""


class InlineFetcher:
    """org.osbuild.inline: the data is in the manifest, base64 or lzma+base64."""

    def label(self, description: Any) -> str | None:
        return None

    async def fetch(self, checksum: str, description: Any, out: VerifiedFile, progress: Progress) -> None:
        try:
            data = base64.b64decode(description["data"])
            if description.get("encoding") == "lzma+base64":
                data = lzma.decompress(data)
        except (ValueError, lzma.LZMAError) as exc:
            raise ValueError(f"cannot decode the inline data: {exc}; an item's `data` must be what its "
                             "`encoding` says (base64 or lzma+base64)") from None
        progress.expect(len(data))
        out.write(data)
        progress.advance(len(data))
        out.commit()


class CurlFetcher:
    """org.osbuild.curl: `{checksum: url}` or `{checksum: {"url", "insecure", "secrets": {"name"}}}`."""

    def __init__(self, downloader: Downloader) -> None:
        self.downloader = downloader

    def label(self, description: Any) -> str | None:
        return str(description["url"] if isinstance(description, dict) else description)

    async def fetch(self, checksum: str, description: Any, out: VerifiedFile, progress: Progress) -> None:
        options = description if isinstance(description, dict) else {}
        secrets = options.get("secrets", {}).get("name")
        await self.downloader.fetch(str(self.label(description)), out, progress,
                                    insecure=bool(options.get("insecure", False)), secrets=secrets)


FETCHERS: dict[str, Callable[[Downloader], Fetcher]] = {
    "org.osbuild.inline": lambda _: InlineFetcher(),
    "org.osbuild.curl": CurlFetcher,
}
