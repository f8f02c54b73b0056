"""NF4: bitsandbytes' 4-bit NormalFloat, blocksize 64, optional double quantization of the scales.

The artifact stores each quantized Linear exactly as bitsandbytes serializes a ``Params4bit``
(so diffusers' bitsandbytes loader can read the folder; ``config.json`` carries the matching
``quantization_config``):

* ``<name>.weight`` — U8 ``(numel/2, 1)``, the flattened weight's codes, first code in the high nibble;
* ``<name>.weight.absmax`` — per block of 64: F32, or U8 codes of the 8-bit dynamic map with
  double quantization (``<name>.weight.nested_absmax`` F32 per 256 blocks,
  ``<name>.weight.nested_quant_map`` F32 (256,), offset = mean absmax in the quant state);
* ``<name>.weight.quant_map`` — F32 (16,), the NF4 code table;
* ``<name>.weight.quant_state.bitsandbytes__nf4`` — U8, the quant state as JSON (padded with spaces
  to a fixed length so the file header can be written before the data).

With ``--option rank=R`` (``nf4:r32``) each weight also keeps a rank-R BF16 branch and NF4 stores
the residual (:mod:`.lowrank`); such a folder has no ``quantization_config`` (diffusers' loader
would drop the branch), so only zopt loads it.

Kernels: ``bitsandbytes`` (CUDA, ``bnb.matmul_4bit``), ``torch-dequant`` (zopt's own NF4
dequantization, any device) and ``int-mm-cpu`` (dequantized once at load to per-row INT8 codes,
integer matmul with per-token INT8 activations).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...checkpoint import TensorSource
from ...errors import MissingDependency, ZoptError
from ..options import Options
from . import common as C
from .int8 import as_int8
from .lowrank import LISTED_RANKS, check_rank, overhead_bits, with_rank, with_subtype

BLOCK = 64
NESTED_BLOCK = 256
QS_KEY = "quant_state.bitsandbytes__nf4"
QS_BYTES = 256  # fixed JSON length (spaces pad it; JSON ignores trailing whitespace)


@dataclass(frozen=True)
class NF4Options(Options):
    double_quant: bool = True  # quantize the per-block absmax to 8 bits (bitsandbytes' double quantization)
    rank: int = 0  # rank of the BF16 low-rank branch beside each weight (0: none)

# bitsandbytes' NF4 table (quantiles of N(0, 1) normalized to [-1, 1], with an exact zero)
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def dynamic_map():
    """The signed 8-bit dynamic map bitsandbytes double quantization uses (256 sorted values).

    For exponents e = 0..6 it places ``2**e`` linearly spaced mantissas in (0.1, 1] scaled by
    ``10**(e-6)``, mirrored for negatives, plus 0 and 1.
    """
    import torch

    vals = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)).tolist()
        vals += mids + [-v for v in mids]
    return torch.tensor(sorted(vals), dtype=torch.float32)


def _nearest(x, table):
    """Index of the nearest table value for each element of ``x`` (table sorted ascending)."""
    import torch

    mids = (table[1:] + table[:-1]) / 2
    return torch.bucketize(x, mids, right=False)


def _blockwise_absmax(flat, block):
    import torch

    pad = (-flat.numel()) % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)
    return blocks, blocks.abs().amax(1)


def quant_state_json(shape, double_quant: bool, offset: float | None, dtype: str = "bfloat16") -> bytes:
    state: dict[str, Any] = {"quant_type": "nf4", "blocksize": BLOCK, "dtype": dtype, "shape": list(shape)}
    if double_quant:
        state.update(nested_blocksize=NESTED_BLOCK, nested_dtype="float32", nested_offset=offset)
    raw = json.dumps(state).encode()
    if len(raw) > QS_BYTES:
        raise ZoptError(f"NF4 quant state of shape {list(shape)} does not fit {QS_BYTES} bytes")
    return raw + b" " * (QS_BYTES - len(raw))


def quantize_nf4(w, double_quant: bool = True):
    """Weight -> [packed U8 (n/2, 1), absmax, quant_map, (nested_absmax, nested_quant_map,) state]."""
    import torch

    shape = tuple(w.shape)
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    blocks, absmax = _blockwise_absmax(w.float().reshape(-1), BLOCK)
    norm = blocks / absmax.clamp_min(1e-30)[:, None]
    idx = _nearest(norm, code).to(torch.uint8).reshape(-1)[: w.numel()]
    packed = ((idx[0::2] << 4) | idx[1::2]).reshape(-1, 1)
    if not double_quant:
        return [packed, absmax, code, _state_tensor(shape, False, None)]
    offset = absmax.mean()
    dmap = dynamic_map()
    nblocks, nabs = _blockwise_absmax(absmax - offset, NESTED_BLOCK)
    aidx = _nearest(nblocks / nabs.clamp_min(1e-30)[:, None], dmap).to(torch.uint8).reshape(-1)[: absmax.numel()]
    return [packed, aidx, code, nabs, dmap, _state_tensor(shape, True, float(offset))]


def _state_tensor(shape, double_quant, offset):
    import torch

    return torch.frombuffer(bytearray(quant_state_json(shape, double_quant, offset)), dtype=torch.uint8)


def read_state(t) -> dict[str, Any]:
    return json.loads(bytes(t.cpu().numpy()).decode("utf-8"))


def absmax_f32(absmax, state, nested_absmax=None, nested_map=None):
    """Per-block F32 scales, undoing double quantization when present."""
    import torch

    if absmax.dtype != torch.uint8:
        return absmax.float()
    nabs = nested_absmax.float().repeat_interleave(NESTED_BLOCK)[: absmax.numel()]
    return nested_map.float()[absmax.long()] * nabs + float(state["nested_offset"])


def dequantize_nf4(packed, absmax, quant_map, shape, dtype=None):
    """Packed codes + F32 block scales -> dense weight of ``shape`` in ``dtype`` (default F32)."""
    import torch

    codes = torch.stack((packed.reshape(-1) >> 4, packed.reshape(-1) & 0xF), -1).reshape(-1)
    n = 1
    for s in shape:
        n *= s
    vals = quant_map.float()[codes.long()]
    pad = (-vals.numel()) % BLOCK
    vals = torch.nn.functional.pad(vals, (0, pad)).reshape(-1, BLOCK) * absmax[:, None]
    return vals.reshape(-1)[:n].reshape(shape).to(dtype or torch.float32)


def _nf4_linear_class():
    import torch
    import torch.nn.functional as F

    Base = C.lowbit_linear_base()

    def dequant_kernel(m, x):
        scales = absmax_f32(m.absmax, m.state, getattr(m, "nested_absmax", None), getattr(m, "nested_quant_map", None))
        return F.linear(x, dequantize_nf4(m.weight, scales, m.quant_map, (m.out_features, m.in_features), x.dtype))

    def bnb_kernel(m, x):
        import bitsandbytes as bnb

        if m.bnb_state is None or m.bnb_state.absmax.device != x.device:
            m.bnb_state = m.make_bnb_state(x.device)
        return bnb.matmul_4bit(x, m.weight.t(), quant_state=m.bnb_state).to(x.dtype)

    class NF4Linear(Base):
        KERNELS = {"torch-dequant": dequant_kernel, "bitsandbytes": bnb_kernel}

        def __init__(self, parts: dict[str, Any], backend: str):
            state = read_state(parts[QS_KEY])
            out_f, in_f = state["shape"]
            super().__init__(in_f, out_f, backend)
            self.state = state
            for key in ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map"):
                if key in parts:
                    self.register_buffer(key, parts[key].contiguous())
            self.bnb_state = None
            if backend == "bitsandbytes":
                try:
                    import bitsandbytes  # noqa: F401
                except ImportError:
                    raise MissingDependency("bitsandbytes", "bnb", "the NF4 bitsandbytes backend") from None

        def make_bnb_state(self, device):
            from bitsandbytes.functional import QuantState

            qs = {k: getattr(self, k) for k in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
                  if hasattr(self, k)}
            qs[QS_KEY] = torch.frombuffer(bytearray(json.dumps(self.state).encode()), dtype=torch.uint8)
            return QuantState.from_dict(qs, device=device)

        def dequantize(self, dtype=None):
            scales = absmax_f32(self.absmax, self.state, getattr(self, "nested_absmax", None),
                                getattr(self, "nested_quant_map", None))
            return dequantize_nf4(self.weight, scales, self.quant_map, (self.out_features, self.in_features), dtype)

    return NF4Linear


_CLS = None


def nf4_linear(parts: dict[str, Any], backend: str = "torch-dequant"):
    """An NF4 Linear from its stored tensors keyed by suffix (``weight``, ``absmax``, ... , QS_KEY)."""
    global _CLS
    _CLS = _CLS or _nf4_linear_class()
    return _CLS(parts, backend)


class NF4Scheme(C.Scheme):
    format = "nf4"
    storage = "NF4"

    def __init__(self, double_quant: bool = True):
        self.double_quant = bool(double_quant)

    def describe(self) -> dict[str, Any]:
        return {"blocksize": BLOCK, "layout": "bitsandbytes Params4bit"}

    def unsupported(self, shape):
        return "odd number of elements" if (shape[0] * shape[1]) % 2 else None

    def parts(self, name, shape):
        n = shape[0] * shape[1]
        nb = -(-n // BLOCK)
        out = [(name, "U8", (n // 2, 1)), (f"{name}.absmax", "U8" if self.double_quant else "F32", (nb,)),
               (f"{name}.quant_map", "F32", (16,))]
        if self.double_quant:
            out += [(f"{name}.nested_absmax", "F32", (-(-nb // NESTED_BLOCK),)),
                    (f"{name}.nested_quant_map", "F32", (256,))]
        return out + [(f"{name}.{QS_KEY}", "U8", (QS_BYTES,))]

    def quantize(self, w):
        return quantize_nf4(w, self.double_quant)

    def module_int8(self, parts, shape):
        return as_int8(self.module(parts, shape, self.dequant_backend))

    def module(self, parts, shape, backend):
        wname = min(parts, key=len)
        return nf4_linear({k[len(wname) + 1 :] if k != wname else "weight": v for k, v in parts.items()}, backend)


def scheme_from_options(options: NF4Options) -> C.Scheme:
    return with_rank(NF4Scheme(options.double_quant), check_rank("nf4", options.rank))


def convert(src: TensorSource, out: Path, subtype: str | None, options: NF4Options, progress: bool, *,
            format: str = "nf4") -> Path:
    options = with_subtype(options, format, subtype, groups=False)
    scheme = scheme_from_options(options)
    if not options.rank:  # diffusers' loader knows no low-rank branch: only a plain NF4 folder says it is bnb
        # diffusers quantizes every Linear unless told to skip it: list the kept ones
        _, config, decisions = C.plan(src, scheme, options)
        linear = C.linear_weight_names(config)
        skip = sorted(n[: -len(".weight")] for n, d in decisions.items() if n in linear and not d.quantize)
        scheme.extra_config = lambda: {"quantization_config": {  # type: ignore[method-assign]
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": scheme.double_quant,
            "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": skip}}
    return C.convert_lowbit(src, out, scheme, f"r{options.rank}" if options.rank else None, options, progress)


def load(path: Path, device: str, backend: str, dtype: Any = None):
    return C.load_lowbit(path, lambda m: scheme_from_options(C.recorded_options(NF4Options, m)), device, backend,
                         dtype)


def list_types() -> list[tuple[str, float, str]]:
    """Subtypes: listed ranks of the low-rank branch (bits counted at dim 3840); plain ``nf4`` has none."""
    return [(f"r{r}", 4.127 + overhead_bits(r, 3840, 3840), f"NF4 + rank-{r} BF16 branch (bits at 3840 x 3840)")
            for r in LISTED_RANKS]
