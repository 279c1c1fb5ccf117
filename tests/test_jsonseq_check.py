"""The tests' own JSON-seq checker: it passes osbuild's streams and refuses what breaks the Go clients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .conftest import SAMPLES
from .jsonseq_check import check

SYNTHETIC = (SAMPLES / "synthetic.seq").read_bytes()
# the context of the stream's first record ("starting -", origin osbuild.main_cli)
MAIN_CLI = "ede22f789202b9017bd24089276f57f559018c593914632c80206be12f5b3bb0"
PROGRESS = {"name": "pipelines/sources", "total": 2, "done": 2}


@pytest.mark.parametrize(("name", "summary"), [
    ("real.seq", "records=22 pipelines=3 stages=3 failed_stages=0 final_done=3/3 ok"),
    ("synthetic.seq", "records=15 pipelines=2 stages=2 failed_stages=0 final_done=2/2 ok"),
])
def test_good_samples_pass(name: str, summary: str) -> None:
    checker = check((SAMPLES / name).read_bytes())
    assert checker.problems == []
    assert checker.summary == summary


# every broken sample, and the problem that must be among those found
BROKEN = {
    "01-no-rs.seq": "line 1 (byte 0): does not start with RS",
    "02-blank-line.seq": "line 4 (byte 1105): a blank line",
    "03-two-per-line.seq": "line 1 (byte 0): an RS inside the line",
    "04-pretty-printed.seq": "line 2 (byte 3): does not start with RS",
    "05-float-done.seq": "$.progress.done: 1.0 has a fraction or exponent",
    "06-string-timestamp.seq": "$.timestamp: a JSON string where Go wants a float64",
    "07-abbrev-before-def.seq": "abbreviated before it was ever sent in full",
    "08a-truncated.seq": "line 15 (byte 5726): not one JSON text",
    "08b-no-final-lf.seq": "line 15 (byte 5726): not terminated by LF",
    "09-id-redefined.seq": "sent again with different content",
    "10-nan-duration.seq": "NaN is not JSON",
    "11-success-string.seq": "$.result.success: a JSON string where Go wants a bool",
    "12-rpm-metadata-shape.seq": "org.osbuild.rpm metadata: $.metadata.packages: a JSON object cannot become",
    "13-trailing-blank-line.seq": "line 16 (byte 6214): a blank line",
    "14-top-level-array.seq": "a JSON array, not an object",
    "15-null-record.seq": "a JSON null, not an object",
    "16-context-without-id.seq": "a context without an id",
    "17-rs-only-line.seq": "line 16 (byte 6214): an RS and no JSON text",
}


def test_every_broken_sample_is_listed() -> None:
    assert sorted(p.name for p in (SAMPLES / "broken").glob("*.seq")) == sorted(BROKEN)


@pytest.mark.parametrize(("name", "problem"), BROKEN.items())
def test_broken_samples_are_refused(name: str, problem: str) -> None:
    checker = check((SAMPLES / "broken" / name).read_bytes())
    assert any(problem in p for p in checker.problems), checker.problems
    assert checker.summary.endswith(f"INVALID ({len(checker.problems)} problems)")


def appended(*records: str) -> bytes:
    return SYNTHETIC + b"".join(b"\x1e" + r.encode() + b"\n" for r in records)


def record(**fields: Any) -> str:
    return json.dumps({"context": {"id": MAIN_CLI}, "progress": PROGRESS, "timestamp": 1795421795.0, **fields})


OSTREE = {"origin": "osbuild.monitor", "id": "d" * 64,
          "pipeline": {"name": "os", "id": "b" * 64, "stage": {"name": "org.osbuild.ostree.commit", "id": "c" * 64}}}
RESULT = {"name": "org.osbuild.ostree.commit", "id": "c" * 64, "success": True, "output": ""}


def test_a_good_appended_record_passes() -> None:
    checker = check(appended(record(message="fine", Duration=1, duration=None),
                             record(context=OSTREE, result=RESULT, metadata={"compose": {"ostree-n-cache-hits": 3}})))
    assert checker.problems == []
    assert checker.summary == "records=17 pipelines=3 stages=3 failed_stages=0 final_done=2/2 ok"


@pytest.mark.parametrize(("text", "problem"), [
    (record(progress={"name": "p", "total": 1e3, "done": 0}), "$.progress.total: 1000.0 has a fraction or exponent"),
    (record(progress={**PROGRESS, "done": 2**63}), f"$.progress.done: {2**63} overflows a Go int"),
    (record(progress={**PROGRESS, "progress": {"name": "x", "total": 1, "done": "1"}}),
     "$.progress.progress.done: a JSON string where Go wants a int"),
    (record(Timestamp="now"), "$.timestamp: a JSON string where Go wants a float64"),
    (record(timestamp=1).replace('"timestamp": 1', '"timestamp": 1e999'), "$.timestamp: out of float64 range"),
    (record(message=["a"]), "$.message: a JSON array where Go wants a string"),
    (record(context={"id": 7}), "$.context.id: a JSON number where Go wants a string"),
    (record(result={"id": "e" * 64, "output": "x"}), "a result without a boolean success"),
    (record(context=OSTREE, metadata={"compose": {"ostree-n-cache-hits": "3"}}),
     "org.osbuild.ostree.commit metadata: $.metadata.compose.ostree-n-cache-hits: a JSON string"),
    (record(context={"id": "f" * 64}), "abbreviated before it was ever sent in full"),
    (record(context={**OSTREE, "id": MAIN_CLI}), "sent again with different content"),
    (record(timestamp=None), "no timestamp"),
    (record(progress=None), "no progress"),
    (record(progress={**PROGRESS, "done": 3}), "progress 'pipelines/sources' at 3 of 2"),
    (record(message="x" * 65536), "over the 64 KiB of older bufio.Scanner clients"),
    ("\x1e" + record(), "more than one RS before the record"),
    (record() + "\x1e", "an RS inside the line"),
])
def test_what_breaks_a_go_client_is_refused(text: str, problem: str) -> None:
    checker = check(appended(text))
    assert any(problem in p for p in checker.problems), checker.problems


def test_a_second_result_under_one_context_is_refused() -> None:
    checker = check(appended(record(context=OSTREE, result=RESULT), record(context={"id": "d" * 64}, result=RESULT)))
    assert [p.split(": ", 1)[1] for p in checker.problems] == [
        f"a second result under context {'d' * 64} replaces the first in Go"]


def test_no_monitor_record_and_empty_stream_are_refused() -> None:
    first_line = SYNTHETIC.split(b"\n")[0] + b"\n"
    assert check(first_line).problems == ['no record has the origin "osbuild.monitor": Go clients show no status']
    assert check(b"").problems == ["the stream is empty"]
    assert "not one JSON text" in check(b"\x1e\xff\n").problems[0]


def test_samples_are_the_tests_own() -> None:
    assert SAMPLES == Path(__file__).parent / "jsonseq-samples"
