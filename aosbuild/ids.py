"""osbuild's content ids: sha256 over successive canonical JSON chunks.

Every id is computed exactly as osbuild computes it (reference §1.3), so `--inspect`, `--checkpoint` and
`--export` agree with osbuild for the same manifest. Names (of inputs, devices, mounts) are never hashed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def canonical(value: Any) -> bytes:
    """osbuild's chunk encoding: `json.dumps(value, sort_keys=True)` with default separators."""
    return json.dumps(value, sort_keys=True).encode()


def _digest(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def input_id(type_: str, origin: str, refs: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    return _digest([canonical(type_), canonical(origin), canonical(dict(refs)), canonical(dict(options))])


def device_id(type_: str, parent_id: str | None, options: Mapping[str, Any]) -> str:
    chunks = [canonical(type_)]
    if parent_id:
        chunks.append(canonical(parent_id))
    chunks.append(canonical(dict(options)))
    return _digest(chunks)


def mount_id(type_: str, device_id: str | None, partition: int | None, target: str | None,
             options: Mapping[str, Any]) -> str:
    chunks = [canonical(type_)]
    if device_id:
        chunks.append(canonical(device_id))
    if partition:
        chunks.append(canonical(partition))
    if target:
        chunks.append(canonical(target))
    chunks.append(canonical(dict(options)))
    return _digest(chunks)


def stage_id(*, type_: str, build: str | None, base: str | None, options: Mapping[str, Any],
             source_epoch: int | None, input_ids: Mapping[str, str], mount_ids: Sequence[str]) -> str:
    chunks = [canonical(type_), canonical(build), canonical(base), canonical(dict(options))]
    if source_epoch is not None:
        chunks.append(canonical(source_epoch))
    if input_ids:
        chunks.append(canonical(dict(input_ids)))
    if mount_ids:
        chunks.append(json.dumps(list(mount_ids)).encode())
    return _digest(chunks)


def source_id(source_type: str, items: Mapping[str, Any]) -> str:
    return _digest([canonical(source_type), canonical(dict(items))])


def context_id(context: Mapping[str, Any]) -> str:
    """The monitor's context id: sha256 of the full context (nulls included), keys sorted."""
    return hashlib.sha256(canonical(dict(context))).hexdigest()
