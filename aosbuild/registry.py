"""A client for OCI registries (the distribution spec), the store's remote tier.

Why our own: the Python registry clients are synchronous (oras-py, on requests) or asyncio-only (on
aiohttp); the engine runs on trio. This is the protocol on httpx, which streams under both backends:
`/v2/` ping, blob HEAD/GET/upload, manifest GET/PUT by tag, tag listing; Basic and Bearer-token auth
from the container tools' auth files; TLS with the system CAs or a given CA file, plain HTTP only for a
loopback registry or when asked.

Everything that goes wrong on the remote side (not there, a digest that does not match, a body cut
short, an unreachable or stalled registry, a server error) raises `RemoteMiss`: for a cache that means
"build it here". Refused credentials raise `RegistryAuthError`. Neither message, nor any log event, holds
a credential: auth headers are built per request and never logged, and `Credentials` hides its secret
from `repr`.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import anyio
import httpx

from .errors import AosbuildError
from .logs import get_logger
from .registryauth import Credentials, find_credentials
from .remotesettings import DEFAULT_TIMEOUT

log = get_logger("aosbuild.registry")

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
REPOSITORY_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
MANIFEST_MAX = 4 << 20
CHUNK = 1 << 20


class RegistryError(AosbuildError):
    """Something about a registry that is not a plain cache miss (a bad reference, a refused request)."""


class RemoteMiss(RegistryError):
    """What was asked for cannot be had from the registry now: build it locally instead.

    `reason` says why (not found, digest mismatch, truncated, unreachable, timed out, server error)."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: {reason}")


class RegistryAuthError(RegistryError):
    """The registry refused our credentials (or wants some and we have none)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Reference:
    """`HOST[:PORT]/REPOSITORY[:TAG]`, optionally written `oci://...` or `docker://...`."""

    registry: str
    repository: str
    tag: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        rest = text
        for prefix in ("oci://", "docker://"):
            if rest.startswith(prefix):
                rest = rest[len(prefix):]
        registry, slash, path = rest.partition("/")
        if not slash or not registry or not path:
            raise RegistryError(f"{text!r} is not a registry reference: write HOST[:PORT]/REPOSITORY[:TAG]")
        tag = None
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, _, tag = path.rpartition(":")
            if not TAG_RE.fullmatch(tag):
                raise RegistryError(f"{text!r}: {tag!r} is not a tag ([A-Za-z0-9_.-], at most 128)")
        if not REPOSITORY_RE.fullmatch(path):
            raise RegistryError(f"{text!r}: {path!r} is not a repository name (lower case, digits, . _ - /)")
        return cls(registry=registry, repository=path, tag=tag)

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}" + (f":{self.tag}" if self.tag else "")


def is_loopback(host: str) -> bool:
    """Whether `HOST[:PORT]` (an IPv6 address in brackets) is this machine: plain HTTP is fine there."""
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {key.lower(): value for key, value in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


def _untrusted(exc: BaseException) -> bool:
    """Whether a connection failed on certificate verification, somewhere in its chain of causes."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _basic(credentials: Credentials) -> str:
    token = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
    return f"Basic {token}"


class RegistryClient:
    """One repository on one registry, with its own HTTP connection pool; open it with `open_registry`."""

    def __init__(self, reference: Reference, http: httpx.AsyncClient, base: str,
                 credentials: Credentials | None) -> None:
        self.reference = reference
        self._http = http
        self._base = base
        self._credentials = credentials
        self._authorization: str | None = None  # the header value that last worked; never logged
        self._bearer_scope: str | None = None

    @property
    def _repo_url(self) -> str:
        return f"{self._base}/v2/{self.reference.repository}"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()

    # -- requests and auth -------------------------------------------------------------------------

    async def _authorize(self, response: httpx.Response, what: str) -> None:
        """Answer a 401's challenge: Basic with our credentials, or a Bearer token from the realm."""
        scheme, params = _challenge(response.headers.get("www-authenticate", ""))
        refused = self._authorization is not None
        if scheme == "basic":
            if self._credentials is None:
                raise RegistryAuthError(f"{self.reference.registry} wants credentials for {what} and none "
                                        "were found: log in with `skopeo login` or `podman login`")
            if refused:
                raise self._refused(what)
            self._authorization = _basic(self._credentials)
            return
        if scheme != "bearer" or "realm" not in params:
            raise RegistryAuthError(f"{self.reference.registry} asks for an unknown kind of auth for {what}")
        scope = params.get("scope") or f"repository:{self.reference.repository}:pull,push"
        if refused and scope == self._bearer_scope:
            raise self._refused(what)  # a token for this very scope did not do: a new one will not either
        # a wider scope than the last token's (a push after a pull: error="insufficient_scope") gets a new one
        query = {"service": params["service"]} if "service" in params else {}
        query["scope"] = scope
        headers = {"Authorization": _basic(self._credentials)} if self._credentials else {}
        try:
            token_response = await self._http.get(params["realm"], params=query, headers=headers)
        except httpx.TimeoutException:
            raise RemoteMiss(what, "the token service did not answer in time") from None
        except httpx.TransportError as exc:
            raise RemoteMiss(what, f"the token service cannot be reached ({type(exc).__name__})") from None
        if token_response.status_code in (401, 403):
            raise self._refused(what)
        if token_response.status_code != 200:
            raise RemoteMiss(what, f"the token service answered HTTP {token_response.status_code}")
        try:
            document = token_response.json()
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RemoteMiss(what, "the token service gave no token")
        self._authorization = f"Bearer {token}"
        self._bearer_scope = scope

    def _refused(self, what: str) -> RegistryAuthError:
        source = self._credentials.source if self._credentials else "none"
        return RegistryAuthError(f"{self.reference.registry} refused the credentials (from {source}) for "
                                 f"{what}: check them with `skopeo login {self.reference.registry}`")

    async def _send(self, method: str, url: str, what: str, *, headers: Mapping[str, str] | None = None,
                    content: bytes | Callable[[], AsyncIterator[bytes]] | None = None,
                    stream: bool = False) -> httpx.Response:
        """One request, answering at most one auth challenge; transport failures are a `RemoteMiss`.

        A streamed body is given as a function that starts the stream, so that a retry sends it again."""
        for attempt in range(3):
            request_headers = dict(headers or {})
            if self._authorization:
                request_headers["Authorization"] = self._authorization
            body = content() if callable(content) else content
            try:
                request = self._http.build_request(method, url, headers=request_headers, content=body)
                response = await self._http.send(request, stream=stream)
            except httpx.TimeoutException:
                raise RemoteMiss(what, f"{self.reference.registry} did not answer in time") from None
            except httpx.TransportError as exc:
                hint = ": its TLS certificate is not trusted (give a CA file)" if _untrusted(exc) else \
                    f" ({type(exc).__name__})"
                raise RemoteMiss(what, f"{self.reference.registry} cannot be reached{hint}") from None
            if response.status_code != 401 or attempt == 2:
                if response.status_code in (401, 403):
                    await response.aclose()
                    raise self._refused(what)
                return response
            await response.aread()
            await self._authorize(response, what)
        raise AssertionError("unreachable")

    @staticmethod
    def _server_error(what: str, response: httpx.Response) -> RemoteMiss:
        return RemoteMiss(what, f"the registry answered HTTP {response.status_code}")

    # -- the API -----------------------------------------------------------------------------------

    async def ping(self) -> str:
        """Check that this is a distribution-spec registry we may use; returns its API version header."""
        response = await self._send("GET", f"{self._base}/v2/", "the registry's /v2/ endpoint")
        if response.status_code != 200:
            raise self._server_error("the registry's /v2/ endpoint", response)
        return str(response.headers.get("docker-distribution-api-version", ""))

    async def blob_size(self, digest: str) -> int | None:
        """The size of blob `digest` if the repository has it, else None."""
        what = f"blob {digest}"
        response = await self._send("HEAD", f"{self._repo_url}/blobs/{digest}", what)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._server_error(what, response)
        return int(response.headers.get("content-length", "0"))

    async def fetch_blob(self, digest: str, dest: Path, *, size: int | None = None,
                         progress: Callable[[int], None] | None = None) -> int:
        """Download blob `digest` to `dest`, verified while streaming; returns its size. With `size` (what
        the manifest's descriptor says), a body that runs past it is cut off there, so an endless or
        enormous one cannot fill the store's filesystem before its digest fails. `progress` is called
        with the bytes received so far after each chunk.

        The bytes go to a temporary file beside `dest`, renamed onto it only when complete and verified:
        a mismatch, a short body, a missing blob or a cancellation leaves no file."""
        if not DIGEST_RE.fullmatch(digest):
            raise RegistryError(f"{digest!r} is not a sha256 digest")
        what = f"blob {digest}"
        fd, temporary = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                got = await self._stream_into(f"{self._repo_url}/blobs/{digest}", digest, what, out, progress, size)
            os.rename(temporary, dest)
        except BaseException:
            os.unlink(temporary)
            raise
        log.debug("registry.blob.fetched", digest=digest, size=got, registry=self.reference.registry)
        return got

    async def _stream_into(self, url: str, digest: str, what: str, out: Any,
                           progress: Callable[[int], None] | None, limit: int | None = None) -> int:
        # identity: the digest and Content-Length are of the blob itself, not of a compressed transfer
        response = await self._send("GET", url, what, stream=True, headers={"Accept-Encoding": "identity"})
        try:
            if response.status_code == 404:
                raise RemoteMiss(what, "not in the registry")
            if response.status_code != 200:
                raise self._server_error(what, response)
            expected = response.headers.get("content-length")
            if limit is not None and expected is not None and expected.isdigit() and int(expected) > limit:
                raise RemoteMiss(what, f"the registry sends {expected} bytes of a blob of {limit} bytes")
            sha256 = hashlib.sha256()
            size = 0
            try:
                async for chunk in response.aiter_raw(CHUNK):
                    size += len(chunk)
                    if limit is not None and size > limit:
                        # closed under the stream's generators, which end with the read that fails
                        # (raising here would leave them to the garbage collector)
                        await response.aclose()
                        continue
                    sha256.update(chunk)
                    await anyio.to_thread.run_sync(out.write, chunk)
                    if progress is not None:
                        progress(size)
            except httpx.TimeoutException:
                raise RemoteMiss(what, f"{self.reference.registry} stalled after {size} bytes") from None
            except httpx.TransportError:
                if limit is None or size <= limit:
                    raise RemoteMiss(what, f"the body was cut short after {size} bytes") from None
            if limit is not None and size > limit:
                raise RemoteMiss(what, f"the registry sent more than the {limit} bytes of the blob")
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()
        if expected is not None and int(expected) != size:
            raise RemoteMiss(what, f"the body was cut short: {size} of {expected} bytes")
        if "sha256:" + sha256.hexdigest() != digest:
            raise RemoteMiss(what, f"the bytes do not match the digest (got sha256:{sha256.hexdigest()})")
        return size

    async def push_blob(self, digest: str, source: Path | bytes, *, chunk_size: int | None = None) -> bool:
        """Upload a blob unless the repository has it already; True if it was uploaded.

        Monolithic (POST, then PUT with the body) unless `chunk_size` asks for PATCH chunks. Two clients
        pushing the same digest at once are both fine: the registry commits content-addressed blobs, and
        a failed upload whose blob turns out to be there (the other client won) counts as done."""
        what = f"blob {digest}"
        if await self.blob_size(digest) is not None:
            return False
        size = len(source) if isinstance(source, bytes) else (await anyio.Path(source).stat()).st_size
        try:
            await self._upload(digest, source, size, what, chunk_size)
        except RemoteMiss:
            if await self.blob_size(digest) is not None:
                return False
            raise
        log.debug("registry.blob.pushed", digest=digest, size=size, registry=self.reference.registry)
        return True

    async def _upload(self, digest: str, source: Path | bytes, size: int, what: str, chunk_size: int | None) -> None:
        response = await self._send("POST", f"{self._repo_url}/blobs/uploads/", what)
        await response.aread()
        if response.status_code != 202 or "location" not in response.headers:
            raise self._server_error(what, response)
        location = str(response.url.join(response.headers["location"]))
        octets = {"Content-Type": "application/octet-stream"}
        body: bytes | Callable[[], AsyncIterator[bytes]]
        if chunk_size is not None:
            for start in range(0, size, chunk_size):
                chunk = source[start:start + chunk_size] if isinstance(source, bytes) else \
                    await anyio.to_thread.run_sync(_read_range, source, start, chunk_size)
                headers = {**octets, "Content-Range": f"{start}-{start + len(chunk) - 1}",
                           "Content-Length": str(len(chunk))}
                response = await self._send("PATCH", location, what, headers=headers, content=chunk)
                await response.aread()
                if response.status_code != 202 or "location" not in response.headers:
                    raise self._server_error(what, response)
                location = str(response.url.join(response.headers["location"]))
            body = b""  # the chunks were the blob: the PUT only closes the upload
        elif isinstance(source, bytes):
            body = source
        else:
            body = lambda: iter_file(source)  # noqa: E731  # a stream that a retry can start again
        url = httpx.URL(location).copy_merge_params({"digest": digest})
        length = len(body) if isinstance(body, bytes) else size
        response = await self._send("PUT", str(url), what, content=body,
                                    headers={**octets, "Content-Length": str(length)})
        await response.aread()
        if response.status_code not in (201, 204):
            raise self._server_error(what, response)

    async def get_manifest(self, tag: str) -> tuple[dict[str, Any], str]:
        """The manifest under `tag` (or a digest) and its digest; verified against `Docker-Content-Digest`."""
        what = f"manifest {self.reference.repository}:{tag}"
        headers = {"Accept": f"{MANIFEST_TYPE}, {DOCKER_MANIFEST_TYPE}"}
        response = await self._send("GET", f"{self._repo_url}/manifests/{tag}", what, headers=headers,
                                    stream=True)
        try:
            if response.status_code == 404:
                raise RemoteMiss(what, "not in the registry")
            if response.status_code != 200:
                raise self._server_error(what, response)
            body = b""
            try:
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MANIFEST_MAX:
                        raise RemoteMiss(what, f"larger than {MANIFEST_MAX} bytes")
            except httpx.TimeoutException:
                raise RemoteMiss(what, f"{self.reference.registry} stalled") from None
            except httpx.TransportError:
                raise RemoteMiss(what, "the body was cut short") from None
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        claimed = response.headers.get("docker-content-digest")
        if claimed and claimed != digest:
            raise RemoteMiss(what, f"the bytes do not match the registry's digest {claimed}")
        if tag.startswith("sha256:") and tag != digest:
            raise RemoteMiss(what, "the bytes do not match the digest asked for")
        try:
            manifest = json.loads(body)
        except ValueError:
            raise RemoteMiss(what, "not JSON") from None
        if not isinstance(manifest, dict):
            raise RemoteMiss(what, "not a JSON object")
        return manifest, digest

    async def has_manifest(self, tag: str) -> bool:
        """Whether the repository has a manifest under `tag` (a HEAD request: nothing is downloaded)."""
        what = f"manifest {self.reference.repository}:{tag}"
        headers = {"Accept": f"{MANIFEST_TYPE}, {DOCKER_MANIFEST_TYPE}"}
        response = await self._send("HEAD", f"{self._repo_url}/manifests/{tag}", what, headers=headers)
        await response.aclose()
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise self._server_error(what, response)
        return True

    async def put_manifest(self, tag: str, manifest: Mapping[str, Any] | bytes) -> str:
        """Store `manifest` (an OCI image manifest) under `tag`; returns its digest."""
        if not TAG_RE.fullmatch(tag):
            raise RegistryError(f"{tag!r} is not a tag ([A-Za-z0-9_.-], at most 128)")
        what = f"manifest {self.reference.repository}:{tag}"
        body = manifest if isinstance(manifest, bytes) else canonical_json(manifest)
        response = await self._send("PUT", f"{self._repo_url}/manifests/{tag}", what, content=body,
                                    headers={"Content-Type": MANIFEST_TYPE})
        await response.aread()
        if response.status_code not in (201, 200):
            raise self._server_error(what, response)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        log.debug("registry.manifest.pushed", tag=tag, digest=digest, registry=self.reference.registry)
        return digest

    async def tags(self) -> list[str]:
        """Every tag of the repository, following the registry's pagination."""
        what = f"the tags of {self.reference.repository}"
        url: str | None = f"{self._repo_url}/tags/list"
        found: list[str] = []
        while url:
            response = await self._send("GET", url, what)
            await response.aread()
            if response.status_code == 404:
                return found
            if response.status_code != 200:
                raise self._server_error(what, response)
            found += response.json().get("tags") or []
            link = re.match(r"\s*<([^>]+)>", response.headers.get("link", ""))
            url = str(response.url.join(link.group(1))) if link else None
        return found


def _read_range(path: Path, start: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(size)


def canonical_json(document: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces: the same document always has the same bytes, so the same digest."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=os.fspath(ca_file))
    return context


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryOptions:
    """How to reach a registry: HTTPS verified with the system CAs (plus `ca_file`, which implies HTTPS),
    plain HTTP for a loopback registry or with `insecure`, HTTPS to a loopback one with `tls`; `timeout`
    per request phase (connect, each read and write: a registry silent for that long is a miss)."""

    insecure: bool = False
    tls: bool = False
    ca_file: Path | None = None
    timeout: float = DEFAULT_TIMEOUT


def open_registry(reference: Reference | str, options: RegistryOptions = RegistryOptions(), *,
                  credentials: Credentials | None = None, environ: Mapping[str, str] | None = None,
                  transport: httpx.AsyncBaseTransport | None = None) -> RegistryClient:
    """A client for `reference`'s repository (use it with `async with`).

    Credentials come from the auth files unless given. Plain HTTP is used for loopback registries and
    with `insecure`; anything else is HTTPS, verified. `transport` is for tests' fakes."""
    ref = Reference.parse(reference) if isinstance(reference, str) else reference
    plain = (options.insecure or is_loopback(ref.registry)) and not (options.tls or options.ca_file)
    scheme = "http" if plain else "https"
    if credentials is None:
        credentials = find_credentials(ref.registry, ref.repository, environ)
    http = httpx.AsyncClient(timeout=httpx.Timeout(options.timeout), follow_redirects=True,
                             verify=_ssl_context(options.ca_file), transport=transport)
    return RegistryClient(ref, http, f"{scheme}://{ref.registry}", credentials)


async def iter_file(path: Path) -> AsyncIterator[bytes]:
    """A file's bytes in chunks, read in a worker thread."""
    async with await anyio.open_file(path, "rb") as f:
        while chunk := await f.read(CHUNK):
            yield chunk

