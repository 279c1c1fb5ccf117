"""Which registries a build uses as its remote cache, as the user set them (flags, `aosbuild store remote`).

Apart from `remotecache` so that reading these settings, which every build does, does not import the
registry client (httpx, zstandard: about 40 ms of start-up) for builds that use no registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PUSH_MODES = ("none", "pipelines", "all")
DEFAULT_PUSH = "pipelines"
DEFAULT_TIMEOUT = 30.0  # seconds a registry may take to answer (`--cache-remote-timeout`)


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteSettings:
    """Which registries a build uses: `refs[0]` is pushed to, all are read, in order."""

    refs: tuple[str, ...] = ()
    push: str = DEFAULT_PUSH
    insecure: bool = False
    timeout: float = DEFAULT_TIMEOUT

    def to_json(self) -> dict[str, Any]:
        return {"refs": list(self.refs), "push": self.push, "insecure": self.insecure}

    @classmethod
    def from_json(cls, data: Any) -> RemoteSettings:
        if not isinstance(data, dict):
            return cls()
        refs = data.get("refs")
        push = data.get("push")
        return cls(refs=tuple(str(r) for r in refs) if isinstance(refs, list) else (),
                   push=push if push in PUSH_MODES else DEFAULT_PUSH, insecure=bool(data.get("insecure")))


def resolve_settings(stored: Any, *, refs: tuple[str, ...] | None, push: str | None, insecure: bool,
                     timeout: float | None) -> RemoteSettings | None:
    """The flags of one build over the store's own setting (`aosbuild store remote`); None: no remote.

    `refs` None means the store's; `()` (`--no-cache-remote`) means none at all."""
    base = RemoteSettings.from_json(stored)
    chosen = base.refs if refs is None else refs
    if not chosen:
        return None
    return RemoteSettings(refs=chosen, push=push or base.push, insecure=insecure or base.insecure,
                          timeout=timeout or DEFAULT_TIMEOUT)
