"""What every runner does inside the sandbox before the stage: mount, run, unmount (standard library only).

Mounts are made inside the sandbox's own mount namespace, so none of them can outlive the sandbox;
they are unmounted (and so written back) before the runner exits, which is before the engine detaches
the loop devices under them. Without mounts the runner simply becomes the stage: a Python stage for this
same interpreter runs in it (one interpreter start per stage instead of two, about 40 ms), any other
stage is exec'd. The runners start their interpreter with `-S`, and a Python stage that runs in it gets
`site` when it first needs it (`SiteOnDemand`).
"""

from __future__ import annotations

import os
import sys

# `typing` alone took 6 ms of a stage's start in the sandbox; the annotations need it only for mypy
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

MOUNTS_ENV = "AOSBUILD_MOUNTS"
CAPS_ENV = "AOSBUILD_CAPS"  # the stage's intended effective capability set, a hex mask
MS_RDONLY = 1
MNT_DETACH = 2  # umount2: take the mount off the tree now, free it when no one uses it
# The type of the error a runner reports when it cannot run the stage (a refused mount point, the wrong
# capabilities, a failed mount): the sandbox's failure, not the stage's, so one line and no traceback.
RUNNER_ERROR = "org.aosbuild.runner"


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc().mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None) != 0:
        err = _errno()
        raise OSError(err, f"mount {source} on {target} ({fstype}, {data or 'defaults'}): {os.strerror(err)}")


def umount(target: str, flags: int = 0) -> None:
    if _libc().umount2(target.encode(), flags) != 0:
        err = _errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def _inside(path: str, root: str) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip("/") + "/")


def make_mount_point(target: str, root: str) -> None:
    """Create `target` below `root`, refusing when a symlink (in a filesystem mounted before, which a
    manifest's data may have made) would put it elsewhere: checked before creating and after."""
    existing = target
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    refusal = (f"mount point /{os.path.relpath(target, root)} resolves outside the stage's mounts ({root}): "
               "a symlink in a filesystem mounted before leads out; refusing to mount there")
    if not _inside(existing, root):
        raise OSError(refusal)
    os.makedirs(target, exist_ok=True)
    if not _inside(target, root):
        raise OSError(refusal)


def run_with_mounts(stage: str, argv: list[str], plan_text: str) -> int:
    """Mount, run the stage as a child, unmount; its exit code."""
    from . import stagejson

    mounted: list[str] = []
    try:
        for entry in stagejson.loads(plan_text):
            make_mount_point(entry["target"], entry["root"])
            mount(entry["source"], entry["target"], entry["fstype"], entry["flags"], entry["data"])
            mounted.append(entry["target"])
        pid = os.fork()
        if pid == 0:
            try:
                os.execv(stage, [stage, *argv])
            finally:
                os._exit(127)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    finally:
        for target in reversed(mounted):
            os.sync()
            umount(target)


def for_this_interpreter(stage: str) -> bool:
    """True if the stage is a script whose `#!` line names exactly the interpreter running this runner."""
    with open(stage, "rb") as f:
        return f.readline().rstrip(b"\n") == b"#!" + os.fsencode(sys.executable)


class SiteOnDemand:
    """`site`'s work (site-packages on sys.path, their `.pth` files, `sitecustomize`), done only when the
    stage first imports a module from outside the standard library.

    The runners start with `python3 -S` (their `#!` line): `site` was 2.4 ms of CPU of a stage's 9 ms of
    Python, most of it the build root's `.pth` files, and a stage of the standard library alone needs none
    of it. A stage that imports from dist-packages still gets all of it, before that import looks for its
    module: at an `import` statement (`__import__`), or, for `importlib.import_module`, when every other
    finder has missed (this one is last on `sys.meta_path`). The builtins `site` adds (exit, quit, help,
    copyright, credits, license) are there from the start.
    """

    def __init__(self, stdlib: frozenset[str]) -> None:
        import builtins

        self.stdlib = stdlib
        self.builtins = builtins
        self.original = builtins.__import__
        self.done = False

    def install(self) -> None:
        import site

        site.setquit()
        site.setcopyright()
        site.sethelper()
        self.builtins.__import__ = self
        sys.meta_path.append(self)

    def __call__(self, name: str, globals: Any = None, locals: Any = None, fromlist: Any = (),
                 level: int = 0) -> Any:
        if level == 0 and not self.done:
            top = name.partition(".")[0]
            if top not in sys.modules and top not in self.stdlib:
                self.run_site()
        return self.original(name, globals, locals, fromlist, level)

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if path is not None or self.done:
            return None
        self.run_site()
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if finder is not self and find is not None else None
            if spec is not None:
                return spec
        return None

    def run_site(self) -> None:
        self.done = True
        if self.builtins.__import__ is self:
            self.builtins.__import__ = self.original
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        import site

        site.main()


def site_on_demand() -> None:
    """Under `python3 -S`, give the stage `site` when it needs it (`SiteOnDemand`); without a list of the
    standard library's modules (before Python 3.10), at once."""
    if not sys.flags.no_site:
        return
    stdlib = getattr(sys, "stdlib_module_names", None)
    if stdlib is None:
        import site

        site.main()
        return
    SiteOnDemand(stdlib).install()


def become(stage: str, argv: list[str]) -> NoReturn:
    """Run a Python stage's code in this interpreter, as if it had been exec'd; it ends the process.

    A failure's traceback starts at the stage's own code, as it would in a process of its own. The script
    runs as `runpy.run_path(stage, run_name="__main__")` would run it, in a fresh `__main__` module, but
    without importing runpy and its importlib machinery (2 ms of every stage).
    """
    sys.argv = [stage, *argv]
    sys.path[0] = os.path.dirname(stage)
    site_on_demand()
    with open(stage, "rb") as f:
        code = compile(f.read(), stage, "exec")
    main = type(sys)("__main__")
    main.__dict__.update({"__file__": stage, "__cached__": None, "__loader__": None, "__package__": "",
                          "__spec__": None})
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    except SystemExit as exit_:
        end(exit_.code)
    except BaseException as exc:
        import traceback

        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != stage:
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb or exc.__traceback__)
        raise SystemExit(1) from None
    end(0)


def end(code: object) -> NoReturn:
    """End the stage's process as `sys.exit(code)` would, without the interpreter's teardown (3-4 ms of
    every stage) when nothing waits for it: no function registered to run at exit, no other thread that
    exit would wait for. Otherwise, or if the output cannot be flushed, the usual way."""
    import atexit

    threading = sys.modules.get("threading")
    others = threading is not None and any(
        thread is not threading.main_thread() and not thread.daemon for thread in threading.enumerate())
    if atexit._ncallbacks() or others:
        raise SystemExit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        raise SystemExit(code) from None
    os._exit(status & 0xFF)


class CapabilityError(OSError):
    """The sandbox gave the stage other capabilities than the engine asked for."""


def effective_capabilities() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise CapabilityError("/proc/self/status has no CapEff line")


def check_capabilities(intended_text: str) -> None:
    """Refuse to run the stage with other capabilities than the engine asked the sandbox for."""
    intended = int(intended_text, 16)
    effective = effective_capabilities()
    if effective != intended:
        extra, missing = effective & ~intended, intended & ~effective
        raise CapabilityError(
            f"the sandbox gave the stage the capabilities {effective:#x} instead of {intended:#x}"
            f" (extra {extra:#x}, missing {missing:#x}): bwrap did not apply --cap-drop/--cap-add;"
            " check its version and the host's capability bounding set")


def report_runner_error(stage: str, exc: OSError) -> None:
    """Tell the engine, in one line, why the stage could not be run; on stderr where there is no channel."""
    from . import stageapi  # only on failure: every stage would pay for this import

    try:
        stageapi.channel().notify("exception", {"type": RUNNER_ERROR, "value": str(exc)})
    except (OSError, KeyError, ValueError):
        print(f"runner: cannot run {stage}: {exc}", file=sys.stderr)


def main(prepare: object = None) -> int:
    """A runner's entry point: `prepare()` (if given) readies the build root, then the stage runs."""
    stage, argv = sys.argv[1], sys.argv[2:]
    try:
        caps_text = os.environ.pop(CAPS_ENV, "")
        if caps_text:
            check_capabilities(caps_text)
        if callable(prepare):
            prepare()
        plan_text = os.environ.pop(MOUNTS_ENV, "")
        if plan_text:
            return run_with_mounts(stage, argv, plan_text)
        if not for_this_interpreter(stage):
            os.execv(stage, [stage, *argv])
    except OSError as exc:
        report_runner_error(stage, exc)
        return 2
    become(stage, argv)  # outside the handler above: the stage's own errors are its own


def mounts_main() -> int:
    """Make the mounts of `$AOSBUILD_MOUNTS`, run the rest of argv, unmount: how a module of an osbuild
    library gets its mounts, made in the sandbox as for aosbuild's stages, before osbuild's own runner."""
    command = sys.argv[1:]
    try:
        return run_with_mounts(command[0], command[1:], os.environ.pop(MOUNTS_ENV, "[]"))
    except OSError as exc:
        print(f"aosbuild: cannot mount for {command[-1]}: {exc}", file=sys.stderr)
        return 2
