"""FP8 weights: the quantizer and the Linear module, shared by both fp8 layouts (:mod:`.fp8`,
:mod:`.fp8_comfy`)."""

from __future__ import annotations

from . import common as C

VARIANTS = {"e4m3": ("float8_e4m3fn", "F8_E4M3", 448.0), "e5m2": ("float8_e5m2", "F8_E5M2", 57344.0)}


def quantize_fp8(w, var: str = "e4m3", per_channel: bool = True):
    """Float weight ``(out, in)`` -> (FP8 tensor, F32 scales ``(out,)`` or scalar) with ``w ~= q * s``."""
    import torch

    tname, _, fmax = VARIANTS[var]
    w = w.float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
    scale = (amax / fmax).clamp_min(1e-12)
    s = scale[:, None] if per_channel else scale
    q = (w / s).clamp(-fmax, fmax).to(getattr(torch, tname))
    return q, scale.float()


def _fp8_linear_class():
    import torch
    import torch.nn.functional as F

    Base = C.lowbit_linear_base()

    def storage_kernel(m, x):
        # FP8 values are exact in bf16/fp16/fp32: upcast, matmul, then scale the output columns
        # (fp16 could overflow on unscaled sums, so it scales the weight first)
        w = m.weight.view(m.fp8_dtype).to(x.dtype)
        if x.dtype == torch.float16:
            return F.linear(x, w * m.weight_scale.to(x.dtype)[:, None])
        return F.linear(x, w) * m.weight_scale.to(x.dtype)

    def scaled_mm_kernel(m, x):
        if not m.mm_ok:
            return storage_kernel(m, x)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
        fnuz = needs_fnuz(x.device)
        if fnuz and m.weight_fnuz is None:  # once per layer, on the device
            m.weight_fnuz = to_fnuz(m.weight.view(m.fp8_dtype))
        fmax, qtype = (240.0, torch.float8_e4m3fnuz) if fnuz else (448.0, torch.float8_e4m3fn)
        sx = (x.abs().amax().float() / fmax).clamp_min(1e-12)
        xq = (x.float() / sx).clamp(-fmax, fmax).to(qtype)
        w = m.weight_fnuz if fnuz else m.weight.view(m.fp8_dtype)
        # an e4m3fn weight halved is exactly its e4m3fnuz code: scale it back by 2
        one = torch.full((), 2.0 if fnuz else 1.0, device=x.device, dtype=torch.float32)
        y = torch._scaled_mm(xq, w.t(), scale_a=sx, scale_b=one, out_dtype=out_dtype)
        y = y[0] if isinstance(y, tuple) else y
        return y * m.weight_scale.to(y.dtype)  # per-output-channel weight scales act on columns

    class FP8Linear(Base):
        """FP8 weight (held as uint8 so ``model.to(dtype)`` cannot upcast it) + per-row F32 scales."""

        KERNELS = {"fp8-storage": storage_kernel, "scaled-mm": scaled_mm_kernel}

        def __init__(self, q, scale, backend: str):
            super().__init__(q.shape[1], q.shape[0], backend)
            self.fp8_dtype = q.dtype
            self.register_buffer("weight", q.contiguous().view(torch.uint8))
            self.register_buffer("weight_scale", scale.float().reshape(-1).expand(q.shape[0]).contiguous())
            # torch._scaled_mm needs both matrix dims divisible by 16
            self.mm_ok = q.shape[0] % 16 == 0 and q.shape[1] % 16 == 0
            self.weight_fnuz = None  # the weight as e4m3fnuz, made on first use on an MI300-class GPU

        def dequantize(self, dtype=None):
            import torch as _t

            return (self.weight.view(self.fp8_dtype).float() * self.weight_scale[:, None]).to(dtype or _t.float32)

    return FP8Linear


_CLS = None


def to_fnuz(w):
    """E4M3FN weight -> the E4M3FNUZ tensor of half its values (exact: every E4M3FN value halved is
    an E4M3FNUZ value); MI300-class GPUs (gfx94x) multiply only the FNUZ variant."""
    import torch

    return (w.float() / 2).to(torch.float8_e4m3fnuz)


def needs_fnuz(device) -> bool:
    """Whether ``device`` is a ROCm GPU of the gfx94x generation (FP8 matmul in E4M3FNUZ)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not getattr(torch.version, "hip", None):
        return False
    return "gfx94" in getattr(torch.cuda.get_device_properties(device), "gcnArchName", "")


def densify(model, dtype):
    """Replace every FP8 Linear in ``model`` by a plain ``torch.nn.Linear`` holding its weight in
    ``dtype`` (devices without float8 tensors, e.g. Apple MPS). Returns ``model``."""
    import torch

    global _CLS
    _CLS = _CLS or _fp8_linear_class()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, _CLS):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=dtype,
                                  device="meta")
            lin.weight = torch.nn.Parameter(mod.dequantize(dtype), requires_grad=False)
            if mod.bias is not None:
                lin.bias = torch.nn.Parameter(mod.bias.detach().to(dtype), requires_grad=False)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, lin)
    return model


def fp8_linear(q, scale, backend: str = "fp8-storage"):
    """An FP8 Linear module from stored weight ``q`` and scales (per row, or one scalar)."""
    global _CLS
    _CLS = _CLS or _fp8_linear_class()
    return _CLS(q, scale, backend)
