"""`--inspect` prints what osbuild prints: golden outputs of osbuild 191 for the same manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import Aosbuild
from .test_ids import GOLDEN

GOLDEN_NAMES = sorted(p.stem for p in GOLDEN.glob("*.json"))


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_inspect_matches_osbuild(aosbuild: Aosbuild, name: str) -> None:
    path: Path = GOLDEN / f"{name}.json"
    result = aosbuild(path, "--inspect")
    expected = json.loads((GOLDEN / f"{name}.expected").read_text())
    assert result.returncode == (2 if name.startswith("invalid") else 0), result.stderr
    assert json.loads(result.stdout) == expected


def test_inspect_runs_nothing(aosbuild: Aosbuild) -> None:
    aosbuild(GOLDEN / "v2-truncate-chmod.json", "--inspect")
    assert not aosbuild.store.exists()
