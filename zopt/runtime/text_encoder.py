"""Where the text encoder runs: on the device, on the host CPU, or quantized on the fly.

``cpu``: the encoder stays in system RAM and computes in fp32; hooks bring its inputs to the CPU
and send the hidden states to the compute device in the pipeline's dtype, so the rest of the
pipeline cannot tell. ``int8`` / ``nf4``: every Linear is replaced by zopt's own quantized Linear,
built by the same schemes the ``int8`` and ``nf4`` formats convert with (embeddings and norms
stay as they are). ``device`` and ``free`` need nothing here: offloading moves the encoder like
any other component.
"""

from __future__ import annotations

from typing import Any

PLACEMENTS = ("device", "free", "cpu", "int8", "nf4")


def quantize(te, kind: str, backend: str = "torch-dequant") -> int:
    """Replace each ``torch.nn.Linear`` in ``te`` by an ``int8`` or ``nf4`` Linear; returns how many."""
    import torch

    from ..errors import ZoptError
    from ..formats.lowbit.int8 import Int8Scheme
    from ..formats.lowbit.nf4 import NF4Scheme

    if kind not in ("int8", "nf4"):
        raise ZoptError(f"cannot quantize the text encoder to {kind!r}; choose int8 or nf4")
    scheme = Int8Scheme() if kind == "int8" else NF4Scheme()
    done = 0
    for name, mod in list(te.named_modules()):
        if not isinstance(mod, torch.nn.Linear):
            continue
        shape = tuple(mod.weight.shape)
        if scheme.unsupported(shape):
            continue
        names = [p[0] for p in scheme.parts("weight", shape)]
        q = scheme.module(dict(zip(names, scheme.quantize(mod.weight.detach().float()), strict=True)), shape, backend)
        if mod.bias is not None:
            q.bias = torch.nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(te.get_submodule(parent) if parent else te, leaf, q)
        done += 1
    te.zopt_quantized = kind
    return done


def _to(value: Any, device, dtype=None):
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device, dtype) for v in value)
    return value


def keep_on_host(te, device: str, dtype) -> None:
    """Run ``te`` on the CPU in fp32; its outputs arrive on ``device`` in ``dtype``."""
    import torch

    te.to(device="cpu", dtype=torch.float32)

    def before(_mod, args, kwargs):
        return _to(args, "cpu"), {k: _to(v, "cpu") for k, v in kwargs.items()}

    def after(_mod, _args, out):
        for key in ("last_hidden_state", "hidden_states"):
            if getattr(out, key, None) is not None:
                setattr(out, key, _to(getattr(out, key), device, dtype))
        return out

    te.register_forward_pre_hook(before, with_kwargs=True)
    te.register_forward_hook(after)
    te.zopt_host = True


def placement_of(te) -> str:
    """What was done to ``te`` (for checking a prepared pipeline against its plan)."""
    if getattr(te, "zopt_host", False):
        return "cpu"
    return getattr(te, "zopt_quantized", None) or "device"
