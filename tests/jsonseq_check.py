"""A strict checker for `--monitor=jsonseq` streams, as the Go clients of osbuild's stream read them.

A stream passes when every line is RS + one JSON object + LF, when every record decodes into the structs
of osbuild/images `pkg/osbuild/monitor.go` (Go's `encoding/json` rules: case-insensitive keys, the last
duplicate wins, `null` anywhere, no fraction or exponent in an int, no NaN), and when its contexts are
consistent: each id sent in full before it is abbreviated, never redefined. What the Go clients survive
but render wrongly (no timestamp, no progress, `done > total`, lines over the old 64 KiB scanner limit,
no `osbuild.monitor` record, two results under one context) is a problem too: the checker is always
strict. The record format is in `../shared/reference/jsonseq-clients.md`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

RS = 0x1E
OLD_SCANNER_LIMIT = 64 * 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True, slots=True)
class Obj:
    """A JSON object with its keys in order and duplicates kept, so Go's key matching can be replayed."""

    pairs: tuple[tuple[str, Any], ...]

    def get(self, name: str) -> Any:
        """What a Go struct field `name` ends up holding: the last key that matches it case-insensitively."""
        value = None
        for key, item in self.pairs:
            if key.lower() == name.lower():
                value = item
        return value


@dataclass(frozen=True, slots=True)
class Fraction:
    """A JSON number written with a fraction or an exponent: a float64 to Go, never an int."""

    text: str


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse(text: str) -> Any:
    return json.loads(text, object_pairs_hook=lambda pairs: Obj(pairs=tuple(pairs)),
                      parse_float=lambda text: Fraction(text=text), parse_constant=_no_constants)


# The Go types, as specs: a kind name, a struct (dict of fields) or a slice (a one-element list).
STAGE_CONTEXT = {"name": "string", "id": "string"}
CONTEXT = {"origin": "string", "id": "string", "pipeline": {"id": "string", "name": "string", "stage": STAGE_CONTEXT}}
PROGRESS: dict[str, object] = {"name": "string", "total": "int", "done": "int"}
PROGRESS["progress"] = PROGRESS
RESULT = {"name": "string", "id": "string", "success": "bool", "output": "string"}
STATUS = {"context": CONTEXT, "progress": PROGRESS, "result": RESULT, "metadata": "any", "message": "string",
          "timestamp": "float64", "duration": "float64"}
RPM_PACKAGE = dict.fromkeys(("name", "version", "release", "epoch", "arch", "sigmd5", "sigpgp", "siggpg"), "string")
OSTREE_COMPOSE = {
    **dict.fromkeys(("ref", "ostree-commit", "ostree-content-checksum", "ostree-timestamp", "rpm-ostree-inputhash"),
                    "string"),
    **dict.fromkeys(("ostree-n-metadata-total", "ostree-n-metadata-written", "ostree-n-content-total",
                     "ostree-n-content-written", "ostree-n-cache-hits", "ostree-content-bytes-written"), "int"),
}
METADATA = {"org.osbuild.rpm": {"packages": [RPM_PACKAGE]}, "org.osbuild.ostree.commit": {"compose": OSTREE_COMPOSE}}


def kind_of(value: Any) -> str:
    if isinstance(value, Obj):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | Fraction):
        return "number"
    return "string" if isinstance(value, str) else "null"


def go_decode(value: Any, spec: object, path: str) -> list[str]:
    """Why `json.Unmarshal` of `value` into the Go type `spec` fails; empty when it does not."""
    if value is None or spec == "any":
        return []
    got = kind_of(value)
    if isinstance(spec, dict):
        if got != "object":
            return [f"{path}: a JSON {got} cannot become a Go struct"]
        return [problem for key, item in value.pairs
                for name in [n for n in spec if n.lower() == key.lower()][:1]
                for problem in go_decode(item, spec[name], f"{path}.{name}")]
    if isinstance(spec, list):
        if got != "array":
            return [f"{path}: a JSON {got} cannot become a Go slice"]
        return [problem for i, item in enumerate(value) for problem in go_decode(item, spec[0], f"{path}[{i}]")]
    wanted = {"string": "string", "bool": "bool", "int": "number", "float64": "number"}[str(spec)]
    if got != wanted:
        return [f"{path}: a JSON {got} where Go wants a {spec}"]
    if spec == "int" and isinstance(value, Fraction):
        return [f"{path}: {value.text} has a fraction or exponent, a Go int refuses it"]
    if spec == "int" and not INT64_MIN <= value <= INT64_MAX:
        return [f"{path}: {value} overflows a Go int"]
    if spec == "float64" and not math.isfinite(as_float(value)):
        return [f"{path}: out of float64 range"]
    return []


def as_float(value: int | Fraction) -> float:
    try:
        return float(value.text if isinstance(value, Fraction) else value)
    except OverflowError:
        return math.inf


def text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def number(value: Any) -> float:
    return as_float(value) if isinstance(value, int | Fraction) and not isinstance(value, bool) else 0.0


def sub(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Obj) else None


@dataclass(frozen=True, slots=True)
class Context:
    """What a Go client keeps of a context, by its id, from the first record that defines it."""

    origin: str
    pipeline: str
    pipeline_id: str
    stage: str
    stage_id: str

    @classmethod
    def of(cls, ctx: Obj) -> Context:
        pipeline = sub(ctx, "pipeline")
        stage = sub(pipeline, "stage")
        return cls(origin=text(sub(ctx, "origin")), pipeline=text(sub(pipeline, "name")),
                   pipeline_id=text(sub(pipeline, "id")), stage=text(sub(stage, "name")),
                   stage_id=text(sub(stage, "id")))


@dataclass(slots=True)
class Checker:
    """Reads one stream record by record and collects every problem with where it is."""

    problems: list[str] = field(default_factory=list)
    records: int = 0
    contexts: dict[str, Context] = field(default_factory=dict)
    pipelines: set[str] = field(default_factory=set)
    stages: int = 0
    failed_stages: int = 0
    results: set[str] = field(default_factory=set)
    monitor_records: int = 0
    final: tuple[int, int] = (0, 0)

    def check(self, data: bytes) -> None:
        if not data:
            self.problems.append("the stream is empty")
            return
        lines = data.split(b"\n")
        complete = lines[-1] == b""
        if complete:
            lines.pop()
        start = 0
        for number_, line in enumerate(lines, 1):
            where = f"line {number_} (byte {start})"
            start += len(line) + 1
            if number_ == len(lines) and not complete:
                self.problems.append(f"{where}: not terminated by LF: a cut-off stream")
            self.line(where, line)
        if self.records and not self.monitor_records:
            self.problems.append('no record has the origin "osbuild.monitor": Go clients show no status')

    def line(self, where: str, line: bytes) -> None:
        if not line.strip(b" \t\r"):
            self.problems.append(f"{where}: a blank line, which the Go scanner fails to unmarshal")
            return
        if line[0] != RS:
            self.problems.append(f"{where}: does not start with RS (0x1E)")
            return
        body = line.lstrip(b"\x1e")
        if len(body) < len(line) - 1:
            self.problems.append(f"{where}: more than one RS before the record")
        if b"\x1e" in body:
            self.problems.append(f"{where}: an RS inside the line: two records on one line, or a trailing RS")
            return
        if not body.strip(b" \t\r"):
            self.problems.append(f"{where}: an RS and no JSON text")
            return
        if len(line) + 1 > OLD_SCANNER_LIMIT:
            self.problems.append(f"{where}: {len(line) + 1} bytes, over the 64 KiB of older bufio.Scanner clients")
        try:
            record = parse(body.decode())
        except ValueError as e:  # UnicodeDecodeError is a ValueError too
            self.problems.append(f"{where}: not one JSON text: {e}")
            return
        self.records += 1
        self.record(f"record {self.records}, {where}", record)

    def record(self, where: str, record: Any) -> None:
        if not isinstance(record, Obj):
            self.problems.append(f"{where}: a JSON {kind_of(record)}, not an object")
            return
        decoding = go_decode(record, STATUS, "$")
        if decoding:
            self.problems.extend(f"{where}: {problem}" for problem in decoding)
            return
        ctx = record.get("context")
        if not isinstance(ctx, Obj):
            self.problems.append(f"{where}: no context")
            return
        cid = text(ctx.get("id"))
        if not cid:
            self.problems.append(f"{where}: a context without an id")
            return
        defines = ctx.get("origin") is not None or ctx.get("pipeline") is not None
        known = self.contexts.get(cid)
        if known is None:
            if not defines:
                self.problems.append(f"{where}: context {cid} abbreviated before it was ever sent in full")
                return
            known = self.contexts[cid] = Context.of(ctx)
        elif defines and Context.of(ctx) != known:
            self.problems.append(f"{where}: context {cid} sent again with different content")
        if known.pipeline:
            self.pipelines.add(known.pipeline)
        if known.origin == "osbuild.monitor":
            self.monitor_records += 1
        if abs(number(record.get("timestamp"))) <= 1e-4:
            self.problems.append(f"{where}: no timestamp")
        self.progress(where, record.get("progress"))
        self.result(where, cid, known, record.get("result"))
        metadata = record.get("metadata")
        if metadata is not None and known.stage in METADATA:
            self.problems.extend(f"{where}: {known.stage} metadata: {problem}"
                                 for problem in go_decode(metadata, METADATA[known.stage], "$.metadata"))

    def progress(self, where: str, progress: Any) -> None:
        if progress is None:
            self.problems.append(f"{where}: no progress")
            return
        level = progress
        while isinstance(level, Obj):
            done, total = number(level.get("done")), number(level.get("total"))
            if not 0 <= done <= total:
                self.problems.append(f"{where}: progress {level.get('name')!r} at {done:g} of {total:g}")
            level = level.get("progress")
        self.final = (int(number(progress.get("done"))), int(number(progress.get("total"))))

    def result(self, where: str, cid: str, ctx: Context, result: Any) -> None:
        # Go keeps only results with an id; osbuild's source results have none
        if result is None or not text(result.get("id")):
            return
        success = result.get("success")
        if not isinstance(success, bool):
            self.problems.append(f"{where}: a result without a boolean success, which Go counts as failed")
            return
        if cid in self.results:
            self.problems.append(f"{where}: a second result under context {cid} replaces the first in Go")
        self.results.add(cid)
        if ctx.stage:
            self.stages += 1
            self.failed_stages += not success

    @property
    def summary(self) -> str:
        done, total = self.final
        return (f"records={self.records} pipelines={len(self.pipelines)} stages={self.stages} "
                f"failed_stages={self.failed_stages} final_done={done}/{total} "
                + (f"INVALID ({len(self.problems)} problems)" if self.problems else "ok"))


def check(data: bytes) -> Checker:
    """Check a whole stream; the result's `problems` is empty when Go clients read it as osbuild's."""
    checker = Checker()
    checker.check(data)
    return checker
