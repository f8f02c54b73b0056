"""The versioned record schema: what validates, what does not, and how records are read back."""

from __future__ import annotations

import json

import pytest
from bench_helpers import record, records

from zopt.bench import schema
from zopt.errors import CorruptFile, SourceNotFound


def test_records_from_the_harness_validate():
    for r in records():
        assert schema.validate(r) == [], r["label"]
    r = records()[1]
    assert r["schema"] == schema.SCHEMA_NAME and r["schema_version"] == schema.SCHEMA_VERSION
    assert r["hardware_fingerprint"] == "cpu:Test CPU:x86_64:2"
    assert schema.get_path(r, "metrics.latency.step_ms.median") == 90.0
    assert schema.get_path(r, "metrics.nothing.here") is None


@pytest.mark.parametrize("mutate, problem", [
    (lambda r: r.pop("status"), "missing field status"),
    (lambda r: r["settings"].pop("steps"), "missing field settings.steps"),
    (lambda r: r.__setitem__("status", "great"), "status 'great' is not one of"),
    (lambda r: r.__setitem__("role", "baseline"), "role 'baseline'"),
    (lambda r: r["settings"].__setitem__("steps", "4"), "settings.steps is str, expected int"),
    (lambda r: r["settings"].__setitem__("steps", True), "settings.steps is bool"),
    (lambda r: r["metrics"]["memory"].__setitem__("peak_bytes", 1.5), "metrics.memory.peak_bytes is float"),
    (lambda r: r["metrics"]["latency"]["step_ms"].pop("median"), "metrics.latency.step_ms.median is missing"),
    (lambda r: r.__setitem__("schema_version", 99), "schema_version is 99"),
])
def test_invalid_records_are_named(mutate, problem):
    r = record("bf16")
    mutate(r)
    problems = schema.validate(r)
    assert any(problem in p for p in problems), problems


def test_load_records_every_shape(tmp_path):
    recs = records()
    doc = tmp_path / "results.json"
    doc.write_text(json.dumps(schema.results_document(recs)))
    assert schema.load_records(doc) == recs
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps(recs))
    assert schema.load_records(lst) == recs
    one = tmp_path / "one.json"
    one.write_text(json.dumps(recs[1]))
    assert schema.load_records(one) == [recs[1]]
    folder = tmp_path / "run" / "records"
    folder.mkdir(parents=True)
    for i, r in enumerate(recs):
        (folder / f"{i}.json").write_text(json.dumps(r))
    assert schema.load_records(tmp_path / "run") == recs


def test_load_records_refuses_bad_input(tmp_path):
    with pytest.raises(SourceNotFound):
        schema.load_records(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"records": ')
    with pytest.raises(CorruptFile, match="bad.json: not a JSON results file"):
        schema.load_records(bad)
    r = record("bf16")
    r["schema_version"] = 0
    bad.write_text(json.dumps([r]))
    with pytest.raises(CorruptFile, match="record 0 is not a valid bench record: schema_version is 0"):
        schema.load_records(bad)
    bad.write_text("42")
    with pytest.raises(CorruptFile):
        schema.load_records(bad)


def test_schema_doc_lists_every_field():
    """docs/bench.md documents each field of the schema (kept in step with FIELDS)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "bench.md").read_text()
    missing = [f for f in list(schema.FIELDS) + [f"metrics.{m}" for m in schema.METRIC_FIELDS] if f"`{f}`" not in doc]
    assert not missing, f"undocumented fields: {missing}"
