"""What a tree must hold to be a build root, checked before a pipeline runs any stage in it.

The sandbox binds the build root's `/usr` as its own and execs the stage's runner, a script whose `#!`
interpreter (`/usr/bin/python3`) must be in that `/usr`. A tree without them (a build pipeline of only
`org.osbuild.mkdir`, say) fails inside bwrap ("Can't find source path .../usr", "execvp ...: No such file
or directory"), which names neither the build pipeline nor what to do; osbuild has the same contract (a
build root is a usable tree) and fails the same way. The check is made once the build root is built,
before the first stage that would fail: it cannot be known earlier without running the build pipeline.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

from .errors import SandboxError
from .manifest import Manifest, Pipeline
from .sandbox import ETC_FILES
from .store import layers as overlay


@functools.cache
def interpreter(runner: Path) -> str | None:
    """The program of a runner's `#!` line (`/usr/bin/python3`), or None for one without such a line."""
    try:
        with runner.open("rb") as file:
            first = file.readline(256)
    except OSError:
        return None  # the sandbox says what is wrong with the runner itself
    words = first[2:].decode(errors="replace").split() if first.startswith(b"#!") else []
    return words[0] if words and words[0].startswith("/") else None


def lacks(layers: tuple[Path, ...], path: str) -> bool:
    """Whether the tree of `layers` certainly has nothing at `path`: False where a symlink on the way leaves
    the tree (an absolute target may be valid in the sandbox, which binds more than this tree)."""
    resolved = overlay.resolve(layers, path)
    return resolved is not None and overlay.find(layers, resolved) is None


# what the sandbox binds from the build root by its path on the host (bwrap follows symlinks there, with
# the host's `/`): osbuild's sandbox binds /boot, /ostree, /etc/containers and /etc/selinux too
BOUND = ("usr", "boot", "ostree", *(f"etc/{name}" for name in ETC_FILES), "etc/containers", "etc/selinux")


def escaping(layers: tuple[Path, ...]) -> str | None:
    """The first path the sandbox binds from the build root that a symlink leads out of the tree (`usr ->
    /` would show the host's whole `/` to every stage as its /usr), or None."""
    return next((f"/{path}" for path in BOUND if overlay.resolve(layers, path) is None), None)


def check(manifest: Manifest, pipeline: Pipeline, layers: tuple[Path, ...],
          runners: Iterable[tuple[str, Path]]) -> None:
    """Refuse to run `pipeline` on a build root (the tree of `layers`) that lacks `/usr`, or the interpreter
    of one of the runners its stages use, or whose bound paths lead out of it; the error names both
    pipelines and says what to do."""
    escape = escaping(layers)
    if escape is not None:
        assert pipeline.build is not None
        build = manifest.by_id(pipeline.build)
        root = f"pipeline '{build.name}'" if build else f"the tree {pipeline.build}"
        raise SandboxError(
            f"pipeline '{pipeline.name}' cannot run in its build root, {root}: its {escape} is a symbolic link "
            f"out of that tree (an absolute target, or '..' above its root), which the sandbox would bind from "
            f"the host. What to do: make it a directory or file, or a relative link inside the tree")
    missing = None
    if lacks(layers, "usr"):
        missing = "/usr, which the sandbox binds as its /usr"
    else:
        for name, path in runners:
            program = interpreter(path)
            if program is not None and lacks(layers, program):
                missing = f"{program}, which the runner {name} runs on (its #! line)"
                break
    if missing is None:
        return
    assert pipeline.build is not None
    build = manifest.by_id(pipeline.build)
    root = f"pipeline '{build.name}' ({pipeline.build[:12]})" if build else f"the tree {pipeline.build}"
    where = f"pipeline '{build.name}'" if build else "the pipeline that builds it"
    raise SandboxError(
        f"pipeline '{pipeline.name}' cannot run in its build root, {root}: that tree has no {missing}. "
        f"A build root must be a usable system: /usr with python3 and the tools its stages run. What to do: "
        f"install one in {where} (org.aosbuild.debian.install, as the build pipeline of `aosbuild sample "
        f"debian` does), or remove the `build` of pipeline '{pipeline.name}' to run its stages on the host")
