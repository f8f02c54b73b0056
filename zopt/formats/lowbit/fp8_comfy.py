"""ComfyUI's "scaled FP8" single-file layout for the fp8 format (``--layout comfy``).

What ComfyUI reads (``comfy/model_detection.py``, ``comfy/ops.py``): original Z-Image key names,
``float8_e4m3fn`` (or ``float8_e5m2``) Linear weights, one F32 scalar ``<layer>.scale_weight`` per
quantized Linear (``w ~= fp8 * scale_weight``), and a ``scaled_fp8`` tensor whose *dtype* tells
ComfyUI which FP8 type the model computes with. Layers without ``scale_weight`` are plain tensors.
The fused ``attention.qkv`` weight gets one scale (ComfyUI has no per-channel scales here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..._io import atomic_path
from ...checkpoint import TensorSource
from ...families import zimage
from ...progress import progress_bar
from ...safetensors_io import StreamingSafetensorsWriter
from ..artifact import read_manifest, source_provenance, verify_manifest, write_config, write_manifest
from ..common import check_no_meta, empty_model, replace_module, set_tensor
from . import common as C
from .fp8_ops import VARIANTS, fp8_linear, quantize_fp8
from .int8 import as_int8

MARKER = "scaled_fp8"
COMFY_FILE = "zimage_fp8_scaled.safetensors"


def _diffusers_names(orig: str) -> list[tuple[str, int]]:
    """Diffusers names a tensor of the original layout holds: [(name, part index of 3 or -1)]."""
    if orig.endswith(".attention.qkv.weight"):
        base = zimage.to_diffusers_name(orig).replace(".attention.qkv.weight", ".attention.")
        return [(f"{base}{p}.weight", i) for i, p in enumerate(("to_q", "to_k", "to_v"))]
    return [(zimage.to_diffusers_name(orig), -1)]


def convert_comfy(src: TensorSource, out: Path, scheme: C.Scheme, options: Any, progress: bool) -> Path:
    """Write ``out/`` = {config.json, zimage_fp8_scaled.safetensors, manifest} from ``src``, streaming;
    ``scheme`` is the fp8 format's scheme (its ``var`` names the FP8 type), ``options`` its typed options."""
    import torch

    var = scheme.var
    _, st_type, _ = VARIANTS[var]
    d, config, decisions = C.plan(src, scheme, options)
    o = zimage.as_original(src)
    entries, records, quant = [], {}, {}
    for n in o.names():
        info = o.info(n)
        parts = _diffusers_names(n)
        decs = [decisions[p] for p, _ in parts]
        q = all(x.quantize for x in decs)
        if len(parts) > 1 and any(x.quantize for x in decs) and not q:
            # q, k and v share one fused tensor: quantize it only if all three would be
            decs = [C.Decision(False, x.storage, x.reason if not x.quantize else "fused qkv kept with its siblings")
                    for x in decs]
        quant[n] = q
        storage = st_type if q else decs[0].storage
        entries.append((n, storage, info.shape))
        if q:
            entries.append((n[: -len("weight")] + "scale_weight", "F32", ()))
        rows = info.shape[0] // len(parts) if len(parts) > 1 else None
        for (dn, i), dec in zip(parts, decs, strict=True):
            rec = C.tensor_record(dn, dec, d.info(dn).shape, storage=st_type)
            rec["stored_as"] = n
            if rows is not None:
                rec["rows"] = [i * rows, (i + 1) * rows]
            if q:
                rec["scale"] = n[: -len("weight")] + "scale_weight"
            records[dn] = rec
    entries.append((MARKER, st_type, ()))
    total = sum(o.info(n).nbytes for n in o.names())
    with atomic_path(out, is_dir=True) as tmp:
        write_config(tmp, config, zopt_only="fp8")
        with StreamingSafetensorsWriter(tmp / COMFY_FILE, entries, {"format": "pt", "zopt_format": "fp8"}) as w, \
                progress_bar(total, "convert -> fp8 (comfy)", unit="B", enabled=progress) as bar:
            for n in o.names():
                t = o.get(n)
                if quant[n]:
                    qw, s = quantize_fp8(t.float(), var, per_channel=False)
                    w.write(n, qw)
                    w.write(n[: -len("weight")] + "scale_weight", s.reshape(()))
                else:
                    w.write(n, t.to(torch.float32 if records_storage(records, n) == "F32" else torch.bfloat16))
                bar.advance(o.info(n).nbytes)
                del t
            w.write(MARKER, torch.zeros((), dtype=getattr(torch, VARIANTS[var][0])))
        write_manifest(tmp, format="fp8", subtype=var, options=options.recorded(),
                       source=source_provenance(src, options.hash_source), config=config,
                       tensors=records, extra={"layout": "comfy", "file": COMFY_FILE,
                                               "scheme": {"scales": "per-tensor F32 (ComfyUI)"},
                                               "summary": C.summarize(records)})
    return out


def records_storage(records: dict[str, dict[str, Any]], orig: str) -> str:
    return next(r["storage"] for r in records.values() if r["stored_as"] == orig)


def load_comfy(folder: Path, device: str, backend: str, dtype: Any = None):
    """Rebuild the model from a comfy-layout fp8 artifact folder (qkv split back into q, k, v),
    its FP8 Linear modules running kernel ``backend``."""
    manifest = read_manifest(folder)
    weights = folder / manifest.get("file", COMFY_FILE)  # the manifest check keeps "file" inside the folder
    verify_manifest(folder, manifest, reads=[weights])
    with C.manifest_mismatch(folder):
        want = C.check_record_shapes(manifest, folder)
        model = _build_comfy(folder, manifest, weights, want, device, backend, dtype)
    check_no_meta(model, folder)
    return model


def _build_comfy(folder: Path, manifest: dict[str, Any], weights: Path, want: dict[str, tuple[int, ...]],
                 device: str, backend: str, dtype: Any):
    name = backend
    model = empty_model(manifest["config"])
    with C.open_weights(weights) as f:
        # quantized modules first, so a bias set afterwards lands on the new module
        for dn, rec in sorted(manifest["tensors"].items(), key=lambda kv: "scale" not in kv[1]):
            t = f.get_tensor(rec["stored_as"])
            if "rows" in rec:
                t = t[rec["rows"][0] : rec["rows"][1]]
            C.check_shape(t, want[dn], dn, folder)
            if "scale" in rec:
                if name == C.INT8_CPU:
                    mod = as_int8(fp8_linear(t, f.get_tensor(rec["scale"]), "fp8-storage"))
                else:
                    mod = fp8_linear(t, f.get_tensor(rec["scale"]), name)
                mod = mod.to(device)
                replace_module(model, dn.rsplit(".", 1)[0], mod)
            else:
                set_tensor(model, dn, t.to(device=device, dtype=dtype or t.dtype))
    model.zopt_backend = name
    return model
