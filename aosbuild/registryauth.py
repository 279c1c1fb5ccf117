"""Registry credentials where container tools keep them (containers-auth.json(5), docker's config.json).

Only the `auths` map is read (base64 `user:password` under a host or `host/namespace` key); credential
helpers (`credHelpers`, `credsStore`) are not run. The secret never leaves a `Credentials`: its `repr`
hides it, and errors about a file name the file and the key, never the value.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AosbuildError


class AuthFileError(AosbuildError):
    """An auth file holds an entry for the registry that cannot be read."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and password (or token) for one registry; `source` says which file they came from."""

    username: str
    password: str = field(repr=False)
    source: str = "given"


def _normalise_key(key: str) -> str:
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    key = key.rstrip("/")
    return key[: -len("/v1")] if key.endswith("/v1") else key


def auth_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The auth files container tools read, in their order: `$REGISTRY_AUTH_FILE`,
    `$XDG_RUNTIME_DIR/containers/auth.json`, `~/.docker/config.json`."""
    env = os.environ if environ is None else environ
    files = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    home = env.get("HOME") or os.path.expanduser("~")
    files.append(Path(home) / ".docker" / "config.json")
    return files


def find_credentials(registry: str, repository: str,
                     environ: Mapping[str, str] | None = None) -> Credentials | None:
    """The credentials for `registry`'s `repository` from the first auth file that has an entry for it.

    Entries are looked up as containers-auth.json(5) does: `host/repo/path`, then shorter namespaces,
    then `host`; keys may carry a scheme or docker's `/v1/` suffix. A file that is missing or unreadable
    is skipped; a malformed `auth` value is an error that names the file, never the value."""
    parts = repository.split("/")
    wanted = [f"{registry}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)]
    wanted.append(registry)
    for path in auth_files(environ):
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        auths = document.get("auths") if isinstance(document, dict) else None
        if not isinstance(auths, dict):
            continue
        entries = {_normalise_key(key): value for key, value in auths.items() if isinstance(value, dict)}
        for key in wanted:
            entry = entries.get(key)
            if entry is None or not isinstance(entry.get("auth"), str):
                continue
            try:
                username, colon, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise AuthFileError(f"{path}: the `auth` entry for {key} is not base64 of user:password") from None
            if not colon:
                raise AuthFileError(f"{path}: the `auth` entry for {key} is not base64 of user:password")
            return Credentials(username, password, source=str(path))
    return None
