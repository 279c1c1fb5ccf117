"""Mounts of a stage: what the runner mounts inside the sandbox, and what the stage is told about them.

The engine only plans: each mount becomes an entry (device node, mount point, filesystem type, flags,
data) that the runner carries out in the sandbox's private mount namespace (`aosbuild.runnerlib`), so no
mount can outlive its stage, whatever happens to the engine.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Any

from .errors import SandboxError
from .manifest import Mount
from .sandbox import MOUNTS
from .sandboxside.runnerlib import MS_RDONLY

FSTYPES = {"org.osbuild.ext4": "ext4", "org.osbuild.xfs": "xfs", "org.osbuild.btrfs": "btrfs",
           "org.osbuild.fat": "vfat"}
# manifest option -> mount data, for the options that are plain flags
DATA_FLAGS = ("norecovery",)
DATA_VALUES = ("uid", "gid", "umask", "shortname", "subvol", "compress")


def mount_point(target: str | None) -> str:
    """Where the mount is in the sandbox, spelt as osbuild tells its stages (`/run/osbuild/mounts/.` for /)."""
    relative = posixpath.normpath("/" + (target or "/")).lstrip("/")
    return posixpath.join(MOUNTS, relative or ".")


def plan_mounts(mounts: Sequence[Mount], devices: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The runner's mount plan and the stage's `mounts` argument, in the manifest's order."""
    plan: list[dict[str, Any]] = []
    arguments: dict[str, Any] = {}
    for mount in mounts:
        fstype = FSTYPES.get(mount.type)
        if fstype is None:
            raise SandboxError(f"mount '{mount.name}': aosbuild has no mount type {mount.type}")
        if mount.device is None or mount.device.name not in devices:
            raise SandboxError(f"mount '{mount.name}' needs a device")
        source = devices[mount.device.name]["path"]
        if mount.partition:
            source += f"p{mount.partition}"
        options = mount.options
        data = [name for name in DATA_FLAGS if options.get(name)]
        data += [f"{name}={options[name]}" for name in DATA_VALUES if name in options]
        target = mount_point(mount.target)
        plan.append({"source": source, "target": target, "root": MOUNTS, "fstype": fstype,
                     "flags": MS_RDONLY if options.get("readonly") else 0, "data": ",".join(data)})
        arguments[mount.name] = {"path": target}
    return plan, arguments
