"""The sweep: plan which (format, backend) pairs run here, convert (cached), run each in its own
process, and turn every outcome, good or bad, into a schema record.

One process per run keeps peak-memory numbers clean (nothing left over from the previous format)
and contains failures: a crash, an out-of-memory kill, a timeout or a missing package becomes a
record with a status and a message, and the sweep moves on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .process import run_worker
from .schema import SCHEMA_NAME, SCHEMA_VERSION, results_document

DEFAULT_PROMPTS = [
    "a lighthouse on a cliff at dawn, photograph",
    "a bowl of ramen on a wooden table, studio lighting",
]
# What "all" means for formats with many subtypes: a sensible spread, not every type.
ALL_SUBTYPES: dict[str, list[str]] = {"gguf": ["Q8_0", "Q4_K_M", "Q2_K"]}
CACHE_NAME = "bench-cache"


@dataclass
class BenchConfig:
    """Everything a sweep depends on (the CLI fills it from its arguments)."""

    source: str = "tiny"
    formats: list[str] | None = None  # None or ["all"]: every format that can run here
    backend: str = "auto"  # auto | all | NAME | FORMAT=NAME,... (comma separated)
    steps: int = 4
    width: int = 256
    height: int = 256
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    seeds: list[int] = field(default_factory=lambda: [0])
    repeats: int = 2
    warmup: int = 1
    guidance_scale: float = 0.0
    # Base-style sampling (zopt.runtime.sampling); recorded in the settings only when not the default
    negative_prompts: list[str] | None = None  # one per prompt (used with guidance > 0)
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    max_sequence_length: int = 512
    shift: float | None = None
    sigmas: list[float] | None = None
    device: str = "auto"
    base: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    out: Path = Path("exports/bench")
    timeout: float = 1800.0
    progress: bool = True
    reconvert: bool = False  # ignore (and replace) cached conversions
    offload: list[str] = field(default_factory=lambda: ["none"])  # each variant runs once per mode
    attention: list[str] = field(default_factory=lambda: ["auto"])  # ... and per attention kernel
    reference_offload: str = "auto"  # lets the reference run where bf16 does not fit resident
    threads: int | None = None  # torch intra-op threads in each run (None: torch's default)
    against: str | None = None  # a baseline checkout: every run also runs with its code, in turns


@dataclass
class Planned:
    """One row of the sweep: run it (status None) or record why not."""

    spec: str
    name: str
    subtype: str | None
    backend: str | None = None
    reason: str | None = None
    status: str | None = None
    message: str | None = None
    offload: str = "none"
    attention: str = "auto"

    @property
    def label(self) -> str:
        extra = (f"+offload={self.offload}" if self.offload != "none" else "") + (
            f"+attention={self.attention}" if self.attention != "auto" else "")
        return self.spec + (f"@{self.backend}" if self.backend else "") + extra


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def expand_formats(formats: list[str] | None) -> list[str]:
    """Format specs to try: ``None``/``all`` gives every registered format (with ALL_SUBTYPES)."""
    from ..formats import FORMATS

    out: list[str] = []
    for item in formats or ["all"]:
        for spec in (s.strip() for s in item.split(",")):
            if not spec:
                continue
            if spec.lower() == "all":
                for name in FORMATS:
                    out += [f"{name}:{s}" for s in ALL_SUBTYPES[name]] if name in ALL_SUBTYPES else [name]
            else:
                out.append(spec)
    return list(dict.fromkeys(out))


def _backend_wishes(backend: str, fmt: str) -> list[str]:
    """The backend names asked for ``fmt`` (``auto``, ``all`` or names), from ``--backend``."""
    general, specific = [], []
    for part in (p.strip() for p in (backend or "auto").split(",")):
        if "=" in part:
            f, _, b = part.partition("=")
            if f.strip().lower() == fmt:
                specific.append(b.strip())
        elif part:
            general.append(part)
    return specific or general or ["auto"]


def check_options(options: dict[str, Any], names: set[str]) -> None:
    """A sweep's options go to the formats that have them; a key none of ``names`` has is an error."""
    from ..formats.options import OptionError, unknown_key_message
    from ..formats.registry import option_names

    known = tuple(dict.fromkeys(k for n in sorted(names) for k in option_names(n)))
    for key in options:
        if key not in known:
            raise OptionError(unknown_key_message("", key, known, "no format of this sweep has option"))


def plan(specs: list[str], backend: str, hw) -> list[Planned]:
    """Decide, per format spec, which backends run here; the rest are kept with a reason."""
    from ..errors import MissingDependency, UnsupportedFormat
    from ..formats import module_for, parse_spec
    from ..formats.registry import select_backend
    from ..platform.backends import ordered

    rows: list[Planned] = []
    for spec in specs:
        try:
            info, sub = parse_spec(spec)
        except UnsupportedFormat as e:
            rows.append(Planned(spec, spec.partition(":")[0], None, status="unsupported", message=str(e)))
            continue
        norm = info.name + (f":{sub}" if sub else "")
        try:
            module_for(info)
        except MissingDependency as e:
            rows.append(Planned(norm, info.name, sub, status="missing_dependency", message=str(e)))
            continue
        except UnsupportedFormat as e:
            rows.append(Planned(norm, info.name, sub, status="unsupported", message=str(e)))
            continue
        for wish in _backend_wishes(backend, info.name):
            if wish == "all":
                runnable = [b for b in ordered(info) if not b.why_not(hw)]
                if not runnable:
                    try:
                        select_backend(info, hw)
                    except UnsupportedFormat as e:
                        rows.append(Planned(norm, info.name, sub, status="skipped", message=str(e)))
                rows += [Planned(norm, info.name, sub, b.name, f"{b.name}: {b.description}") for b in runnable]
                continue
            try:
                sel = select_backend(info, hw, prefer=None if wish == "auto" else wish)
            except UnsupportedFormat as e:
                rows.append(Planned(norm, info.name, sub, None if wish == "auto" else wish, status="skipped",
                                    message=str(e)))
                continue
            rows.append(Planned(norm, info.name, sub, sel.name, sel.reason))
    seen: set[str] = set()
    return [r for r in rows if not (r.label in seen or seen.add(r.label))]


def runtime_rows(rows: list[Planned], offload: list[str], attention: list[str], hw) -> list[Planned]:
    """Each runnable row once per (offload mode, attention kernel); a combination this machine
    refuses (e.g. model offload on a CPU device) is kept as a skipped row with the reason."""
    import dataclasses

    from ..errors import ZoptError
    from ..runtime import attention as A
    from ..runtime import offload as O

    probe = O.Footprint(0, 0, 0, 0, 0, 0, 0)
    dtype = "fp32" if hw.device == "cpu" else "bf16" if hw.bf16 else "fp16"
    out = []
    for r in rows:
        if r.status is not None:
            out.append(r)
            continue
        for mode in offload:
            for att in attention:
                row = dataclasses.replace(r, offload=mode, attention=att)
                try:
                    O.choose(mode, hw, probe)
                    A.choose(att, hw, dtype)
                except ZoptError as e:
                    row.status, row.message = "skipped", str(e)
                out.append(row)
    return out


def cache_key(source_sha: str, spec: str, options: dict[str, Any]) -> str:
    """The cached conversion's key: source, spec, options and the code that converts (the version
    alone misses a changed writer between releases, and a stale artifact then fails to load)."""
    from .._version import __version__

    blob = json.dumps({"source": source_sha, "spec": spec, "options": options, "zopt": __version__,
                       "code": code_fingerprint()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@functools.cache
def code_fingerprint() -> str:
    """sha256 of the installed zopt package's Python sources (a few ms)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def cached_artifact_path(source_sha: str, spec: str, options: dict[str, Any]) -> Path:
    """Where the conversion of ``source`` to ``spec`` with ``options`` lives in the cache."""
    from .._io import cache_dir
    from ..formats import parse_spec

    info, _ = parse_spec(spec)
    suffix = f".{info.name}" if info.artifact == "file" else ""
    return cache_dir() / CACHE_NAME / f"{safe_name(spec)}-{cache_key(source_sha, spec, options)[:20]}{suffix}"


def pipeline_folder_of(source: str) -> str | None:
    """The diffusers pipeline folder a source belongs to (its text encoder and VAE serve every
    variant, whose artifacts may not say where they came from), or None."""
    from ..families import resolve_source

    p = Path(resolve_source(source))
    for cand in (p, p.parent):
        if (cand / "model_index.json").is_file():
            return str(cand)
    return None


def software_versions() -> dict[str, Any]:
    import importlib.metadata as md
    import platform

    from .._version import __version__

    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "zopt": __version__}
    for pkg in ("torch", "diffusers", "transformers", "numpy", "safetensors", "gguf", "onnxruntime", "onnx",
                "bitsandbytes", "torchao", "optimum-quanto", "tensorrt", "scikit-image", "lpips"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


def _record(common: dict[str, Any], row: Planned, role: str, result: dict[str, Any], metrics: dict[str, Any],
            compute_dtype: str | None, out: Path) -> dict[str, Any]:
    settings = dict(common["settings"], compute_dtype=result.get("compute_dtype", compute_dtype))
    if row.offload != "none" or row.attention != "auto":  # runtime dimensions: part of what is compared
        settings.update(offload=row.offload, attention=row.attention)
    images = [dict(im, path=os.path.relpath(im["path"], out)) for im in result.get("images", [])]
    return {
        "schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "run_id": common["run_id"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "label": "reference" if role == "reference" else row.label, "role": role,
        "status": result.get("status", "failed"), "message": result.get("message"),
        "format": {"spec": row.spec, "name": row.name, "subtype": row.subtype},
        "backend": row.backend, "backend_reason": row.reason, "options": dict(common["options"]),
        "source": dict(common["source"]), "settings": settings,
        "hardware": common["hardware"], "hardware_fingerprint": common["fingerprint"],
        "software": common["software"], "metrics": {**metrics, **result.get("metrics", {})},
        "images": images, "duration_s": result.get("duration_s"),
        **({"runtime": result["runtime"]} if result.get("runtime") else {}),
    }


def sampling_settings(cfg: BenchConfig) -> dict[str, Any]:
    """The sampling settings that differ from the defaults (so records of Turbo-style sweeps keep the
    settings, and stay comparable, as before these options existed)."""
    defaults = BenchConfig()
    out = {k: getattr(cfg, k) for k in ("cfg_normalization", "cfg_truncation", "max_sequence_length", "shift", "sigmas")
           if getattr(cfg, k) != getattr(defaults, k)}
    if cfg.guidance_scale > 0 and any(cfg.negative_prompts or []):
        out["negative_prompts"] = list(cfg.negative_prompts)
    return out


def sweep(cfg: BenchConfig, display=None) -> list[dict[str, Any]]:
    """Run the whole sweep described by ``cfg``; write records under ``cfg.out``; return them."""
    from .. import checkpoint
    from ..families import resolve_source
    from ..formats.outputs import check_spec
    from ..runtime import detect
    from .display import SweepDisplay
    from .metrics import bits_per_weight

    for spec in expand_formats(cfg.formats):  # a typo fails here, not after the reference run
        check_spec(spec)
    hw = detect()
    device = hw.torch_device if cfg.device == "auto" else cfg.device
    src = checkpoint.open(resolve_source(cfg.source))
    source = {"spec": str(cfg.source), "sha256": src.sha256(), "params": int(src.num_params())}
    src_bytes = sum(f.stat().st_size for f in src.files)
    ref_dtype = "fp32" if device == "cpu" else "bf16"
    out = Path(cfg.out)
    (out / "records").mkdir(parents=True, exist_ok=True)
    for old in (out / "records").glob("*.json"):  # the folder holds the latest sweep only
        old.unlink()
    common = {
        "run_id": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + os.urandom(3).hex(),
        "source": source, "options": dict(cfg.options), "hardware": hw.to_dict(), "fingerprint": hw.fingerprint(),
        "software": software_versions(),
        "settings": {"steps": cfg.steps, "width": cfg.width, "height": cfg.height, "prompts": list(cfg.prompts),
                     "seeds": list(cfg.seeds), "repeats": cfg.repeats, "warmup": cfg.warmup,
                     "guidance_scale": cfg.guidance_scale, "device": device, **sampling_settings(cfg),
                     **({"threads": cfg.threads} if cfg.threads else {})},
    }
    planned = plan(expand_formats(cfg.formats), cfg.backend, hw)
    check_options(cfg.options, {r.name for r in planned if r.status is None})
    rows = runtime_rows(planned, cfg.offload, cfg.attention, hw)
    base = cfg.base or pipeline_folder_of(cfg.source)
    display = display or SweepDisplay(1 + sum(r.status is None for r in rows), enabled=cfg.progress)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out))
    ref_dir = work / "reference"
    run_base = {"mode": "run", "device": device, "base": base, "prompts": list(cfg.prompts),
                "seeds": list(cfg.seeds), "steps": cfg.steps, "width": cfg.width, "height": cfg.height,
                "repeats": cfg.repeats, "warmup": cfg.warmup, "guidance_scale": cfg.guidance_scale,
                "negative_prompts": cfg.negative_prompts, "cfg_normalization": cfg.cfg_normalization,
                "cfg_truncation": cfg.cfg_truncation, "max_sequence_length": cfg.max_sequence_length,
                "shift": cfg.shift, "sigmas": cfg.sigmas, "ref_dir": str(ref_dir), "threads": cfg.threads}
    records: list[dict[str, Any]] = []
    side = None
    if cfg.against:
        from .paired import Against

        side = Against(cfg.against, out / "baseline", work)

    def finish(rec: dict[str, Any]) -> None:
        records.append(rec)
        path = out / "records" / f"{safe_name(rec['label'])}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rec, indent=1) + "\n")
        os.replace(tmp, path)

    try:
        with display:
            ref_row = Planned(ref_dtype, ref_dtype, None, "torch", "reference: eager PyTorch from the source")
            display.start("reference")
            images_dir = out / "images" / "reference"
            shutil.rmtree(images_dir, ignore_errors=True)
            spec = dict(run_base, role="reference", model=str(cfg.source), dtype=ref_dtype, backend=None,
                        offload=cfg.reference_offload, attention="auto", image_dir=str(images_dir))
            ref_metrics = {"artifact_bytes": src_bytes, "bits_per_weight": bits_per_weight(src_bytes, source["params"])}
            if side:
                res, res_b = side.run(spec, side.spec(spec, "reference"), work, "reference", cfg.timeout,
                                      display.event, out / "logs" / "reference.log")
                side.finish(_record(common, ref_row, "reference", res_b, ref_metrics, ref_dtype, side.out))
                side.ref_images = [str(side.out / im["path"]) for im in side.records[-1]["images"]]
            else:
                res = run_worker(spec, work, "reference", cfg.timeout, display.event, out / "logs" / "reference.log")
            ref = _record(common, ref_row, "reference", res, ref_metrics, ref_dtype, out)
            finish(ref)
            display.end("reference", ref["status"], ref["message"])
            ref_images = [str(out / im["path"]) for im in ref["images"]] if ref["status"] == "ok" else []
            for row in rows:
                if row.status is not None:
                    finish(_record(common, row, "variant", {"status": row.status, "message": row.message}, {},
                                   None, out))
                    continue
                display.start(row.label)
                rec = _run_variant(cfg, common, row, run_base, ref_images, work, out, display, side)
                finish(rec)
                display.end(row.label, rec["status"], rec["message"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from .schema import validate

    for rec in records:  # a record we cannot read back is a bug here, not a user error
        problems = validate(rec)
        if problems:
            raise AssertionError(f"invalid bench record {rec['label']}: {problems}")
    doc = out / "results.json"
    tmp = doc.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results_document(records), indent=1) + "\n")
    os.replace(tmp, doc)
    if side:
        side.write()
    return records


def _run_variant(cfg, common, row: Planned, run_base, ref_images, work: Path, out: Path, display,
                 side=None) -> dict[str, Any]:
    from .metrics import artifact_bytes, bits_per_weight

    name = safe_name(row.label)
    artifact = cached_artifact_path(common["source"]["sha256"], row.spec, cfg.options)
    if cfg.reconvert and artifact.exists():
        shutil.rmtree(artifact) if artifact.is_dir() else artifact.unlink()
    metrics: dict[str, Any] = {"cached": artifact.exists(), "convert_s": None}
    images_dir = out / "images" / name
    spec = dict(run_base, role="variant", model=str(artifact), dtype=None, backend=row.backend, offload=row.offload,
                attention=row.attention, image_dir=str(images_dir), ref_images=ref_images)
    log = out / "logs" / f"{name}.log"
    if not artifact.exists():
        display.phase(row.label, "convert")
        res = run_worker({"mode": "convert", "source": str(cfg.source), "to": row.spec, "out": str(artifact),
                          "options": cfg.options}, work, f"{name}.convert", cfg.timeout, display.event,
                         out / "logs" / f"{name}.convert.log")
        metrics["convert_s"] = res.get("metrics", {}).get("convert_s")
        if res["status"] != "ok" or not artifact.exists():
            res = dict(res, message=f"conversion failed: {res.get('message') or 'no artifact written'}",
                       metrics={})
            if res["status"] == "ok":
                res["status"] = "failed"
            if side:  # the baseline still runs: its success against this failure is the regression
                side.variant(cfg, common, row, spec, artifact, metrics, work, display.event, log, converted=False)
            return _record(common, row, "variant", res, metrics, None, out)
    metrics["artifact_bytes"] = artifact_bytes(artifact)
    metrics["bits_per_weight"] = bits_per_weight(metrics["artifact_bytes"], common["source"]["params"])
    shutil.rmtree(images_dir, ignore_errors=True)
    res = (side.variant(cfg, common, row, spec, artifact, metrics, work, display.event, log) if side
           else run_worker(spec, work, name, cfg.timeout, display.event, log))
    return _record(common, row, "variant", res, metrics, None, out)
