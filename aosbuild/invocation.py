"""What one build command asks for, whichever command line it came from.

`aosbuild` (aosbuild/cli.py) and the drop-in `osbuild` (aosbuild/osbuild_compat.py) each parse their own
flags into an `Invocation`, and `aosbuild.run.run()` carries it out. Code that wants a build without argv
builds an `Invocation` itself. Paths given by the user stay the text they typed where messages echo them
(the manifest, the store, the libdirs), so that every message reads as the command line did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .download import DownloadOptions
from .store import KEEP


@dataclass(frozen=True)
class Invocation:
    """One build (or `--inspect`) request, checked by `run()` before anything is built."""

    manifest: str                               # the manifest's path, or "-" for standard input
    store: str = ".osbuild"                     # the store's directory
    libdirs: tuple[str, ...] = ()               # extra libraries, searched before the bundled one
    checkpoints: tuple[str, ...] = ()           # globs of pipeline names, stage ids or types to keep
    exports: tuple[str, ...] = ()               # pipeline names or ids whose trees are exported
    output_directory: Path | None = None        # where the exports go
    inspect: bool = False                       # print the manifest with its ids, build nothing
    json: bool = False                          # the result as one JSON document on stdout
    monitor: str | None = None                  # a name of monitor.MONITORS; None: chosen from the others
    monitor_fd: int | None = None               # where progress goes; None: stdout
    stage_timeout: float | None = None          # seconds; None: no limit
    jobs: int | None = None                     # pipelines at the same time; None: the engine's default
    sources_only: bool = False                  # fetch and verify the sources, build nothing
    download: DownloadOptions = field(default_factory=DownloadOptions)
    cache_max_size: int | None = KEEP           # the store's bound in bytes; None: unlimited; KEEP: as set
    cache_remotes: tuple[str, ...] | None = None  # registries (first pushed to); None: the store's, (): none
    cache_push: str | None = None               # none|pipelines|all; None: the store's, else pipelines
    cache_remote_insecure: bool = False         # plain HTTP to a registry that is not on loopback
    cache_remote_timeout: float | None = None   # seconds a registry may stay silent; None: 30
    dispatch: str | None = None                 # a Dask scheduler's address: build on its workers
    dispatch_arch: str | None = None            # the build roots' architecture; None: this machine's
    quiet: bool = False                         # no progress output
    debug: bool = False                         # engine events and tracebacks
    summary: bool = True                        # "what was made" at the end (the drop-in prints none)
    backend: str = "trio"                       # the event loop anyio runs the build on
