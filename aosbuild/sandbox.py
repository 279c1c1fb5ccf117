"""The stage sandbox: a bubblewrap command line, and running a stage in it with its RPC channel.

A stage sees the build root's `/usr` read-only (the host's when the pipeline has no build pipeline),
its tree read-write at `/run/osbuild/tree`, its inputs read-only under `/run/osbuild/inputs`, a private
`/dev`, its own pid namespace and no network. Of aosbuild it sees only the sandbox side
(`aosbuild.sandboxside`, at `/run/osbuild/lib/aosbuild`). bwrap's `--die-with-parent` and the pid
namespace make sure nothing started inside outlives the stage. A spec's `namespace` is where bwrap
starts: a mount namespace of its own with the layered store's overlay mounts of the tree and build root
it binds (`mountns`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import stat
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from . import pidns, process, rpc
from .mountns import MountNamespace
from .sandboxside.runnerlib import CAPS_ENV
from .sandboxside.stageapi import FD_ENV

if TYPE_CHECKING:
    from .accounts import Accounts

SANDBOX_ROOT = "/run/osbuild"
TREE = f"{SANDBOX_ROOT}/tree"
INPUTS = f"{SANDBOX_ROOT}/inputs"
MOUNTS = f"{SANDBOX_ROOT}/mounts"
LIB = f"{SANDBOX_ROOT}/lib"
# the sandbox side (`aosbuild.sandboxside`), the only part of aosbuild a sandbox sees: bound where the
# stage's python3 finds it as the package `aosbuild`
SANDBOX_SIDE_DIR = Path(__file__).resolve().parent / "sandboxside"

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
    # the others, which a module's metadata may ask for (osbuild's stages ask for MAC_ADMIN, NET_ADMIN, SYS_PTRACE)
    "CAP_KILL": 5, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_IPC_OWNER": 15,
    "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_BOOT": 22,
    "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_LEASE": 28, "CAP_AUDIT_CONTROL": 30, "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36, "CAP_AUDIT_READ": 37, "CAP_PERFMON": 38,
    "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40,
}
# top-level directories that may be symlinks into /usr (merged /usr) or real directories
ROOT_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# host configuration a build root's tools need, taken from the build root when present
ETC_FILES = ("alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "mke2fs.conf", "passwd", "group",
             "os-release")
# those of them that are files: copied into the sandbox's /etc (bwrap's `--file`) from a descriptor, rather
# than bound one by one: each read-only bind is a mount, a remount and a read of the mountinfo for bwrap,
# six of them about 1 ms of CPU per stage; a copy is a few small writes to bwrap's own tmpfs
ETC_COPIES = ("ld.so.cache", "ld.so.conf", "mke2fs.conf", "passwd", "group", "os-release")


@dataclass(frozen=True, slots=True)
class Bind:
    source: Path
    target: str
    read_only: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class OsbuildSandbox:
    """What a module from an osbuild library gets instead of aosbuild's channel (`aosbuild.osbuild_api`):
    its library at /run/osbuild/lib, the arguments file, the meta file, the API sockets, osbuild's /etc
    and /var, and `/proc/cmdline` as osbuild gives it."""

    libdir: Path
    package: Path | None       # bound at /run/osbuild/lib/osbuild when the libdir's own folder is empty
    arguments: Path
    meta: Path
    api: Path                  # the directory holding the `osbuild` and `remoteloop` sockets
    var: Path
    cmdline: Path
    mount_wrapper: bool = False  # mounts to make first: aosbuild's runnerlib runs before osbuild's runner


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxSpec:
    build_root: Path          # "/" for the host
    tree: Path
    executable: Path          # the stage or assembler
    runner: Path
    runner_name: str = ""     # its name in the sandbox, if not its file's
    dev: Path | None = None   # the engine's /dev directory for this stage; None: bwrap's own
    binds: tuple[Bind, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    osbuild: OsbuildSandbox | None = None
    capabilities: tuple[str, ...] = ()  # asked for by the module's metadata, besides the default set
    namespace: MountNamespace | None = None  # where bwrap starts: the mounts of the build root and tree it binds
    # the build root's ROOT_DIRS ("" a directory, else a symlink's target) when the host cannot see them
    # (a mount of the `namespace`); None: look at the build root
    root_entries: Mapping[str, str] | None = None
    # /etc/passwd and /etc/group as osbuild's runner makes them (`aosbuild.accounts`); None: the build root's
    accounts: Accounts | None = None


def bounding_set(status: str | None = None) -> int:
    """The host's capability bounding set (`CapBnd` of /proc/self/status) as a bit mask."""
    text = Path("/proc/self/status").read_text() if status is None else status
    for line in text.splitlines():
        if line.startswith("CapBnd:"):
            return int(line.split()[1], 16)
    return 0


def stage_capabilities(bounding: int, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The stage's capabilities: osbuild's set and what its metadata asks for, less what the bounding set lacks.

    bwrap (0.8) cannot add a capability outside the bounding set, and then keeps *all* of them instead of
    failing, so asking only for what the host can give is what keeps the stage's set the intended one.
    """
    wanted = (*CAPABILITIES, *(cap for cap in extra if cap not in CAPABILITIES))
    return tuple(cap for cap in wanted if cap in CAP_BITS and bounding >> CAP_BITS[cap] & 1)


def capability_mask(caps: tuple[str, ...]) -> int:
    return sum(1 << CAP_BITS[cap] for cap in caps)


def open_etc_copies(root: Path) -> dict[str, int]:
    """Descriptors of the build root's `ETC_COPIES` that are there (read as a bind would: through
    symlinks), for `bwrap_argv`; the caller closes them once bwrap has started."""
    fds: dict[str, int] = {}
    etc = os.path.join(root, "etc")  # strings: pathlib's joins were a third of this function's time
    for name in ETC_COPIES:
        try:
            # non-blocking: a FIFO planted there would block the engine's open (and the whole engine) forever
            fd = os.open(f"{etc}/{name}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue  # absent (bound with -try before), or not a file: bound as before
        if stat.S_ISREG(os.fstat(fd).st_mode):
            fds[name] = fd
        else:
            os.close(fd)
    return fds


def memfd_of(name: str, data: bytes) -> int:
    """A descriptor that reads `data` from its start (for bwrap's `--file`)."""
    fd = os.memfd_create(f"aosbuild-{name}", os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def bwrap_argv(spec: SandboxSpec, caps: tuple[str, ...] = CAPABILITIES,
               etc_copies: Mapping[str, int] | None = None) -> list[str]:
    """bwrap's command line for the stage; `etc_copies` (from `open_etc_copies`) puts those files into the
    sandbox's /etc as copies, the others of `ETC_FILES` are bound read-only."""
    if spec.osbuild is not None:
        return osbuild_bwrap_argv(spec, spec.osbuild, caps)
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
    copies = etc_copies or {}
    for name in ETC_FILES:
        if name in copies:
            argv += ["--perms", "0444", "--file", str(copies[name]), f"/etc/{name}"]
        else:
            argv += ["--ro-bind-try", os.fspath(root / "etc" / name), f"/etc/{name}"]
    if spec.dev is not None:
        argv += ["--dev-bind", os.fspath(spec.dev), "/dev", "--tmpfs", "/dev/shm"]
    else:
        argv += ["--dev", "/dev"]
    argv += ["--proc", "/proc", "--ro-bind", "/sys", "/sys",
             "--tmpfs", "/tmp", "--tmpfs", "/var", "--tmpfs", "/run",
             "--ro-bind", os.fspath(SANDBOX_SIDE_DIR), f"{LIB}/aosbuild",
             "--bind", os.fspath(spec.tree), TREE,
             "--dir", INPUTS, "--dir", MOUNTS]
    for bind in spec.binds:
        argv += ["--ro-bind" if bind.read_only else "--bind", os.fspath(bind.source), bind.target]
    stage = f"{SANDBOX_ROOT}/bin/{spec.executable.name}"
    runner = f"{SANDBOX_ROOT}/runner/{spec.runner_name or spec.runner.name}"
    argv += ["--ro-bind", os.fspath(spec.executable), stage, "--ro-bind", os.fspath(spec.runner), runner,
             "--", runner, stage]
    return argv


# the modules every stage's interpreter imports from the sandbox side (runners and stageapi)
STAGE_SIDE_MODULES = ("__init__.py", "runnerlib.py", "stageapi.py", "stagejson.py")


@functools.cache
def compile_stage_side() -> None:
    """Give the stage-side modules bytecode, once per engine, where the sandbox side's directory is writable.

    Stages run with PYTHONDONTWRITEBYTECODE (their `/usr` is read-only anyway), so without it every stage
    compiled these modules again: about 5 ms of each stage. An installed package has its bytecode from
    pip; a checkout run with PYTHONDONTWRITEBYTECODE set has none. The bytecode is for the engine's own
    Python version; a build root with another finds none for its version and compiles, as before.
    """
    import importlib.util
    import py_compile

    for name in STAGE_SIDE_MODULES:
        source = SANDBOX_SIDE_DIR / name
        try:
            cached = Path(importlib.util.cache_from_source(os.fspath(source)))
            if cached.exists() and cached.stat().st_mtime >= source.stat().st_mtime:
                continue
            py_compile.compile(os.fspath(source), cfile=os.fspath(cached), doraise=True)
        except (OSError, py_compile.PyCompileError):
            return  # a read-only install: the stages compile them, as before


DEV_SOURCE = "aosbuild-dev"  # the source name of the engine's /dev tmpfs (`aosbuild.devices`)
AOSBUILD_LIB = "/run/aosbuild/lib"
# runs the mount plan of $AOSBUILD_MOUNTS, then the rest of argv (osbuild's runner and the stage)
MOUNT_WRAPPER = ("python3", "-S", "-c", f"import sys; sys.path.insert(0, {AOSBUILD_LIB!r}); "
                 "from aosbuild.runnerlib import mounts_main; sys.exit(mounts_main())")


def osbuild_bwrap_argv(spec: SandboxSpec, contract: OsbuildSandbox, caps: tuple[str, ...]) -> list[str]:
    """osbuild's sandbox for a module of its library, mount for mount as `osbuild/buildroot.py` makes it
    (only `--unshare-uts` is added: a stage must not rename the host)."""
    root = spec.build_root
    argv = ["bwrap", "--chdir", "/", "--die-with-parent", "--new-session",
            "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--cap-drop", "ALL"]
    for cap in sorted(caps):
        argv += ["--cap-add", cap]
    imports = ["usr"] if root == Path("/") else ["boot", "usr"]  # a build pipeline's /boot, for EFI binaries
    for name in imports:
        path = root / name
        if spec.root_entries is not None:  # a layered build root, mounted only where bwrap runs
            argv += ["--ro-bind" if name == "usr" else "--ro-bind-try", os.fspath(path), f"/{name}"]
        elif path.is_dir() and not path.is_symlink():
            argv += ["--ro-bind", os.fspath(path), f"/{name}"]
    for name in ("lib", "lib64", "bin", "sbin"):
        argv += ["--symlink", f"usr/{name}", f"/{name}"]
    if spec.dev is not None:
        argv += ["--dev-bind", os.fspath(spec.dev), "/dev", "--tmpfs", "/dev/shm"]
    else:
        argv += ["--dev", "/dev"]
    argv += ["--dir", "/etc", "--tmpfs", "/run", "--tmpfs", "/tmp", "--bind", os.fspath(contract.var), "/var",
             "--proc", "/proc", "--ro-bind", "/sys", "/sys", "--ro-bind-try", "/sys/fs/selinux", "/sys/fs/selinux"]
    etc = [("etc/containers", "/etc/containers")]
    if root != Path("/"):  # osbuild's host build root is a tree of the host's /usr and /etc/containers only
        etc = [("etc/mke2fs.conf", "/etc/mke2fs.conf"), *etc, ("ostree", "/ostree"), ("etc/selinux/", "/etc/selinux/")]
    for source, target in etc:
        argv += ["--ro-bind-try", os.fspath(root / source), target]
    argv += ["--ro-bind", os.fspath(contract.libdir), LIB]
    if contract.package is not None:
        argv += ["--ro-bind", os.fspath(contract.package), f"{LIB}/osbuild"]
    argv += ["--ro-bind", os.fspath(contract.cmdline), "/proc/cmdline",
             "--bind", os.fspath(spec.tree), TREE, "--bind", os.fspath(contract.meta), f"{SANDBOX_ROOT}/meta",
             "--dir", MOUNTS, "--dir", INPUTS]
    for bind in spec.binds:
        argv += ["--ro-bind" if bind.read_only else "--bind", os.fspath(bind.source), bind.target]
    stage = f"{SANDBOX_ROOT}/bin/{spec.executable.name}"
    runner = f"{SANDBOX_ROOT}/runner/{spec.runner_name or spec.runner.name}"
    argv += ["--ro-bind", os.fspath(spec.executable), stage,
             "--ro-bind", os.fspath(contract.arguments), f"{SANDBOX_ROOT}/api/arguments",
             "--bind", os.fspath(contract.api / "osbuild"), f"{SANDBOX_ROOT}/api/osbuild",
             "--bind", os.fspath(contract.api / "remoteloop"), f"{SANDBOX_ROOT}/api/remoteloop",
             "--ro-bind", os.fspath(spec.runner), runner]
    prefix: tuple[str, ...] = ()
    if contract.mount_wrapper:
        argv += ["--ro-bind", os.fspath(SANDBOX_SIDE_DIR), f"{AOSBUILD_LIB}/aosbuild"]
        prefix = MOUNT_WRAPPER
    return [*argv, "--", *prefix, runner, stage]


def osbuild_env(extra: Mapping[str, str]) -> dict[str, str]:
    """osbuild's environment for its modules, exactly."""
    env = {"container": "bwrap-osbuild", "LC_CTYPE": "C.UTF-8", "PATH": "/usr/sbin:/usr/bin",
           "PYTHONPATH": LIB, "PYTHONUNBUFFERED": "1", "TERM": os.environ.get("TERM", "dumb")}
    env.update(extra)
    return env


def sources(spec: SandboxSpec) -> list[str]:
    """The host paths the sandbox binds (not where they appear inside it)."""
    root = spec.build_root
    paths = [root / "usr", root / "etc", *(root / name for name in ROOT_DIRS), SANDBOX_SIDE_DIR, spec.tree,
             spec.executable, spec.runner, *(b.source for b in spec.binds)]
    if spec.dev is not None:
        paths.append(spec.dev)
    if spec.osbuild is not None:
        contract = spec.osbuild
        paths += [root / "boot", root / "ostree", contract.libdir, contract.arguments, contract.meta,
                  contract.api, contract.var, contract.cmdline, *([contract.package] if contract.package else [])]
    return [os.fspath(p) for p in paths]


def sandbox_env(extra: Mapping[str, str]) -> dict[str, str]:
    # PYTHONNOUSERSITE: the sandbox has no home directory, so no user site-packages; without it, `site`
    # looked for one and searched all of sys.path for a `usercustomize` module (0.4 ms of every stage)
    env = {"container": "bwrap-osbuild", "LC_CTYPE": "C.UTF-8", "PATH": "/usr/sbin:/usr/bin",
           "PYTHONPATH": LIB, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1",
           "TERM": os.environ.get("TERM", "dumb")}
    env.update(extra)
    return env


DRAIN_SECONDS = 5.0


DEV_POLL_SECONDS = 0.02


async def run_bwrap(argv: list[str], *, namespace: MountNamespace | None = None, on_line: Callable[[str], None],
                    env: Mapping[str, str],
                    pass_fds: list[int] | None = None, on_started: Callable[[], None] | None = None,
                    on_dev_bound: Callable[[], None] | None = None,
                    on_set_up: Callable[[], None] | None = None) -> int:
    """`process.run_streaming` for bwrap, which returns only once the sandbox's init has exited too.

    bwrap's own process ends first; its child, the sandbox's init (in a session of its own, killed by
    `--die-with-parent`), may still be exiting then, holding the sandbox's mount namespace and so the
    mounts made in it (a stage's ext4 on its loop device). Its pid comes from `--info-fd`; a pidfd on it
    becomes readable only after its namespaces are released. `on_dev_bound` is called once the sandbox's
    mount namespace has the engine's /dev tmpfs bound (seen in the init's mountinfo), for stages that
    never talk to the engine (osbuild's): from then on the tmpfs need not stay on the host. `on_set_up`
    is called once bwrap has made all of the sandbox's binds (it has pivoted into the new root).
    """
    # bwrap starts in the engine's pid namespace (`pidns`), so that nothing of the sandbox outlives the engine
    pid_namespace = await pidns.namespace()
    info_r, info_w = os.pipe()
    os.set_blocking(info_r, False)
    init = _Init(info_r)
    bwrap: list[int] = []  # its pid, once started
    launched = anyio.Event()  # set once it has (run_streaming's `on_started`)

    def start_in(start: Callable[[], subprocess.Popen[bytes]]
                 ) -> contextlib.AbstractAsyncContextManager[subprocess.Popen[bytes]]:
        def start_bwrap() -> subprocess.Popen[bytes]:
            with pid_namespace.entered():
                popen = start()
            bwrap.append(popen.pid)
            return popen
        # bwrap's /proc is that of its pid namespace: in a mount namespace of its own
        own = namespace or MountNamespace.bare()
        return dataclasses.replace(own, proc=pid_namespace.proc).started(start_bwrap)

    def started() -> None:
        nonlocal info_w
        os.close(info_w)
        info_w = -1
        launched.set()
        if on_started is not None:
            on_started()

    async def watch_dev() -> None:
        await init.read()
        await launched.wait()
        init.find(bwrap[0])
        if init.pid is not None and on_dev_bound is not None and await _until_dev_bound(init.pid):
            on_dev_bound()
        if init.pid is not None and on_set_up is not None and await _until_dev_bound(init.pid, ("/dev",)):
            on_set_up()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_dev)
            try:
                returncode = await process.run_streaming(
                    [argv[0], "--info-fd", str(info_w), *argv[1:]], on_line=on_line, env=env,
                    pass_fds=[*(pass_fds or ()), info_w], on_started=started,
                    kill_at_once=True, death_signal=False, start_in=start_in)
            finally:
                tg.cancel_scope.cancel()
        return returncode
    finally:
        if info_w >= 0:
            os.close(info_w)
        with anyio.CancelScope(shield=True), anyio.move_on_after(process.GRACE_SECONDS):
            await init.read()
            if bwrap:
                init.find(bwrap[0])  # if not found yet: bwrap is reaped by now only if it ended first
            await init.wait_exited()
        os.close(info_r)


class _Init:
    """The sandbox's init, as bwrap's `--info-fd` names it (`{"child-pid": N}`): N is its pid in the engine's
    sandbox pid namespace (`pidns`), `pid` the engine's, once `find` has found it among bwrap's children."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.in_namespace: int | None = None
        self.pid: int | None = None
        self.done = False
        self._data = b""

    async def read(self) -> None:
        while not self.done:
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                await anyio.wait_readable(self.fd)
                continue
            self._data += chunk
            try:
                self.in_namespace = int(json.loads(self._data)["child-pid"])
            except (ValueError, KeyError, TypeError):
                if chunk:
                    continue  # not all of it yet
            self.done = True  # the pid, or end of file: bwrap died before it started the sandbox

    def find(self, bwrap: int) -> None:
        if self.in_namespace is not None and self.pid is None:
            self.pid = pidns.pid_in_namespace(bwrap, self.in_namespace)

    async def wait_exited(self) -> None:
        await self.read()
        try:
            pidfd = os.pidfd_open(self.pid) if self.pid is not None else None
        except ProcessLookupError:
            return  # gone already
        if pidfd is None:
            return
        try:
            await anyio.wait_readable(pidfd)
        finally:
            os.close(pidfd)


async def _until_dev_bound(pid: int, at: tuple[str, ...] = ("/dev", "/newroot/dev")) -> bool:
    """Wait until the process's mount namespace has the engine's /dev tmpfs at /dev (or bwrap's
    /newroot/dev, before its pivot); False if the process ends first. `at=("/dev",)`: after the pivot,
    i.e. once bwrap has made every bind of the sandbox."""
    # polled: a mount made in another namespace signals no event that anyio can wait for
    while (bound := _dev_bound(pid, at)) is False:  # noqa: ASYNC110
        await anyio.sleep(DEV_POLL_SECONDS)
    return bound is True


def _dev_bound(pid: int, at: tuple[str, ...]) -> bool | None:
    """Whether the process's mountinfo has the engine's /dev tmpfs at one of `at`; None if it is gone
    (procfs reads do not block)."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return any(f" - tmpfs {DEV_SOURCE} " in line and line.split()[4] in at for line in lines)


async def run(spec: SandboxSpec, *, handlers: Mapping[str, rpc.Handler],
              on_line: Callable[[str], None], on_dev_bound: Callable[[], None] | None = None,
              on_set_up: Callable[[], None] | None = None) -> int:
    """Run the stage under bwrap, serving its RPC channel; returns the exit status.

    A module of an osbuild library has no such channel: its endpoints are served by `aosbuild.osbuild_api`.
    """
    if spec.osbuild is not None:
        caps = stage_capabilities(bounding_set(), spec.capabilities)
        return await run_bwrap(bwrap_argv(spec, caps), namespace=spec.namespace, on_line=on_line,
                               env=osbuild_env(spec.env), on_dev_bound=on_dev_bound, on_set_up=on_set_up)
    compile_stage_side()
    engine_sock, stage_sock = rpc.open_socketpair()
    # a layered build root is mounted only in the stage's namespace, the host does not see it as bwrap
    # will: its files are bound. The host's, or a flat one, the engine opens (a layered tree is no matter)
    etc_copies = open_etc_copies(spec.build_root) if spec.root_entries is None else {}
    for name, data in (spec.accounts.files() if spec.accounts is not None else {}).items():
        if name in etc_copies:
            os.close(etc_copies[name])
        etc_copies[name] = memfd_of(name, data)
    with engine_sock, stage_sock, contextlib.ExitStack() as closing:
        for fd in etc_copies.values():
            closing.callback(os.close, fd)
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
            # once the sandbox holds the stage's end, the engine's copy must go, or EOF never comes.
            # bwrap's --die-with-parent applies to bwrap itself too; were the engine to die before bwrap
            # has set it, the stage would find the channel closed and end at its first request
            returncode = await run_bwrap(
                bwrap_argv(spec, caps, etc_copies), namespace=spec.namespace, on_line=on_line, env=env,
                pass_fds=[stage_sock.fileno(), *etc_copies.values()],
                on_started=stage_sock.close, on_set_up=on_set_up)
            # let the server read what the stage sent just before it exited, then stop it
            with anyio.move_on_after(DRAIN_SECONDS):
                await server_done.wait()
            tg.cancel_scope.cancel()
        return returncode
