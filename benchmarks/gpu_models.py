"""Z-Image transformers with seeded random weights made directly on a device, in each format zopt runs.

A 12 GB checkpoint cannot travel to a machine without network, so the GPU benchmark builds its
models where they run: every tensor is drawn from its own seeded generator on the device (the same
statistics as :func:`zopt.models.write_synthetic`), then kept or quantized by the format's own code:
the low-bit formats through their ``Scheme`` and keep/quantize ``Policy`` (what ``convert`` writes
and ``load`` rebuilds, minus the file), GGUF through its recipe, block quantizers and loader modules.
NF4 on CUDA is quantized by bitsandbytes on the device (zopt's quantizer builds its tables on the
CPU): the same layout and 4-bit codes as zopt's converter; of the double-quantized block scales,
bitsandbytes 0.50.2 rounded 2 of 1536 one code apart on the CPU here (ties in the 8-bit map).
ONNX needs the exported graph on disk: :func:`build_onnx` converts through files in a work folder.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from pathlib import Path
from typing import Any

import torch

# (format, backend) -> how a model of that kind is built; the keys are what the bench runs
PLAIN = ("bf16", "fp16")
LOWBIT = ("fp8", "int8", "int8_w8a8", "int4", "nf4")


def tensor(name: str, shape: tuple[int, ...], seed: int, device: str, dtype=torch.bfloat16) -> torch.Tensor:
    """The seeded random value of tensor ``name``: matrices normal(0, 1/sqrt(fan_in)), norm gains
    near 1, biases small; drawn on ``device`` from a generator keyed by (seed, name)."""
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF)
    t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    if len(shape) == 1 and ("norm" in name or name.endswith("cap_embedder.0.weight")):
        t.mul_(0.1).add_(1.0)
    elif len(shape) == 1:
        t.mul_(0.02)
    else:
        t.mul_(1.0 / shape[-1] ** 0.5)
    return t.to(dtype)


def _empty(config: dict[str, Any]):
    from zopt.formats.common import empty_model

    return empty_model(config)


def _linear_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def build_plain(config: dict[str, Any], seed: int, device: str, dtype=torch.bfloat16):
    """The unquantized model in ``dtype`` (bf16 is the reference every format is compared with)."""
    from zopt.formats.common import check_no_meta, set_tensor

    model = _empty(config)
    for name, p in list(model.named_parameters()):
        set_tensor(model, name, tensor(name, tuple(p.shape), seed, device).to(dtype))
    check_no_meta(model, "synthetic")
    return model.eval()


def _scheme(fmt: str):
    if fmt == "fp8":
        from zopt.formats.lowbit.fp8 import FP8Scheme

        return FP8Scheme("e4m3")
    if fmt in ("int8", "int8_w8a8"):
        from zopt.formats.lowbit.int8 import Int8Scheme

        return Int8Scheme(fmt)
    if fmt == "int4":
        from zopt.formats.lowbit.int4 import Int4Scheme

        return Int4Scheme()
    if fmt == "nf4":
        from zopt.formats.lowbit.nf4 import NF4Scheme

        return NF4Scheme(True)
    raise ValueError(f"not a low-bit format: {fmt}")


# zopt's NF4 quantizer runs on the CPU: fine for the medium model, minutes for the full one
CPU_NF4_MAX_WEIGHTS = 1_000_000_000


def _nf4_module(w: torch.Tensor, backend: str, cpu_fallback: bool = True):
    """An NF4 Linear for weight ``w``: bitsandbytes quantizes on CUDA, zopt's quantizer on the CPU
    (also on CUDA when bitsandbytes fails there and ``cpu_fallback`` allows it)."""
    from zopt.formats.lowbit.nf4 import QS_KEY, nf4_linear, quantize_nf4

    if w.device.type == "cuda":
        try:
            import bitsandbytes.functional as bnbf

            packed, state = bnbf.quantize_4bit(w.to(torch.bfloat16), blocksize=64, quant_type="nf4",
                                               compress_statistics=True, quant_storage=torch.uint8)
            parts = dict(state.as_dict(packed=True), weight=packed)
            return nf4_linear({k: v.to(w.device) for k, v in parts.items()}, backend)
        except Exception as e:  # no bitsandbytes, or no kernel for this CUDA: zopt's quantizer (slower)
            if not cpu_fallback:
                raise RuntimeError(f"bitsandbytes cannot quantize NF4 on this GPU ({type(e).__name__}: {e}); "
                                   "quantizing this model on the CPU would outlast the part") from None
            _note_once(f"NF4 quantized on the CPU: bitsandbytes failed ({type(e).__name__}: {e})")
    vals = quantize_nf4(w.float().cpu(), True)
    keys = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", QS_KEY)
    return nf4_linear({k: v.to(w.device) for k, v in zip(keys, vals, strict=True)}, backend)


_NOTES: list[str] = []


def _note_once(text: str) -> None:
    if text not in _NOTES:
        _NOTES.append(text)
        print(f"gpu_models: {text}", flush=True)


def build_lowbit(config: dict[str, Any], fmt: str, backend: str, seed: int, device: str, dtype=torch.bfloat16):
    """``fmt`` (fp8/int8/int8_w8a8/int4/nf4) under kernel ``backend``: the converter's per-tensor
    decisions, each quantized Linear built by the format's Scheme, kept tensors in ``dtype``."""
    from zopt.formats.common import check_no_meta, replace_module, set_tensor
    from zopt.formats.lowbit import common as C

    scheme = _scheme(fmt)
    model = _empty(config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    from zopt.policy import Policy

    policy = Policy(unsupported=scheme.unsupported)
    kept = []
    small = sum(s[0] * s[1] for n, s in shapes.items() if len(s) == 2) <= CPU_NF4_MAX_WEIGHTS
    for name, shape in shapes.items():
        dec = C.decide(policy, name, shape, "BF16")
        if not dec.quantize:
            kept.append(name)
            continue
        w = tensor(name, shape, seed, device)
        if fmt == "nf4":
            mod = _nf4_module(w, backend, cpu_fallback=small)
        else:
            stored = [p[0] for p in scheme.parts(name, shape)]
            values = scheme.quantize(w.float())
            mod = scheme.module(dict(zip(stored, values, strict=True)), shape, backend)
        del w
        replace_module(model, name.rsplit(".", 1)[0], mod.to(device))
    for name in kept:
        set_tensor(model, name, tensor(name, shapes[name], seed, device).to(dtype))
    check_no_meta(model, "synthetic")
    model.zopt_backend = backend
    return model.eval()


class _SeededOriginal:
    """The seeded model's tensors by their original-layout (GGUF file) names: ``get`` as a source view."""

    def __init__(self, config: dict[str, Any], seed: int, device: str):
        from zopt.families import zimage

        self.shapes = zimage.expected_shapes(config)
        self.seed, self.device = seed, device

    def get(self, name: str) -> torch.Tensor:
        from zopt.families import zimage

        if name.endswith(".attention.qkv.weight"):
            stem = zimage.to_diffusers_name(name)[: -len("qkv.weight")]
            return torch.cat([self.get_diffusers(f"{stem}{part}.weight") for part in ("to_q", "to_k", "to_v")])
        return self.get_diffusers(zimage.to_diffusers_name(name))

    def get_diffusers(self, name: str) -> torch.Tensor:
        return tensor(name, self.shapes[name], self.seed, self.device)


_GAINS: dict = {}  # (config, seed, device) -> the gradient probe: one pass per seeded model and device


def _gradient_probe(config: dict[str, Any], seed: int, device: str):
    """The gradient gains ``zopt convert`` weighs its measurement by (``sensitivity=gradient``), from
    the seeded model on ``device`` (float32 where it fits in half the device's free memory, else
    bfloat16; None where neither fits, as convert then measures the weight errors alone)."""
    import json
    import math

    from zopt.families import zimage
    from zopt.formats.gguf.outputs import OutputProbe, random_calls
    from zopt.platform.hardware import whole_model_dtype

    key = (json.dumps(config, sort_keys=True, default=str), seed, device)
    if key not in _GAINS:
        params = sum(math.prod(s) for s in zimage.expected_shapes(config).values())
        dtype = whole_model_dtype(params, device)[0]
        probe = None
        if dtype is not None:
            model = build_plain(config, seed, device, dtype)
            try:
                probe = OutputProbe(model, random_calls(config), "gradient")
            finally:
                del model
                if str(device).startswith("cuda"):
                    torch.cuda.empty_cache()
        _GAINS[key] = probe
    return _GAINS[key]


def gguf_types(config: dict[str, Any], subtype: str, seed: int | None = None, device: str = "cpu") -> dict[str, str]:
    """Diffusers Linear weight name -> GGML type that GGUF recipe ``subtype`` gives it (q/k/v share
    the fused ``qkv`` tensor's type, as in the file). A measured recipe (Q4_K_M, Q4_0, ...) is re-tuned by
    measurement as ``zopt convert`` does (with the gradient gains), on the seeded weights of ``seed``
    drawn on ``device`` (on a GPU other values than on the CPU, and near-ties may resolve differently)."""
    from zopt.families import zimage
    from zopt.formats.gguf import recipes, retune_plans
    from zopt.models import synthetic_layout

    rec = recipes.recipe(subtype)
    rule = recipes.plan(dict(synthetic_layout(config)), subtype)
    if seed is not None and rec.measured:  # as a default conversion: allocation=measured, gradient gains
        rule = retune_plans(_SeededOriginal(config, seed, device), rule, rec.name, probe=_gradient_probe(config, seed, device))
    plans = {p.name: p.qtype for p in rule}
    out = {}
    for name in zimage.expected_shapes(config):
        for part in ("to_q", "to_k", "to_v"):
            if name.endswith(f".attention.{part}.weight"):
                out[name] = plans[zimage.to_original_name(name[: -len(f"{part}.weight")]) + "qkv.weight"]
                break
        else:
            out[name] = plans[zimage.to_original_name(name)]
    return out


@contextlib.contextmanager
def _gpu_sized_chunks(device: str):
    """The GGML quantizers work through a weight in CPU-cache-sized passes; on a GPU, passes of
    16M weights keep the ~250 kernel launches per pass from dominating (blocks are independent,
    so the bytes are the same)."""
    from zopt.formats.gguf import quants

    if not device.startswith("cuda"):
        yield
        return
    saved = {t: t.__dict__.get("chunk_weights") for t in quants.TYPES.values()}
    try:
        for t in saved:
            t.chunk_weights = max(t.chunk_weights, 1 << 24)
        yield
    finally:
        for t, v in saved.items():
            if v is None:
                del t.chunk_weights
            else:
                t.chunk_weights = v


def build_gguf(config: dict[str, Any], subtype: str, backend: str, seed: int, device: str, dtype=torch.bfloat16):
    """GGUF ``subtype`` (Q8_0, Q4_K_M, ...): the recipe's types, zopt's GGML block quantizers on the
    device, and the loader's :class:`GGUFLinear` (dequantize on the fly, small layers cached)."""
    from zopt.formats.common import check_no_meta, replace_module, set_tensor
    from zopt.formats.gguf import quantize_rows
    from zopt.formats.gguf.loader import CACHE_SMALL_NUMEL, GGUFLinear, pack
    from zopt.formats.gguf.recipes import FLOAT_TYPES

    if backend != "torch-dequant":
        raise ValueError(f"the GPU bench builds GGUF for torch-dequant only, not {backend}")
    types = gguf_types(config, subtype, seed, device)
    model = _empty(config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    linears = _linear_names(model)
    done: set[str] = set()
    with _gpu_sized_chunks(device), torch.no_grad():
        for name, shape in shapes.items():
            mod_name = name.rsplit(".", 1)[0]
            qtype = types.get(name, "BF16")
            if mod_name not in linears or not name.endswith(".weight") or qtype in FLOAT_TYPES:
                continue
            w = tensor(name, shape, seed, device)
            raw = quantize_rows(w, qtype, torch.ones(shape[-1], device=w.device))  # search=weighted, as convert
            raw = torch.as_tensor(raw).to(device).reshape(shape[0], -1)
            del w
            bias_name = mod_name + ".bias"
            bias = tensor(bias_name, shapes[bias_name], seed, device) if bias_name in shapes else None
            done.add(bias_name)
            small = shape[0] * shape[1] <= CACHE_SMALL_NUMEL
            replace_module(model, mod_name, GGUFLinear(pack(raw, qtype, *shape), qtype, shape[0], shape[1], bias,
                                                       dtype, small))
            done.add(name)
    for name, shape in shapes.items():
        if name not in done:
            set_tensor(model, name, tensor(name, shape, seed, device).to(dtype))
    check_no_meta(model, "synthetic")
    model.zopt_backend = backend
    return model.eval()


def build_onnx(config: dict[str, Any], backend: str, seed: int, device: str, work: str | os.PathLike,
               subtype: str = "fp32"):
    """The ONNX export of the seeded model, run by onnxruntime with ``backend`` (ort-cuda, ort-cpu).

    Goes through files, as users do: the bf16 model saved as a diffusers folder, ``convert`` to
    ``onnx:<subtype>``, ``load``. Returns the runtime module (inputs and outputs float32).
    """
    from zopt import formats

    work = Path(work)
    src = work / "src"
    build_plain(config, seed, "cpu").save_pretrained(src, safe_serialization=True)
    out = formats.convert(src, f"onnx:{subtype}", work / "onnx", options={"hash_source": False}, progress=False,
                          force=True)  # a scratch folder, rebuilt on every call
    return formats.load(out, device=device, backend=backend)


def build(config: dict[str, Any], fmt: str, backend: str, seed: int, device: str, work: str | os.PathLike | None = None,
          dtype=torch.bfloat16):
    """Any format the bench knows: ``bf16``/``fp16``, a low-bit format, ``gguf:SUBTYPE`` or ``onnx``;
    ``dtype`` is the compute dtype (the bf16 format's own on CUDA; float32 is zopt's CPU default)."""
    if fmt in PLAIN:
        return build_plain(config, seed, device, torch.float16 if fmt == "fp16" else dtype)
    if fmt in LOWBIT:
        return build_lowbit(config, fmt, backend, seed, device, dtype)
    if fmt.startswith("gguf:"):
        return build_gguf(config, fmt.split(":", 1)[1], backend, seed, device, dtype)
    if fmt == "onnx":
        if work is None:
            raise ValueError("building an ONNX model needs a work folder")
        return build_onnx(config, backend, seed, device, work)
    raise ValueError(f"unknown format {fmt!r}")


def inputs(config: dict[str, Any], height: int, width: int, text_tokens: int, device: str, dtype, seed: int = 7):
    """One transformer call's inputs for an image of ``height`` x ``width`` pixels (latents are 1/8
    of that) and a caption of ``text_tokens``: (latents list, timestep, captions list)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(config["in_channels"], 1, height // 8, width // 8, generator=g)
    cap = torch.randn(text_tokens, config["cap_feat_dim"], generator=g)
    t = torch.tensor([0.5])
    return [x.to(device, dtype)], t.to(device), [cap.to(device, dtype)]


def forward(model, args) -> torch.Tensor:
    """The transformer's prediction for ``args`` (from :func:`inputs`) as one tensor."""
    x, t, cap = args
    with torch.no_grad():
        return model(x, t, cap, return_dict=False)[0][0]


def model_bytes(model) -> int:
    """Bytes of the module's parameters and buffers (what it holds resident)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
