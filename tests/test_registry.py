"""The registry client against a real registry (Debian's docker-registry, htpasswd auth, on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import structlog

from aosbuild import ocilayer, registry, registryauth, stageimage
from aosbuild.registry import Reference, RegistryOptions, RemoteMiss
from aosbuild.registryauth import Credentials
from aosbuild.remotecache import Remote, RemoteCache
from aosbuild.remotesettings import RemoteSettings

from .layertrees import make_upper, tree
from .registry import PASSWORD, USER, Registry, basic_auth, run_registry

STAGE_ID = "5" * 64
CREDENTIALS = Credentials(USER, PASSWORD)


def client(served: Registry, repository: str = "aosbuild/cache", *, timeout: float = 10,
           credentials: Credentials | None = CREDENTIALS) -> registry.RegistryClient:
    return registry.open_registry(f"{served.host}/{repository}", RegistryOptions(timeout=timeout),
                                  credentials=credentials, environ={})


def write_layer(upper: Path, blob: Path, compression: ocilayer.Compression = "zstd") -> ocilayer.LayerInfo:
    with open(blob, "wb") as out:
        return ocilayer.write_layer(upper, out, compression=compression)


RESULTS = [{"id": STAGE_ID, "type": "org.osbuild.example", "metadata": {"packages": ["bash"]}}]


async def push_image(remote: registry.RegistryClient, blobs: list[tuple[Path, ocilayer.LayerInfo]]) -> str:
    """Stage `STAGE_ID`'s image of these layer blobs, pushed as the remote cache pushes one."""
    for path, info in blobs:
        await remote.push_blob(info.digest, path)
    stack = [(STAGE_ID, n == 0) for n in range(len(blobs))]
    return await stageimage.push_image(remote, STAGE_ID, [info for _, info in blobs], stack, RESULTS)


def test_references() -> None:
    ref = Reference.parse("oci://127.0.0.1:5000/aosbuild/cache")
    assert (ref.registry, ref.repository, ref.tag) == ("127.0.0.1:5000", "aosbuild/cache", None)
    assert Reference.parse("registry.example:5000/a/b:stage-x").tag == "stage-x"
    assert str(Reference.parse("docker://h/r:t")) == "h/r:t"
    with pytest.raises(registry.RegistryError, match="not a registry reference"):
        Reference.parse("just-a-name")
    with pytest.raises(registry.RegistryError, match="repository name"):
        Reference.parse("h/Upper/Case")
    tag = stageimage.stage_tag("ab" * 32)
    assert tag == "stage-" + "ab" * 32
    assert registry.TAG_RE.fullmatch(tag)
    with pytest.raises(registry.RegistryError):
        stageimage.stage_tag("not-hex")
    assert registry.is_loopback("127.0.0.1:5000")
    assert registry.is_loopback("[::1]:5000")
    assert registry.is_loopback("localhost")
    assert not registry.is_loopback("registry.example:443")


async def test_plain_http_only_for_loopback_or_when_asked() -> None:
    cases = [("registry.example/a", RegistryOptions(), "https://"),
             ("registry.example/a", RegistryOptions(insecure=True), "http://"),
             ("127.0.0.1:5000/a", RegistryOptions(), "http://"),
             ("127.0.0.1:5000/a", RegistryOptions(tls=True), "https://")]
    for ref, options, scheme in cases:
        async with registry.open_registry(ref, options, environ={}) as remote:
            assert remote._base.startswith(scheme), (ref, options)


def test_the_client_runs_on_asyncio_too(served: Registry, workdir: Path) -> None:
    data = os.urandom(100_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    async def push_and_pull() -> None:
        async with client(served) as remote:
            assert await remote.push_blob(digest, data, chunk_size=30_000)
            await remote.fetch_blob(digest, workdir / "blob")
            served.blob_path(digest).write_bytes(data[::-1])
            with pytest.raises(RemoteMiss, match="do not match"):
                await remote.fetch_blob(digest, workdir / "again")

    anyio.run(push_and_pull, backend="asyncio")
    assert (workdir / "blob").read_bytes() == data
    assert not (workdir / "again").exists()


async def test_a_layer_and_manifest_pushed_are_pulled_into_another_directory(served: Registry,
                                                                            workdir: Path) -> None:
    upper = make_upper(workdir / "upper")
    zstd = write_layer(upper, workdir / "layer.zst")
    async with client(served) as pusher:
        assert await pusher.ping() == "registry/2.0"
        assert await pusher.blob_size(zstd.digest) is None
        digest = await push_image(pusher, [(workdir / "layer.zst", zstd)])
        assert await pusher.blob_size(zstd.digest) == zstd.size
        assert not await pusher.push_blob(zstd.digest, workdir / "layer.zst")  # there already: not sent again
        assert stageimage.stage_tag(STAGE_ID) in await pusher.tags()
    # another "machine": a new client, its own directory
    pulled = workdir / "machine-b"
    pulled.mkdir()
    async with client(served) as puller:
        manifest, manifest_digest = await puller.get_manifest(stageimage.stage_tag(STAGE_ID))
        assert manifest_digest == digest
        assert manifest["mediaType"] == registry.MANIFEST_TYPE
        assert manifest["annotations"]["org.aosbuild.stage-id"] == STAGE_ID
        await puller.fetch_blob(manifest["config"]["digest"], pulled / "config.json")
        config = json.loads((pulled / "config.json").read_bytes())
        assert config["aosbuild"] == {"stack": [{"id": STAGE_ID, "flat": True}], "results": RESULTS}
        assert config["rootfs"]["diff_ids"] == [zstd.diff_id]
        [layer] = manifest["layers"]
        size = await puller.fetch_blob(layer["digest"], pulled / "layer")
        assert size == zstd.size
    unpacked = pulled / "upper"
    unpacked.mkdir()
    with open(pulled / "layer", "rb") as f:  # noqa: ASYNC230  # the test's own check, after the client is done
        ocilayer.unpack_layer(f, unpacked, into="upper")
    assert tree(unpacked) == tree(upper)


async def test_a_chunked_upload_and_a_gzip_layer(served: Registry, workdir: Path) -> None:
    upper = workdir / "upper"
    upper.mkdir()
    (upper / "big").write_bytes(os.urandom(300_000))
    info = write_layer(upper, workdir / "layer.gz", "gzip")
    async with client(served) as remote:
        assert await remote.push_blob(info.digest, workdir / "layer.gz", chunk_size=64 * 1024)
        assert await remote.blob_size(info.digest) == info.size
        await remote.fetch_blob(info.digest, workdir / "back.gz")
    assert (workdir / "back.gz").read_bytes() == (workdir / "layer.gz").read_bytes()


def no_partial_files(directory: Path) -> bool:
    return not any(name.endswith(".part") for name in os.listdir(directory))


async def pushed_blob(served: Registry, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with client(served) as remote:
        assert await remote.push_blob(digest, data)
    return digest


async def test_a_corrupt_blob_in_the_registry_is_a_miss_and_leaves_nothing(served: Registry,
                                                                          workdir: Path) -> None:
    data = os.urandom(200_000)
    digest = await pushed_blob(served, data)
    stored = served.blob_path(digest)
    assert stored.read_bytes() == data
    stored.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])  # one byte flipped
    dest = workdir / "pulled"
    dest.mkdir()
    async with client(served) as remote:
        with pytest.raises(RemoteMiss, match="do not match the digest"):
            await remote.fetch_blob(digest, dest / "blob")
        stored.write_bytes(data[:5000])  # truncated in the storage
        with pytest.raises(RemoteMiss, match="do not match the digest"):
            await remote.fetch_blob(digest, dest / "blob")
    assert os.listdir(dest) == []


async def test_a_deleted_blob_is_a_miss(served: Registry, workdir: Path) -> None:
    digest = await pushed_blob(served, os.urandom(5000))
    shutil.rmtree(served.blob_path(digest).parent)
    async with client(served) as remote:
        with pytest.raises(RemoteMiss):
            await remote.fetch_blob(digest, workdir / "blob")
        with pytest.raises(RemoteMiss, match="not in the registry"):
            await remote.get_manifest(stageimage.stage_tag("0" * 64))
    assert not (workdir / "blob").exists()
    assert no_partial_files(workdir)


async def test_a_registry_stopped_mid_pull_is_a_miss_and_leaves_no_partial_file(served: Registry,
                                                                                workdir: Path) -> None:
    data = os.urandom(48 << 20)
    digest = await pushed_blob(served, data)
    dest = workdir / "pulled"
    dest.mkdir()
    received: list[int] = []

    def stop_at_first_chunk(size: int) -> None:
        if not received:
            served.stop()  # SIGKILL: what is in flight is all the client will get
        received.append(size)

    async with client(served) as remote:
        with pytest.raises(RemoteMiss, match="cut short"):
            await remote.fetch_blob(digest, dest / "blob", progress=stop_at_first_chunk)
    assert 0 < received[-1] < len(data)
    assert os.listdir(dest) == []


async def test_a_download_cancelled_midway_leaves_nothing(served: Registry, workdir: Path) -> None:
    digest = await pushed_blob(served, os.urandom(24 << 20))
    pulled = workdir / "pulled"
    pulled.mkdir()
    async with client(served) as remote:
        with anyio.CancelScope() as scope:
            await remote.fetch_blob(digest, pulled / "blob", progress=lambda _size: scope.cancel())
        assert scope.cancelled_caught
    assert os.listdir(pulled) == []


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel completes them) and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


async def test_a_stalled_registry_is_a_miss_within_the_timeout(silent_port: int, workdir: Path) -> None:
    remote = registry.open_registry(f"127.0.0.1:{silent_port}/aosbuild/cache", RegistryOptions(timeout=1),
                                    credentials=CREDENTIALS, environ={})
    async with remote:
        with anyio.fail_after(15):  # wide: the point is that it ends, as a miss
            with pytest.raises(RemoteMiss, match="did not answer in time"):
                await remote.ping()
            with pytest.raises(RemoteMiss, match="did not answer in time"):
                await remote.fetch_blob("sha256:" + "0" * 64, workdir / "blob")
    assert os.listdir(workdir) == []


async def test_a_body_that_stalls_halfway_is_a_miss(workdir: Path) -> None:
    """A server that sends the headers and part of the blob, then nothing: the read timeout ends it."""
    data = os.urandom(100_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    done = anyio.Event()

    async def half_then_silence(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data[:40_000])
            await done.wait()

    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, half_then_silence)
        remote = registry.open_registry(f"127.0.0.1:{port}/aosbuild/cache", RegistryOptions(timeout=1),
                                        credentials=CREDENTIALS, environ={})
        async with remote:
            with anyio.fail_after(15), pytest.raises(RemoteMiss, match="stalled after"):
                await remote.fetch_blob(digest, workdir / "blob")
        done.set()
        group.cancel_scope.cancel()
    assert os.listdir(workdir) == []


async def test_two_clients_pushing_the_same_content_at_once_both_succeed(served: Registry,
                                                                        workdir: Path) -> None:
    upper = make_upper(workdir / "upper")
    (upper / "payload").write_bytes(os.urandom(2 << 20))
    info = write_layer(upper, workdir / "layer")
    outcomes: list[str] = []

    async def machine(chunk_size: int | None) -> None:
        async with client(served) as remote:
            await remote.push_blob(info.digest, workdir / "layer", chunk_size=chunk_size)
            outcomes.append(await push_image(remote, [(workdir / "layer", info)]))

    async with anyio.create_task_group() as group:
        group.start_soon(machine, None)
        group.start_soon(machine, 256 * 1024)
    assert len(outcomes) == 2
    assert outcomes[0] == outcomes[1]  # canonical JSON: the same manifest, byte for byte
    async with client(served) as remote:
        manifest, digest = await remote.get_manifest(stageimage.stage_tag(STAGE_ID))
        assert digest == outcomes[0]
        await remote.fetch_blob(manifest["layers"][0]["digest"], workdir / "pulled")
    assert (workdir / "pulled").read_bytes() == (workdir / "layer").read_bytes()


async def test_a_wrong_password_is_a_clear_error_with_no_secret_in_it(
        served: Registry, caplog: pytest.LogCaptureFixture) -> None:
    secret = "wrong-but-still-secret-9f3a"
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events:
        async with client(served, credentials=Credentials(USER, secret, source="/tmp/auth.json")) as remote:
            with pytest.raises(registry.RegistryAuthError) as caught:
                await remote.ping()
            with pytest.raises(registry.RegistryAuthError):
                await remote.push_blob("sha256:" + "1" * 64, b"x")
        async with client(served, credentials=None) as anonymous:
            with pytest.raises(registry.RegistryAuthError, match="none were found"):
                await anonymous.ping()
        async with client(served) as good:  # the right one works, and is not logged either
            ok = "sha256:" + hashlib.sha256(b"ok").hexdigest()
            await good.push_blob(ok, b"ok")
            assert await good.blob_size(ok) == 2
    message = str(caught.value)
    assert "refused the credentials" in message
    assert "/tmp/auth.json" in message
    basic, good_basic = basic_auth(USER, secret), basic_auth()
    everything = message + repr(caught.value.args) + repr(events) + caplog.text
    for leak in (secret, basic, PASSWORD, good_basic):
        assert leak not in everything
    assert secret not in repr(Credentials(USER, secret))
    assert caplog.text  # httpx did log its requests: the check above looked at something
    assert any(event["event"] == "registry.blob.pushed" for event in events)  # and so did the client


async def test_credentials_come_from_the_auth_files_in_their_order(served: Registry, workdir: Path) -> None:
    def auth_file(path: Path, key: str, password: str, **more: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        auths = {k: {"auth": basic_auth(USER, p)} for k, p in {key: password, **more}.items()}
        path.write_text(json.dumps({"auths": auths}))
        return path

    def find(environ: dict[str, str]) -> Credentials | None:
        return registryauth.find_credentials(ref.registry, ref.repository, environ)

    ref = Reference.parse(f"{served.host}/aosbuild/cache")
    runtime = workdir / "run"
    home = workdir / "home"
    auth_file(home / ".docker/config.json", f"https://{served.host}/v1/", "docker-config-password")
    auth_file(runtime / "containers/auth.json", served.host, PASSWORD)
    environ = {"XDG_RUNTIME_DIR": os.fspath(runtime), "HOME": os.fspath(home)}
    found = find(environ)
    assert found is not None
    assert (found.password, found.source) == (PASSWORD, str(runtime / "containers/auth.json"))
    # $REGISTRY_AUTH_FILE first; a namespace entry wins over the host's
    first = auth_file(workdir / "first.json", served.host, "host-password",
                      **{f"{served.host}/aosbuild": "namespace-password", f"{served.host}/other": "other"})
    found = find({**environ, "REGISTRY_AUTH_FILE": os.fspath(first)})
    assert found is not None
    assert found.password == "namespace-password"
    found = find({"HOME": os.fspath(home)})
    assert found is not None
    assert found.password == "docker-config-password"
    async with registry.open_registry(ref, RegistryOptions(timeout=10), environ=environ) as remote:
        assert await remote.ping() == "registry/2.0"
    (workdir / "bad.json").write_text(json.dumps({"auths": {served.host: {"auth": "!!notbase64"}}}))
    with pytest.raises(registryauth.AuthFileError, match="not base64") as caught:
        find({"REGISTRY_AUTH_FILE": os.fspath(workdir / "bad.json")})
    assert "notbase64" not in str(caught.value)


async def test_bearer_token_challenges_are_answered_from_the_realm() -> None:
    """A fake registry and token service (httpx's MockTransport): the token is asked for with Basic
    credentials and the challenge's scope, then sent as a Bearer; a push after a pull asks for a token
    of the wider scope; a refused token request names no secret."""
    asked: list[httpx.Request] = []
    good = "Basic " + basic_auth("u", "right")

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        if request.url.host == "auth.example":
            if request.headers.get("authorization") != good:
                return httpx.Response(401)
            return httpx.Response(200, json={"token": "tok:" + request.url.params["scope"]})
        scope = "repository:team/cache:pull" if request.method in ("GET", "HEAD") else \
            "repository:team/cache:pull,push"
        if request.headers.get("authorization") == f"Bearer tok:{scope}" or (
                scope.endswith(":pull") and request.headers.get("authorization", "").endswith(",push")):
            if request.method == "POST":
                return httpx.Response(202, headers={"Location": "/v2/team/cache/blobs/uploads/u1"})
            if request.method == "PUT":
                return httpx.Response(201)
            if request.method == "HEAD":
                return httpx.Response(404)
            return httpx.Response(200, headers={"Docker-Distribution-API-Version": "registry/2.0"})
        error = ',error="insufficient_scope"' if request.headers.get("authorization") else ""
        challenge = f'Bearer realm="https://auth.example/token",service="registry.example",scope="{scope}"{error}'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    transport = httpx.MockTransport(handler)
    async with registry.open_registry("registry.example/team/cache", credentials=Credentials("u", "right"),
                                      transport=transport) as remote:
        assert await remote.ping() == "registry/2.0"
        assert await remote.push_blob("sha256:" + hashlib.sha256(b"x").hexdigest(), b"x")
    token_requests = [r for r in asked if r.url.host == "auth.example"]
    assert [r.url.params["scope"] for r in token_requests] == [
        "repository:team/cache:pull", "repository:team/cache:pull,push"]
    assert token_requests[0].url.params["service"] == "registry.example"
    assert asked[0].url.scheme == "https"  # not loopback, not insecure: TLS
    async with registry.open_registry("registry.example/team/cache", credentials=Credentials("u", "wrong-pw"),
                                      transport=transport) as remote:
        with pytest.raises(registry.RegistryAuthError) as caught:
            await remote.ping()
    assert "wrong-pw" not in str(caught.value)
    assert "refused the credentials" in str(caught.value)


async def test_tls_with_a_given_ca(workdir: Path) -> None:
    key, cert = workdir / "key.pem", workdir / "cert.pem"
    await anyio.run_process(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert])
    with run_registry(workdir / "registry", tls=(cert, key)) as served:
        ref = f"{served.host}/aosbuild/cache"
        async with registry.open_registry(ref, RegistryOptions(ca_file=cert), credentials=CREDENTIALS,
                                          environ={}) as remote:
            assert remote._base.startswith("https://")  # loopback, but asked for TLS by the CA file
            assert await remote.ping() == "registry/2.0"
        async with registry.open_registry(ref, RegistryOptions(tls=True), credentials=CREDENTIALS,
                                          environ={}) as remote:
            with pytest.raises(RemoteMiss, match="not trusted"):
                await remote.ping()


async def overlay_changes(lowers: list[Path], upper: Path, scratch: Path, change: Any) -> dict[str, Any]:
    """Make a real overlayfs upper directory: mount `lowers` (top first) with `upper`, let `change` edit
    the merged view, and return the merged tree's digest (what the layers must add up to)."""
    merged, work = scratch / f"{upper.name}.merged", scratch / f"{upper.name}.work"
    for directory in (upper, merged, work):
        directory.mkdir()
    options = (f"lowerdir={':'.join(map(os.fspath, lowers))},upperdir={upper},workdir={work},"
               "redirect_dir=off,metacopy=off,index=off")
    await anyio.run_process(["mount", "-t", "overlay", "overlay", "-o", options, merged])
    try:
        change(merged)
        return tree(merged)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.run_process(["umount", merged])


def first_changes(merged: Path) -> None:
    (merged / "etc/deleted").unlink()  # a whiteout
    shutil.rmtree(merged / "var/cache")  # removed and made again: an opaque directory
    (merged / "var/cache").mkdir()
    (merged / "var/cache/new").write_text("made in the second layer\n")
    (merged / "etc/hostname").write_text("changed\n")  # copied up
    os.chmod(merged / "usr/bin/ping", 0o755)  # metadata only, still copied up whole
    os.setxattr(merged / "etc/kept", "user.note", b"added above")


def second_changes(merged: Path) -> None:
    shutil.rmtree(merged / "usr")  # a whole directory whited out
    os.link(merged / "var/cache/new", merged / "var/cache/new-link")
    os.mknod(merged / "etc/console", 0o600 | 0o020000, os.makedev(5, 1))


async def test_skopeo_fetches_a_pushed_image_whose_layers_add_up_to_the_tree(served: Registry,
                                                                           workdir: Path) -> None:
    base = make_upper(workdir / "base")
    (base / "etc/deleted").unlink()
    (base / "etc/deleted").write_text("a lower file, deleted above\n")
    (base / "etc/kept").write_text("kept\n")
    os.removexattr(base / "var/cache", "trusted.overlay.opaque")
    (base / "var/cache/old").write_text("hidden above\n")
    expected_one = await overlay_changes([base], workdir / "up1", workdir, first_changes)
    expected = await overlay_changes([workdir / "up1", base], workdir / "up2", workdir, second_changes)
    assert expected != expected_one
    assert os.getxattr(workdir / "up1/var/cache", "trusted.overlay.opaque") == b"y"  # real overlay marks
    layers = [(workdir / f"l{n}", write_layer(upper, workdir / f"l{n}"))
              for n, upper in enumerate([base, workdir / "up1", workdir / "up2"])]
    tag = stageimage.stage_tag(STAGE_ID)
    async with client(served) as remote:
        await push_image(remote, layers)
    oci = workdir / "oci"
    await anyio.run_process(["skopeo", "copy", "--src-tls-verify=false", "--src-creds", f"{USER}:{PASSWORD}",
                             f"docker://{served.host}/aosbuild/cache:{tag}", f"oci:{oci}:{tag}"])
    index = json.loads((oci / "index.json").read_text())
    [entry] = index["manifests"]

    def blob(digest: str) -> Path:
        return oci / "blobs/sha256" / digest.removeprefix("sha256:")

    manifest = json.loads(blob(entry["digest"]).read_text())
    assert [layer["digest"] for layer in manifest["layers"]] == [info.digest for _, info in layers]
    assert json.loads(blob(manifest["config"]["digest"]).read_text())["aosbuild"]["results"] == RESULTS
    rootfs = workdir / "rootfs"
    rootfs.mkdir()
    for layer in manifest["layers"]:
        with open(blob(layer["digest"]), "rb") as f:  # noqa: ASYNC230  # the test's own check
            ocilayer.unpack_layer(f, rootfs, into="tree")
    assert tree(rootfs) == expected


@dataclass
class Endless:
    """A server that answers every request with 200 and zeros that do not end; `sent` counts them."""

    ref: str
    sent: int = 0


@asynccontextmanager
async def endless_registry(header: bytes = b"Connection: close\r\n") -> AsyncIterator[Endless]:
    """An `Endless` server on 127.0.0.1 while the block runs, its response headers `header`."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    served = Endless(ref=f"127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}/aosbuild/cache")

    async def endless(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            try:
                await stream.send(b"HTTP/1.1 200 OK\r\n" + header + b"\r\n")
                while served.sent < 1 << 30:  # a bound for the test itself: 1 GiB
                    await stream.send(b"\0" * 65536)
                    served.sent += 65536
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return

    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, endless)
        yield served
        group.cancel_scope.cancel()


@pytest.mark.parametrize("length", ["none", "too large"])
async def test_a_blob_longer_than_its_descriptor_is_cut_off_there(workdir: Path, length: str) -> None:
    """A registry that sends an endless body (or announces more than the manifest said) must not fill the
    store's filesystem before the digest fails: the download stops at the descriptor's size."""
    size = 100_000
    digest = "sha256:" + hashlib.sha256(b"\0" * size).hexdigest()
    header = b"Content-Length: 1099511627776\r\n" if length == "too large" else b"Connection: close\r\n"
    async with endless_registry(header) as served:
        remote = registry.open_registry(served.ref, RegistryOptions(timeout=5), credentials=CREDENTIALS, environ={})
        async with remote:
            with anyio.fail_after(30), pytest.raises(RemoteMiss, match=f"{size} bytes"):
                await remote.fetch_blob(digest, workdir / "blob", size=size)
    assert os.listdir(workdir) == []
    assert served.sent < 64 << 20  # the client stopped reading at once, not at the end of the stream


async def test_a_source_item_that_runs_on_is_cut_off_at_the_stores_bound(workdir: Path) -> None:
    """A source item has no descriptor size: an endless body from the remote cache stops at the bound of
    the store's sources (`most`), is said once, and the item is fetched from its URL instead (None)."""
    said: list[str] = []
    async with endless_registry() as served:
        client = registry.open_registry(served.ref, RegistryOptions(timeout=5), credentials=CREDENTIALS, environ={})
        cache = RemoteCache(RemoteSettings(refs=(served.ref,)), [Remote(name="endless", client=client)], said.append)
        async with client:
            with anyio.fail_after(30):
                found = await cache.fetch_source("sha256:" + "1" * 64, workdir / "item", most=1 << 20)
    assert found is None
    assert len(said) == 1
    assert "more than the 1048576 bytes" in said[0]
    assert os.listdir(workdir) == []
    assert served.sent < 64 << 20
