"""GGUF: convert any Z-Image source to a GGUF file (F32 ... Q2_K and K-quant recipes), load any
Z-Image GGUF (zopt's, ComfyUI-style, stable-diffusion.cpp-style) as a working model.

Files are written in the original/ComfyUI key layout (fused qkv, no prefix) with 2-D pad tokens
and ``general.architecture = "lumina2"`` (what ComfyUI-GGUF's loader detects Z-Image as), so
ComfyUI-GGUF, diffusers' ``from_single_file`` and stable-diffusion.cpp read them. The per-tensor
policy lives in :mod:`.recipes`, the byte layout in :mod:`.writer`, the quantizers in :mod:`.quants`,
the loader in :mod:`.loader`, the decoding in :mod:`zopt.ggml`; see ``docs/gguf.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf.constants import LlamaFileType

from ..._io import atomic_path
from ...checkpoint import TensorSource
from ...errors import ZoptError
from ...families import zimage
from ...progress import progress_bar
from ...validate.gguf import DIGEST_KEY
from ..options import Options
from . import recipes as gguf_recipes
from .recipes import FILE_TYPE, FLOAT_TYPES, TensorPlan
from .writer import StreamingGGUFWriter

AUTO = "auto"  # the size-targeted subtype (gguf:auto, see .auto)
AUTO_TYPES_KEY = "zopt.auto.types"
AUTO_CANDIDATES = r"\.weight$"  # what gguf:auto may quantize (the policy still keeps non-Linear tensors)
ARCHITECTURE = "lumina2"  # ComfyUI-GGUF's name for the Lumina-2 / Z-Image (NextDiT) family
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION
CHUNK_ELEMENTS = 1 << 22  # rows are quantized in pieces of ~4M weights: bounded memory per step
# Compile the GGML kernels (ggml_compile) when a conversion quantizes at least this many weights:
# compiling costs seconds to a minute per type once (then inductor's disk cache), which pays off
# only on real checkpoints, not on small test models.
COMPILE_MIN_WEIGHTS = 100_000_000
SENSITIVITY = ("gradient", "weights")  # --option sensitivity= (without calls); the first is the default


@dataclass(frozen=True)
class GGUFOptions(Options):
    """How a GGUF conversion runs and what it writes (``workers`` and ``compile`` do not change the
    bytes; the rest do, and are recorded where they apply)."""

    # quantizing threads (default: torch's thread count, at most the CPU count); also the threads of
    # the model runs that measure on the output (calls=): workers=1 on a machine busy with other work
    workers: int | None = field(default=None, metadata={"record": False})
    # compiled GGML kernels: "auto" (when the plan quantizes >= COMPILE_MIN_WEIGHTS weights), true, false
    compile: bool | str = field(default="auto", metadata={"record": False, "choices": (True, False, "auto")})
    # importance matrix (zopt calibrate, llama.cpp or stable-diffusion.cpp imatrix): importance-weighted
    # searches for every quantized type that has them (the file's sha256 is recorded in the header)
    imatrix: str | None = field(default=None, metadata={"record": False})
    # Linear weights with fewer elements stay float (quantizing them saves little on a real model)
    min_elements: int = gguf_recipes.SMALL_NUMEL
    # gguf:auto only: the whole file's size as bits per parameter, or as bytes ("5GB", "800MB")
    target_bpw: float | None = None
    target_size: str | None = None
    # llama.cpp's mixture recipes (Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M) and the 32-block types
    # (Q4_0, Q4_1, Q5_0, Q5_1): "measured" re-spends the bytes their rules give by measured per-tensor
    # sensitivity (as gguf:auto; never a larger file), "rule" writes the rules as they are (qkv/w2
    # bumps in chosen blocks, adaLN Q8_0); the uniform K types, Q8_0 and floats have one rule only
    allocation: str = field(default="measured", metadata={"choices": ("measured", "rule")})
    # "weighted": ggml's importance-weighted searches for every type that has them, with unit
    # importance where no imatrix entry is given (what stable-diffusion.cpp's converter runs: 4-11%
    # less weight error than the reference for Q2_K, Q3_K and the legacy types); "reference": ggml's
    # reference quantizers (llama-quantize without an imatrix; bytes equal ggml's in 70-100% of blocks,
    # near-ties in the K searches resolve differently, tests/formats/gguf/test_ggml_quants.py)
    search: str = field(default="weighted", metadata={"choices": ("weighted", "reference")})
    # gguf:auto and the re-tuned recipes: a file of transformer calls (zopt calibrate --save-calls) on
    # which each tensor's sensitivity is measured as the model's output error instead of its own
    # weight error (zopt/formats/gguf/outputs.py; the file's sha256 is recorded in the header)
    calls: str | None = field(default=None, metadata={"record": False})
    # with calls: "one" (the default) runs the calls once per tensor (its cheapest candidate type) and
    # scales the other types' errors by their weight errors; "all" runs them for every candidate type
    # (5-9x the time); the header's zopt.sensitivity.calls.description records which
    calls_types: str | None = field(default=None, metadata={"record": False, "choices": ("one", "all", "gradient")})
    # gguf:auto and the re-tuned recipes without calls: "gradient" weighs each tensor's weight error
    # by its gain (the output error per unit of it) from the model's Jacobian on seeded random inputs
    # (recorded in the header's zopt.sensitivity.calls.description); "weights" by nothing (no model run)
    sensitivity: str | None = field(default=None, metadata={"record": False, "choices": SENSITIVITY})


def quantize_rows(x, qtype: str, importance=None):
    """Float rows ``x`` (..., row) -> stored bytes of GGML type ``qtype`` (a uint8 tensor/array).
    ``importance``: one weight per column (an imatrix's ``E[x^2]``) for ggml's weighted searches."""
    import torch

    from . import quants

    if qtype == "F32":
        return x.to(torch.float32)
    if qtype == "F16":
        return x.to(torch.float16)
    if qtype == "BF16":
        return x.to(torch.bfloat16)
    if qtype in quants.SUPPORTED:
        # bf16/f16 rows go in as they are: quantize() widens each cache-sized piece to float32
        # itself, which saves a whole-chunk float32 copy (same bytes)
        return quants.quantize(x if x.dtype in (torch.bfloat16, torch.float16) else x.to(torch.float32), qtype,
                               importance)
    import gguf.quants

    try:
        return gguf.quants.quantize(x.to(torch.float32).numpy(), gguf.GGMLQuantizationType[qtype])
    except NotImplementedError:
        raise ZoptError(f"GGUF type {qtype} needs zopt's block quantizers (zopt.formats.gguf.quants)") from None


def dequantize_bytes(data, qtype: str, shape: tuple[int, ...], dtype=None):
    """Stored bytes of GGML type ``qtype`` -> a float tensor of ``shape`` (torch order); the
    decoding is zopt's one GGML dequantizer, :func:`zopt.ggml.dequantize`."""
    import torch

    from ... import ggml

    return ggml.dequantize(data, qtype, shape, dtype or torch.float32)


def plan_for(src: TensorSource, subtype: str | None, options: Options | dict[str, Any] | None = None
             ) -> tuple[TensorSource, list[TensorPlan]]:
    """(original-layout view of ``src``, per-tensor plan) — decided from shapes, before any data.
    ``options``: :class:`GGUFOptions` or a dict of them."""
    if not isinstance(options, Options):
        options = GGUFOptions.from_dict(options, format="gguf")
    view = zimage.as_original(src)
    shapes = {n: _file_shape(n, view.info(n).shape) for n in view.names()}
    plans = gguf_recipes.plan(shapes, subtype, options.keep, options.quantize, options.min_elements)
    return view, plans


def _file_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    # pad tokens are (1, dim) in the model; 1-D copies (stable-diffusion.cpp) are stored 2-D again
    return (1, shape[0]) if name.endswith("_pad_token") and len(shape) == 1 else tuple(shape)


def metadata_for(src: TensorSource, subtype: str, config: dict[str, Any], plans: list[TensorPlan],
                 sha256: str | None, options: Options | None = None, imatrix=None, types_map: bool = False,
                 probe=None) -> dict[str, Any]:
    """The GGUF header's key/values; ``zopt.options`` (JSON) records options that differ from the
    defaults and shape the file (a default conversion writes none: its bytes do not depend on them)."""
    from ..._version import __version__

    auto = (subtype or "").strip().lower() == AUTO
    rec_name = AUTO if auto else gguf_recipes.recipe(subtype).name
    det = zimage.detect(src)
    changed = options.changed() if options is not None else {}
    rec = None if auto else gguf_recipes.recipe(rec_name)
    if rec is None or not rec.measured:  # allocation: only the re-tuned recipes have two
        changed.pop("allocation", None)
    if rec is not None and rec.base in (*FLOAT_TYPES, "Q8_0"):
        changed.pop("search", None)  # Q8_0 and the float types have no search
    meta = {
        "general.architecture": ARCHITECTURE,
        "general.type": "model",
        "general.name": det.variant,
        "general.file_type": int(LlamaFileType.GUESSED) if auto else FILE_TYPE[rec_name],
        "general.quantization_version": QUANTIZATION_VERSION,
        "zopt.version": __version__,
        "zopt.recipe": rec_name,
        "zopt.source.name": getattr(src, "spec", None) or _source_name(src.path),
        "zopt.source.sha256": sha256 or "",
        "zopt.bits_per_weight": round(gguf_recipes.bits_per_weight(plans), 4),
        "zopt.config": json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True),
        DIGEST_KEY: "0" * 64,  # filled in by the writer when the file is complete
    }
    if changed:
        meta["zopt.options"] = json.dumps(changed, sort_keys=True)
    if getattr(src, "loras", None):  # merged before quantizing: file, sha256, scale of each
        meta["zopt.loras"] = json.dumps(list(src.loras), sort_keys=True)
    if imatrix is not None:
        meta["zopt.imatrix.file"] = imatrix.path.name if imatrix.path else ""
        meta["zopt.imatrix.sha256"] = imatrix.sha256
        meta["zopt.imatrix.datasets"] = "; ".join(imatrix.datasets)
    if probe is not None:  # sensitivity measured on the model's output over these calls
        meta.update(probe.header())
    if auto or types_map:
        # the chosen type of every tensor
        meta[AUTO_TYPES_KEY] = _types_json(plans)
    return meta


def _types_json(plans: list[TensorPlan]) -> str:
    """The recorded type map (every type name is 4 characters: its size does not depend on the types)."""
    return json.dumps({p.name: p.qtype for p in plans}, sort_keys=True)


def check_target(subtype: str | None, options: Options) -> None:
    """The checks of these options against ``subtype`` that need no data: made before any work
    (also by a multi-target conversion before its first target starts)."""
    auto = (subtype or "").strip().lower() == AUTO
    if not auto and (options.target_bpw is not None or options.target_size is not None):
        raise ZoptError("--target-bpw / --target-size set the size of gguf:auto; use --to gguf:auto")
    rec_name = AUTO if auto else gguf_recipes.recipe(subtype).name
    if options.calls_types is not None and not options.calls:
        raise ZoptError("--option calls_types= says how --option calls=FILE measures; give the calls file too")
    if options.sensitivity is not None and options.calls:
        raise ZoptError("--option sensitivity= says how a conversion without calls measures; --option calls=FILE "
                        "measures on those calls (--option calls_types= says how): give one of the two")
    if options.sensitivity is not None and not (auto or measured(rec_name, options)):
        raise ZoptError(f"--option sensitivity= is how gguf:auto and the re-tuned recipes measure; {rec_name} "
                        f"{'is written by its rules' if gguf_recipes.recipe(rec_name).measured else 'has one rule'}")
    if options.calls and not (auto or measured(rec_name, options)):
        raise ZoptError(f"--option calls= measures each tensor's sensitivity on the model's output, for gguf:auto "
                        f"and the re-tuned recipes (allocation=measured: "
                        f"{', '.join(r.name for r in gguf_recipes.RECIPES.values() if r.measured)}); "
                        f"{rec_name} {'is written by its rules' if gguf_recipes.recipe(rec_name).measured else 'has one rule'}")


def measured(rec_name: str, options: Options) -> bool:
    """Whether recipe ``rec_name`` is re-tuned by measurement under ``options`` (``Recipe.measured``
    and ``allocation=measured``)."""
    return rec_name != AUTO and gguf_recipes.recipe(rec_name).measured and \
        getattr(options, "allocation", "measured") == "measured"


def _measuring_view(src: TensorSource, view):
    """The original-layout view the measurement reads: around the source itself where ``src`` is
    one converter's share of a multi-target pass (so the pass's cache and pacing see only the
    writing reads), else ``view``."""
    direct = getattr(src, "direct", None)
    return zimage.as_original(direct) if direct is not None else view


def retune_plans(view, plans: list[TensorPlan], rec_name: str, imatrix=None, unit: bool = True,
                 progress: bool = False, probe=None) -> list[TensorPlan]:
    """Recipe ``rec_name``'s rule ``plans`` re-tuned by measurement (:func:`.auto.retune`)
    on the tensors of ``view`` (original layout, ``get(name)``), less the bytes of the recorded type
    map; the converter and the GPU bench's in-memory models both build their types here."""
    from .auto import retune

    reserve = len(AUTO_TYPES_KEY) + len(_types_json(plans)) + 16 + 64  # the map's key/value and padding
    if probe is not None:  # and the calls' keys: the file stays within the rule's size
        reserve += sum(len(k) + len(v.encode()) + 16 for k, v in probe.header().items())
    out, _ = retune(view, plans, gguf_recipes.recipe(rec_name).base, imatrix=imatrix, reserve=reserve, unit=unit,
                    progress=progress, probe=probe)
    return out


def read_imatrix(options: Options):
    """The options' importance matrix (:mod:`zopt.formats.imatrix`), or None."""
    path = getattr(options, "imatrix", None)
    if not path:
        return None
    from .. import imatrix

    return imatrix.read(path)


def importance_for(imatrix, plans: list[TensorPlan], unit: bool = False) -> dict[str, Any]:
    """Per quantized tensor, its columns' importance (a float32 torch tensor) where the imatrix has
    an entry, else (``unit``: ``search=weighted``) ones; ZoptError when the imatrix has no entry for
    any quantized tensor or a length does not match."""
    import torch

    out = {}
    entries = 0
    for p in plans:
        if p.qtype in FLOAT_TYPES:
            continue
        imp = imatrix.importance(p.name, p.shape[-1]) if imatrix is not None else None
        if imp is not None:
            out[p.name] = torch.from_numpy(imp)
            entries += 1
        elif unit:
            out[p.name] = torch.ones(p.shape[-1])
    if imatrix is not None and not entries:
        raise ZoptError("the imatrix has no entry for any quantized tensor of this model", imatrix.path)
    return out


def _chunks(t, qtype: str):
    """Row chunks of 2-D+ tensor ``t`` as (rows, qtype) jobs (1-D: one piece)."""
    rows = t.reshape(-1, t.shape[-1]) if t.dim() >= 2 else t.reshape(1, -1)
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    return [rows[i : i + step] for i in range(0, rows.shape[0], step)]


def _warm_up(qtypes: set[str]) -> float:
    """Compile the kernels of every quantized type in the plan before the workers start (compiling
    from two threads at once is not supported); returns seconds spent (small when inductor's disk
    cache has them)."""
    import time

    import torch

    t0 = time.perf_counter()
    # 8 rows of 1792 (7 K-blocks): no two sizes coincide, so dynamo does not tie them together
    x = torch.linspace(-1, 1, 8 * 1792).reshape(8, 1792)
    for q in sorted(qtypes - set(FLOAT_TYPES)):
        quantize_rows(x, q)
    return time.perf_counter() - t0


def _measured_plans(src, view, plans, meta, auto: bool, rec_name: str, config, sha_mark, options, imatrix,
                    unit: bool, progress: bool, probe):
    """``gguf:auto``'s plans, or a re-tuned recipe's, and the header that goes with them (the rule's
    plans and header where nothing is measured)."""
    if auto:
        from .auto import plan_auto

        plans, _ = plan_auto(_measuring_view(src, view), plans, target_bpw=options.target_bpw,
                             target_size=options.target_size, imatrix=imatrix, metadata_bytes=sum(len(k) + len(str(v)) + 16 for k, v in meta.items()),
                             unit=unit, progress=progress, probe=probe)
        meta = metadata_for(src, rec_name, config, plans, sha_mark, options, imatrix, probe=probe)
    elif measured(rec_name, options):
        retuned = retune_plans(_measuring_view(src, view), plans, rec_name, imatrix, unit, progress, probe)
        if [p.qtype for p in retuned] != [p.qtype for p in plans]:  # else the rule's file, no map to enlarge it
            plans = retuned
            meta = metadata_for(src, rec_name, config, plans, sha_mark, options, imatrix, types_map=True, probe=probe)
        elif probe is not None:  # the rule's file as it is: the calls chose nothing in it
            meta = metadata_for(src, rec_name, config, plans, sha_mark, options, imatrix)
    return plans, meta


def convert(src: TensorSource, out: Path, subtype: str | None, options: GGUFOptions, progress: bool, *,
            format: str = "gguf") -> Path:
    """Write ``src`` as a GGUF file at ``out`` with per-tensor types from recipe ``subtype``.

    Streams: the header is computed from shapes first; a reader thread loads the next tensor while
    row chunks of the current ones are quantized by ``workers`` threads (one torch thread each:
    coarse-grained parallelism stays efficient when other processes share the cores) and written in
    order; the source hash is computed in a background thread and patched into the header at the
    end. The output appears at ``out`` only when complete.

    ``options``: :class:`GGUFOptions` (``keep``/``quantize`` patterns, ``hash_source``, ``workers``,
    ``compile``: see ``ggml_compile``).
    """
    import torch

    from . import compile as ggml_compile

    check_target(subtype, options)
    auto = (subtype or "").strip().lower() == AUTO
    rec_name = AUTO if auto else gguf_recipes.recipe(subtype).name
    config = zimage.check_shapes(src)
    imatrix = read_imatrix(options)
    unit = options.search == "weighted"
    probe = None
    if options.calls:
        from .outputs import OutputProbe

        probe = OutputProbe.from_source(src, options.calls, options.calls_types or "one", progress)
    elif (options.sensitivity or SENSITIVITY[0]) == "gradient" and (auto or measured(rec_name, options)):
        from .outputs import OutputProbe

        probe = OutputProbe.from_source(src, None, "gradient", progress, optional=options.sensitivity is None)
        if probe is None:  # the default, where the model does not fit in memory: the weight errors alone
            print("zopt: the model does not fit in memory for its gradient gains: the types are chosen by the weight "
                  "errors alone (as --option sensitivity=weights)", file=sys.stderr, flush=True)
    # gguf:auto: every Linear weight not kept by --keep is a candidate (the family's sensitive ones
    # and small ones too: measurement decides whether their bits pay, within the family's floors,
    # auto.candidates); norms, biases and pad tokens stay as every recipe stores them
    view, plans = plan_for(src, rec_name, options) if not auto else plan_for(src, "Q4_K", dataclasses.replace(
        options, quantize=(*options.quantize, AUTO_CANDIDATES), min_elements=0))
    hash_source = options.hash_source
    sha_mark = "0" * 64 if hash_source else None
    meta = metadata_for(src, rec_name, config, plans, sha_mark, options, imatrix, probe=probe)
    threads = torch.get_num_threads()
    if options.workers:  # the measurement's model runs (the calls) take the same thread count
        torch.set_num_threads(max(1, options.workers))
    try:
        plans, meta = _measured_plans(src, view, plans, meta, auto, rec_name, config, sha_mark, options, imatrix, unit,
                                      progress, probe)
    finally:
        torch.set_num_threads(threads)
    importance = importance_for(imatrix, plans, unit)
    digest: dict[str, str] = {}
    hasher = None
    if hash_source:
        hasher = threading.Thread(target=lambda: digest.setdefault("sha", src.sha256()), daemon=True)
        hasher.start()
    entries = [(p.name, p.shape, p.qtype) for p in plans]
    total = sum(view.info(p.name).nbytes for p in plans)
    quantized = sum(math.prod(p.shape) for p in plans if p.qtype not in FLOAT_TYPES)
    want_compile = options.compile
    if want_compile == "auto":
        want_compile = quantized >= COMPILE_MIN_WEIGHTS
    workers = max(1, options.workers or min(torch.get_num_threads(), os.cpu_count() or 1))

    def fetch(name: str):
        # read ahead in a thread: reading the next tensor overlaps quantizing this one (sources
        # return fresh buffers; contiguous() only copies a strided view)
        return view.get(name).contiguous()

    def jobs(reader):
        """(plan index, future bytes of one row chunk), in file order; reads one tensor ahead."""
        nxt = reader.submit(fetch, plans[0].name) if plans else None
        for i, p in enumerate(plans):
            t = nxt.result()
            nxt = reader.submit(fetch, plans[i + 1].name) if i + 1 < len(plans) else None
            t = t.reshape(p.shape)
            if not t.is_floating_point():
                raise ZoptError(f"tensor {p.name} is not floating point ({t.dtype})", src.path)
            for rows in _chunks(t, p.qtype):
                yield i, pool.submit(_quantize_job, rows, p.qtype, importance.get(p.name))
            del t

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ggml_compile.compiled(bool(want_compile)), torch.inference_mode(), atomic_path(out) as tmp, \
                StreamingGGUFWriter(tmp, entries, meta) as w, \
                progress_bar(total, f"gguf:{rec_name}", unit="B", enabled=progress) as bar, \
                ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(workers) as pool:
            if ggml_compile.enabled():
                _warm_up({p.qtype for p in plans})
            window: deque = deque()
            feed = jobs(reader)
            ahead = 2 * workers + 1  # chunks in flight: keeps every worker busy across tensor boundaries

            def pieces(i: int):
                while True:
                    while len(window) < ahead:
                        job = next(feed, None)
                        if job is None:
                            break
                        window.append(job)
                    if not window or window[0][0] != i:
                        return
                    yield window.popleft()[1].result()

            for i, p in enumerate(plans):
                w.write(p.name, pieces(i))
                bar.describe(f"gguf:{rec_name} {i + 1}/{len(plans)} tensors")
                bar.advance(view.info(p.name).nbytes)
            if hasher is not None:
                hasher.join()
                w.patch_string("zopt.source.sha256", digest["sha"])
    finally:
        torch.set_num_threads(threads)
    return out


def _quantize_job(rows, qtype: str, importance=None):
    import torch

    with torch.inference_mode():
        return quantize_rows(rows, qtype, importance)


def list_types() -> list[tuple[str, float, str]]:
    """(subtype, effective bits per weight on the full-size layout, summary) for every recipe."""
    return [*gguf_recipes.list_types(),
            (AUTO, 0.0, "per-tensor types for --target-bpw / --target-size from measured sensitivity")]


def load(path: Path, device: str, backend: str, dtype: Any = None, **kw: Any):
    """Load a Z-Image GGUF as a ``ZImageTransformer2DModel`` running kernel ``backend`` (see gguf_loader)."""
    from .loader import load as _load

    return _load(path, device=device, backend=backend, dtype=dtype, **kw)



def _source_name(path) -> str:
    """A readable source name: ``owner/name@commit`` for a Hub snapshot (the command that reproduces
    the file names it), else a diffusers ``transformer/`` folder goes by its parent's name."""
    if not path:
        return ""
    from ...checkpoint import hub_id_of

    hub = hub_id_of(path)
    if hub:
        return hub
    p = Path(path)
    return p.parent.name if p.name == "transformer" and p.parent.name else p.name
