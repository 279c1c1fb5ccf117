"""The stage sandbox: a bubblewrap command line, and running a stage in it with its RPC channel.

A stage sees the build root's `/usr` read-only (the host's when the pipeline has no build pipeline),
its tree read-write at `/run/osbuild/tree`, its inputs read-only under `/run/osbuild/inputs`, a private
`/dev`, its own pid namespace and no network. bwrap's `--die-with-parent` and the pid namespace make sure
nothing started inside outlives the stage. A spec's `prefix` runs before bwrap, in the same process: the
layered store's `unshare --mount` and overlay mounts (`store.layers`) of the tree and build root it binds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from . import process, rpc
from .runnerlib import CAPS_ENV
from .stageapi import FD_ENV

SANDBOX_ROOT = "/run/osbuild"
TREE = f"{SANDBOX_ROOT}/tree"
INPUTS = f"{SANDBOX_ROOT}/inputs"
MOUNTS = f"{SANDBOX_ROOT}/mounts"
LIB = f"{SANDBOX_ROOT}/lib"
PACKAGE_DIR = Path(__file__).resolve().parent

# osbuild's default capability set for stages
CAPABILITIES = (
    "CAP_AUDIT_WRITE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_IPC_LOCK", "CAP_LINUX_IMMUTABLE", "CAP_MAC_OVERRIDE", "CAP_MKNOD", "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_ADMIN", "CAP_SYS_CHROOT",
    "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
)
# bit numbers of those capabilities (linux/capability.h)
CAP_BITS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
    "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_LINUX_IMMUTABLE": 9, "CAP_NET_BIND_SERVICE": 10,
    "CAP_IPC_LOCK": 14, "CAP_SYS_CHROOT": 18, "CAP_SYS_ADMIN": 21, "CAP_SYS_NICE": 23, "CAP_SYS_RESOURCE": 24,
    "CAP_MKNOD": 27, "CAP_AUDIT_WRITE": 29, "CAP_SETFCAP": 31, "CAP_MAC_OVERRIDE": 32,
}
# top-level directories that may be symlinks into /usr (merged /usr) or real directories
ROOT_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# host configuration a build root's tools need, taken from the build root when present
ETC_FILES = ("alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "mke2fs.conf", "passwd", "group",
             "os-release")


@dataclass(frozen=True, slots=True)
class Bind:
    source: Path
    target: str
    read_only: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxSpec:
    build_root: Path          # "/" for the host
    tree: Path
    executable: Path          # the stage or assembler
    runner: Path
    dev: Path | None = None   # the engine's /dev directory for this stage; None: bwrap's own
    binds: tuple[Bind, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    prefix: tuple[str, ...] = ()  # argv before bwrap's: what mounts the build root and tree it binds
    # the build root's ROOT_DIRS ("" a directory, else a symlink's target) when the host cannot see them
    # (a mount `prefix` makes); None: look at the build root
    root_entries: Mapping[str, str] | None = None


def bounding_set(status: str | None = None) -> int:
    """The host's capability bounding set (`CapBnd` of /proc/self/status) as a bit mask."""
    text = Path("/proc/self/status").read_text() if status is None else status
    for line in text.splitlines():
        if line.startswith("CapBnd:"):
            return int(line.split()[1], 16)
    return 0


def stage_capabilities(bounding: int) -> tuple[str, ...]:
    """The stage's capabilities: osbuild's set, less what the bounding set lacks.

    bwrap (0.8) cannot add a capability outside the bounding set, and then keeps *all* of them instead of
    failing, so asking only for what the host can give is what keeps the stage's set the intended one.
    """
    return tuple(cap for cap in CAPABILITIES if bounding >> CAP_BITS[cap] & 1)


def capability_mask(caps: tuple[str, ...]) -> int:
    return sum(1 << CAP_BITS[cap] for cap in caps)


def bwrap_argv(spec: SandboxSpec, caps: tuple[str, ...] = CAPABILITIES) -> list[str]:
    root = spec.build_root
    argv = ["bwrap", "--chdir", "/", "--die-with-parent", "--new-session",
            "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--cap-drop", "ALL"]
    for cap in caps:
        argv += ["--cap-add", cap]
    argv += ["--ro-bind", os.fspath(root / "usr"), "/usr"]
    for name in ROOT_DIRS:
        path = root / name
        if spec.root_entries is not None:
            target = spec.root_entries.get(name)
            if target:
                argv += ["--symlink", target, f"/{name}"]
            elif target == "":
                argv += ["--ro-bind", os.fspath(path), f"/{name}"]
        elif path.is_symlink():
            argv += ["--symlink", os.readlink(path), f"/{name}"]
        elif path.is_dir():
            argv += ["--ro-bind", os.fspath(path), f"/{name}"]
    argv += ["--dir", "/etc"]
    for name in ETC_FILES:
        argv += ["--ro-bind-try", os.fspath(root / "etc" / name), f"/etc/{name}"]
    if spec.dev is not None:
        argv += ["--dev-bind", os.fspath(spec.dev), "/dev", "--tmpfs", "/dev/shm"]
    else:
        argv += ["--dev", "/dev"]
    argv += ["--proc", "/proc", "--ro-bind", "/sys", "/sys",
             "--tmpfs", "/tmp", "--tmpfs", "/var", "--tmpfs", "/run",
             "--ro-bind", os.fspath(PACKAGE_DIR), f"{LIB}/aosbuild",
             "--bind", os.fspath(spec.tree), TREE,
             "--dir", INPUTS, "--dir", MOUNTS]
    for bind in spec.binds:
        argv += ["--ro-bind" if bind.read_only else "--bind", os.fspath(bind.source), bind.target]
    stage = f"{SANDBOX_ROOT}/bin/{spec.executable.name}"
    runner = f"{SANDBOX_ROOT}/runner/{spec.runner.name}"
    argv += ["--ro-bind", os.fspath(spec.executable), stage, "--ro-bind", os.fspath(spec.runner), runner,
             "--", runner, stage]
    return argv


def sources(spec: SandboxSpec) -> list[str]:
    """The host paths the sandbox binds (not where they appear inside it)."""
    root = spec.build_root
    paths = [root / "usr", root / "etc", *(root / name for name in ROOT_DIRS), PACKAGE_DIR, spec.tree,
             spec.executable, spec.runner, *(b.source for b in spec.binds)]
    if spec.dev is not None:
        paths.append(spec.dev)
    return [os.fspath(p) for p in paths]


def sandbox_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {"container": "bwrap-osbuild", "LC_CTYPE": "C.UTF-8", "PATH": "/usr/sbin:/usr/bin",
           "PYTHONPATH": LIB, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "TERM": os.environ.get("TERM", "dumb")}
    env.update(extra)
    return env


DRAIN_SECONDS = 5.0


async def run(spec: SandboxSpec, *, handlers: Mapping[str, rpc.Handler],
              on_line: Callable[[str], None]) -> int:
    """Run the stage under bwrap, serving its RPC channel; returns the exit status."""
    engine_sock, stage_sock = rpc.open_socketpair()
    with engine_sock, stage_sock:
        caps = stage_capabilities(bounding_set())
        # the runner checks the stage's effective set against this before it runs the stage
        env = sandbox_env({**spec.env, FD_ENV: str(stage_sock.fileno()),
                           CAPS_ENV: f"{capability_mask(caps):x}"})
        server_done = anyio.Event()

        async def serve() -> None:
            await rpc.serve(engine_sock, handlers)
            server_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            # once the sandbox holds the stage's end, the engine's copy must go, or EOF never comes
            returncode = await process.run_streaming(
                [*spec.prefix, *bwrap_argv(spec, caps)], on_line=on_line, env=env, pass_fds=[stage_sock.fileno()],
                on_started=stage_sock.close)
            # let the server read what the stage sent just before it exited, then stop it
            with anyio.move_on_after(DRAIN_SECONDS):
                await server_done.wait()
            tg.cancel_scope.cancel()
        return returncode
