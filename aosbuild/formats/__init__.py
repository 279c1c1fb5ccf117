"""The manifest formats osbuild reads, one module each (as osbuild's `formats/`): `v1` and `v2`.

Each holds everything about its format: `validate` (every problem at once), `load` (into the frozen
model of `aosbuild/manifest.py`, which the rest of aosbuild works on whatever the format), `describe`
(what `--inspect` prints) and `output` (the `--json` result document). Only this package looks at a
manifest's version: the rest asks the format of a loaded manifest (`of`) what it needs to know.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ManifestError, Problem
from ..library import Library
from ..manifest import Manifest
from . import v1, v2

if TYPE_CHECKING:
    from ..buildreport import BuildReport
    from ..errors import AosbuildError


class Format(Protocol):
    """What a format module provides (`v1`, `v2`)."""

    VERSION: str                  # its `version` value
    SCHEMA: str                   # its document schema in the library's `schemas/`
    SOURCES_THROUGH_INPUTS: bool  # whether stages reach source items only through inputs

    def validate(self, description: dict[str, Any], library: Library) -> list[Problem]: ...
    def load(self, description: dict[str, Any], source: str, *, build: bool = False) -> Manifest: ...
    def describe(self, manifest: Manifest, host_runner: str | None = None) -> dict[str, Any]: ...
    def output(self, manifest: Manifest, report: BuildReport,
               error: AosbuildError | None = None) -> dict[str, Any] | None: ...


FORMATS: dict[str, Format] = {v1.VERSION: v1, v2.VERSION: v2}


def of(manifest: Manifest) -> Format:
    """The format module a loaded manifest was written in."""
    return FORMATS[manifest.version]


def load(description: Any, library: Library, source: str = "manifest", *, validate: bool = True,
         build: bool = False) -> Manifest:
    """Validate and load a parsed manifest of any supported format (a document without `version` is v1).

    `validate=False` skips the schemas (ids can be computed for manifests whose stages this library does
    not have), but never the checks of meaning; `build=True` (what a build loads) also refuses what osbuild
    would silently ignore.
    """
    if not isinstance(description, dict):
        raise ManifestError(source, [Problem("a manifest must be a JSON object")])
    version = description.get("version", "1")
    form = FORMATS.get(version) if isinstance(version, str) else None
    if form is None:
        raise ManifestError(source, [Problem(f"Unsupported manifest format: version {version!r}", ("version",))])
    if validate:
        problems = form.validate(description, library)
        if problems:
            raise ManifestError(source, problems)
    return form.load(description, source, build=build)


def describe(manifest: Manifest, host_runner: str | None = None) -> dict[str, Any]:
    """What `osbuild --inspect` prints for the manifest, in its own format."""
    return of(manifest).describe(manifest, host_runner)


def output(manifest: Manifest, report: BuildReport, error: AosbuildError | None = None, *,
           sources_only: bool = False) -> dict[str, Any] | None:
    """The `--json` result document of a build that ended with `error` (None: it succeeded), or None when
    the error came before or outside any stage or source (the caller then prints a plain error document).

    `--sources-only` builds no pipeline, so its document is always v2's, whose `sources` section says
    what was fetched (v1's result has no place for it).
    """
    form: Format = v2 if sources_only else of(manifest)
    return form.output(manifest, report, error)
