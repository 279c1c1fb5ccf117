"""Every error aosbuild raises on purpose, under one root.

::

    AosbuildError                 exit 1 unless stated
    ├── ManifestError             exit 2: the manifest cannot be read or is invalid (all problems at once)
    ├── UsageError                exit 1: a command-line request that cannot be met (unknown export, ...)
    ├── InvalidArgument           exit 2: a flag's value is invalid (--jobs 0, a closed --monitor-fd, ...)
    ├── SourceError               an item could not be fetched or verified
    ├── DownloadError             a URL could not be downloaded (HTTP status, connection, size, checksum)
    ├── ChecksumMismatch          bytes did not match the checksum that names them
    ├── StageError                a stage failed: its name, id, exit status and last output lines
    ├── SandboxError              the sandbox could not be set up (bwrap missing, bad build root, ...)
    ├── StoreError                the store cannot be used (permissions, disk full, another format, ...)
    │   └── CacheMiss             an entry is not in the store, or is locked by another build (internal)
    ├── RegistryError             (registry.py) a bad registry reference or tag
    │   ├── RemoteMiss            not in the registry, corrupt, cut short, unreachable or stalled: build here
    │   └── RegistryAuthError     the registry refused our credentials, or wants some we do not have
    ├── AuthFileError             (registryauth.py) an auth file's entry for a registry cannot be read
    └── LayerError                (ocilayer.py) a tree that has no OCI layer form, or a layer that escapes

Each error carries the fields a person needs and a message that says what happened and what to do.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass


class AosbuildError(Exception):
    """Root of all deliberate aosbuild errors."""

    exit_code = 1


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a manifest, at a JSON path (a list of keys and indices)."""

    message: str
    path: tuple[str | int, ...] = ()

    @property
    def location(self) -> str:
        return format_path(self.path)


def format_path(path: Sequence[str | int]) -> str:
    """Render a JSON path the way osbuild does: `.pipelines[0].stages[2].options`, root is `.`."""
    if not path:
        return "."
    parts = []
    for key in path:
        if isinstance(key, int):
            parts.append(f"[{key}]")
        elif " " in key:
            parts.append(f".'{key}'")
        else:
            parts.append(f".{key}")
    return "".join(parts)


class ManifestError(AosbuildError):
    """The manifest is unreadable or invalid; lists every problem found."""

    exit_code = 2

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        # osbuild sorts by the rendered path (so `.mounts.root` before `.mounts[0]`, `[10]` before `[2]`);
        # its order among problems at one path is arbitrary, here it is by message
        self.problems = tuple(sorted(set(problems), key=lambda p: (p.location, p.message)))
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source} has errors:", ""]
        for problem in self.problems:
            lines += [f"{problem.location}:", f"  {problem.message}", ""]
        return "\n".join(lines)

    def as_json(self) -> dict[str, object]:
        return {
            "type": "https://osbuild.org/validation-error",
            "title": "JSON Schema validation failed",
            "success": False,
            "errors": [{"message": p.message, "path": list(p.path)} for p in self.problems],
        }


class UsageError(AosbuildError):
    """The command line asks for something the manifest or store cannot give."""


class InvalidArgument(AosbuildError):
    """A command-line flag has a value that can never work; found before anything is built."""

    exit_code = 2

    def __init__(self, flag: str, message: str) -> None:
        self.flag = flag
        super().__init__(f"{flag}: {message}")

    def as_json(self) -> dict[str, object]:
        return {"type": "error", "success": False, "title": "invalid command line", "flag": self.flag,
                "message": str(self)}


class SourceError(AosbuildError):
    """A source item could not be fetched or did not match its checksum."""

    def __init__(self, source_type: str, checksum: str, message: str) -> None:
        self.source_type = source_type
        self.checksum = checksum
        super().__init__(f"{source_type}: {checksum}: {message}")


class DownloadError(AosbuildError):
    """A URL could not be downloaded, after the retries the failure deserved."""

    def __init__(self, url: str, message: str) -> None:
        self.url = url
        super().__init__(f"{url}: {message}")


class ChecksumMismatch(AosbuildError):
    """Bytes that did not match the checksum naming them; they never reach the store."""

    def __init__(self, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"checksum mismatch: expected {expected}, got {actual}")


class StageError(AosbuildError):
    """A stage did not succeed."""

    def __init__(self, *, pipeline: str, stage: str, stage_id: str, reason: str, output_tail: str) -> None:
        self.pipeline = pipeline
        self.stage = stage
        self.stage_id = stage_id
        self.reason = reason
        self.output_tail = output_tail
        super().__init__(f"stage {stage} ({stage_id}) of pipeline '{pipeline}' {reason}")


class SandboxError(AosbuildError):
    """The sandbox for a stage could not be prepared."""


class StoreError(AosbuildError):
    """The store cannot be read or written."""


class CacheMiss(StoreError):
    """An entry that is absent, or locked by a build writing or evicting it: either way, not usable now."""

    def __init__(self, object_id: str) -> None:
        self.object_id = object_id
        super().__init__(f"{object_id} is not in the store")


def flatten(exc: BaseException) -> Iterator[BaseException]:
    """The errors inside `exc`, exception groups (a task group's, nested) taken apart."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from flatten(inner)
    else:
        yield exc
