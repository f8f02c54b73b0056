"""The benchmark record: one JSON object per (format, backend) run, versioned and validated.

``SCHEMA_VERSION`` changes whenever a field is renamed, removed or changes meaning; adding an
optional field does not change it. ``docs/bench.md`` documents every field. :func:`validate`
checks a record (types and allowed values) and returns the list of problems; :func:`load_records`
reads a results file, a single record, a list of records or a folder of them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import CorruptFile, SourceNotFound

SCHEMA_NAME = "zopt.bench.record"
SCHEMA_VERSION = 1
RESULTS_NAME = "zopt.bench.results"

STATUSES = ("ok", "skipped", "unsupported", "missing_dependency", "failed", "crashed", "oom", "timeout")
ROLES = ("reference", "variant")

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))

# field path -> allowed types; "*" marks a required field
FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "schema": ((str,), True),
    "schema_version": ((int,), True),
    "run_id": ((str,), True),
    "created": ((str,), True),
    "label": ((str,), True),
    "role": ((str,), True),
    "status": ((str,), True),
    "message": (_OPT_STR, True),
    "format": ((dict,), True),
    "format.spec": ((str,), True),
    "format.name": ((str,), True),
    "format.subtype": (_OPT_STR, True),
    "backend": (_OPT_STR, True),
    "backend_reason": (_OPT_STR, False),
    "options": ((dict,), True),
    "source": ((dict,), True),
    "source.spec": ((str,), True),
    "source.sha256": (_OPT_STR, True),
    "source.params": ((int, type(None)), True),
    "settings": ((dict,), True),
    "settings.steps": ((int,), True),
    "settings.width": ((int,), True),
    "settings.height": ((int,), True),
    "settings.prompts": ((list,), True),
    "settings.seeds": ((list,), True),
    "settings.repeats": ((int,), True),
    "settings.warmup": ((int,), True),
    "settings.guidance_scale": (_NUM, True),
    "settings.device": ((str,), True),
    "settings.compute_dtype": (_OPT_STR, True),
    "settings.threads": ((int,), False),
    "hardware": ((dict,), True),
    "hardware_fingerprint": ((str,), True),
    "software": ((dict,), True),
    "metrics": ((dict,), True),
    "images": ((list,), True),
    "duration_s": (_OPT_NUM, True),
}

# metrics are all optional (a failed run has none), but typed when present
METRIC_FIELDS: dict[str, tuple[type, ...]] = {
    "artifact_bytes": (int, type(None)),
    "bits_per_weight": _OPT_NUM,
    "convert_s": _OPT_NUM,
    "cached": (bool, type(None)),
    "load_s": _OPT_NUM,
    "pipeline_s": _OPT_NUM,
    "memory": (dict,),
    "memory.kind": (str,),
    "memory.peak_bytes": (int,),
    "memory.baseline_bytes": (int,),
    "memory.cuda_max_allocated": (int, type(None)),
    "memory.cuda_max_reserved": (int, type(None)),
    "latency": (dict,),
    "latency.step_ms": (dict,),
    "latency.step_ms.median": _NUM,
    "latency.step_ms.p90": _NUM,
    "latency.step_ms.n": (int,),
    "latency.step_cpu_ms": (dict,),
    "latency.step_cpu_ms.median": _OPT_NUM,
    "latency.image_s": (dict,),
    "latency.image_s.median": _NUM,
    "latency.image_s.p90": _NUM,
    "latency.image_s.n": (int,),
    "quality": (dict, type(None)),
    "quality.per_step": (list,),
    "quality.rel_l2_mean": _OPT_NUM,
    "quality.rel_l2_max": _OPT_NUM,
    "quality.cosine_min": _OPT_NUM,
    "quality.cosine_mean": _OPT_NUM,
    "quality.final_latent_rel_err": _OPT_NUM,
    "quality.psnr_db": _OPT_NUM,
    "quality.ssim": _OPT_NUM,
    "quality.lpips": _OPT_NUM,
    "quality.lpips_status": (str,),
    "quality.adherence": _OPT_NUM,
    "quality.adherence_ref": _OPT_NUM,
    "quality.adherence_detail": (dict, type(None)),
}


def get_path(d: Any, path: str) -> Any:
    """``get_path(rec, "metrics.latency.step_ms.median")``; None when any part is missing."""
    cur = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _has_path(d: Any, path: str) -> bool:
    cur = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False
        cur = cur[part]
    return True


def _typename(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def validate(record: Any) -> list[str]:
    """Problems with ``record`` as a version-``SCHEMA_VERSION`` bench record (empty list: valid)."""
    if not isinstance(record, dict):
        return ["record is not a JSON object"]
    problems = []
    if record.get("schema") != SCHEMA_NAME:
        problems.append(f"schema is {record.get('schema')!r}, expected {SCHEMA_NAME!r}")
    if record.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version is {record.get('schema_version')!r}, this zopt reads {SCHEMA_VERSION}")
        return problems
    for path, (types, required) in FIELDS.items():
        if not _has_path(record, path):
            if required:
                problems.append(f"missing field {path}")
            continue
        v = get_path(record, path)
        # bool is an int subclass: refuse it where a number is meant
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            problems.append(f"{path} is {type(v).__name__}, expected {_typename(types)}")
    if record.get("status") not in STATUSES:
        problems.append(f"status {record.get('status')!r} is not one of {', '.join(STATUSES)}")
    if record.get("role") not in ROLES:
        problems.append(f"role {record.get('role')!r} is not one of {', '.join(ROLES)}")
    metrics = record.get("metrics")
    if isinstance(metrics, dict):
        for path, types in METRIC_FIELDS.items():
            if _has_path(metrics, path):
                v = get_path(metrics, path)
                if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
                    problems.append(f"metrics.{path} is {type(v).__name__}, expected {_typename(types)}")
        if record.get("status") == "ok" and record.get("role") == "variant":
            for path in ("artifact_bytes", "load_s", "memory.peak_bytes", "latency.step_ms.median"):
                if get_path(metrics, path) is None:
                    problems.append(f"status ok but metrics.{path} is missing")
    return problems


def results_document(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The combined results file: every record of one sweep."""
    return {"schema": RESULTS_NAME, "schema_version": SCHEMA_VERSION, "records": records}


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records from a results file, a single record file, a JSON list, or a folder of record files.

    Raises CorruptFile (naming the file) when it is not JSON or a record fails validation.
    """
    p = Path(path)
    if not p.exists():
        raise SourceNotFound("no such results file or folder", p)
    if p.is_dir():
        files = sorted((p / "records").glob("*.json")) if (p / "records").is_dir() else sorted(p.glob("*.json"))
        out: list[dict[str, Any]] = []
        for f in files:
            out += load_records(f)
        return out
    from ..validate import read_json

    try:
        doc = read_json(p, "results file")
    except CorruptFile as e:
        raise CorruptFile(f"not a JSON results file ({e.problem})", p) from None
    if isinstance(doc, dict) and doc.get("schema") == RESULTS_NAME:
        records = doc.get("records")
    elif isinstance(doc, dict):
        records = [doc]
    else:
        records = doc
    if not isinstance(records, list):
        raise CorruptFile("expected a bench record, a list of records or a results document", p)
    for i, r in enumerate(records):
        problems = validate(r)
        if problems:
            raise CorruptFile(f"record {i} is not a valid bench record: {problems[0]}", p)
    return records
