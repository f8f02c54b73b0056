"""LoRA at run time: a low-rank branch beside each Linear layer, whatever stores its weight.

:func:`add_loras` wraps every targeted layer (``nn.Linear``, GGUF blocks, FP8, INT8, INT4, NF4
modules alike) in a :class:`LoraLinear` that calls the untouched layer and adds
``scale * alpha / rank * (x @ A.T) @ B.T``: the quantized weight is never dequantized for it, and
the memory added is the LoRA's own matrices. :func:`set_lora_scale` changes strengths in place;
:func:`remove_loras` puts the original layer objects back, so the model computes exactly
(bitwise) what it computed before.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ZoptError
from .files import LoraSpec
from .resolve import Lora, load

_LORA_CLASS: Any = None


def lora_linear_class():
    """The ``LoraLinear`` module class (created on first use: torch is imported lazily)."""
    global _LORA_CLASS
    if _LORA_CLASS is not None:
        return _LORA_CLASS
    import torch
    from torch import nn

    class LoraLinear(nn.Module):
        """A Linear layer (``base``, any storage) plus named low-rank branches."""

        def __init__(self, base: nn.Module):
            super().__init__()
            self.base = base
            self.in_features, self.out_features = base.in_features, base.out_features
            self.scales: dict[str, float] = {}  # branch key -> scale * alpha / rank

        @property
        def weight(self):
            return self.base.weight

        @property
        def bias(self):
            return getattr(self.base, "bias", None)

        def __getattr__(self, name: str):
            try:
                return super().__getattr__(name)
            except AttributeError:
                # what callers read off the layer (compute_dtype, qtype...) is the base layer's
                return getattr(super().__getattr__("base"), name)

        def add(self, key: str, down, up, mult: float) -> None:
            self.register_buffer(f"{key}_down", down, persistent=False)
            self.register_buffer(f"{key}_up", up, persistent=False)
            self.scales[key] = mult

        def drop(self, key: str) -> None:
            for s in ("_down", "_up"):
                self._buffers.pop(key + s, None)
            self.scales.pop(key, None)

        def forward(self, x):
            y = self.base(x)
            for key, mult in self.scales.items():
                if mult == 0.0:
                    continue
                down, up = self._buffers[key + "_down"], self._buffers[key + "_up"]
                h = torch.nn.functional.linear(x.to(down.dtype), down) * mult
                y = y + torch.nn.functional.linear(h, up).to(y.dtype)
            return y

        def extra_repr(self) -> str:
            return "loras=" + ", ".join(f"{k}x{m:g}" for k, m in self.scales.items())

    _LORA_CLASS = LoraLinear
    return LoraLinear


def linear_layers(model) -> dict[str, tuple[int, int]]:
    """Diffusers paths and (out, in) of the model's Linear-like layers (anything with integer
    ``in_features`` and ``out_features``: torch's Linear and every quantized Linear of zopt)."""
    cls = lora_linear_class()
    out = {}
    for name, m in model.named_modules():
        if name.endswith(".base") and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), cls):
            continue
        if isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int):
            out[name] = (m.out_features, m.in_features)
    return out


def _compute_dtype(layer, fallback):
    import torch

    base = getattr(layer, "base", layer)
    for attr in ("compute_dtype", "dtype"):
        dt = getattr(base, attr, None)
        if isinstance(dt, torch.dtype) and dt.is_floating_point:
            return dt
    w = getattr(base, "weight", None)
    if torch.is_tensor(w) and w.is_floating_point() and w.element_size() >= 2:
        return w.dtype
    return fallback


def _device(layer):
    import torch

    for t in list(layer.buffers()) + list(layer.parameters()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _key(name: str, taken: set[str]) -> str:
    key = "lora_" + re.sub(r"\W", "_", name.rsplit(".", 1)[0])[:40]
    cand, i = key, 2
    while cand in taken:
        cand, i = f"{key}_{i}", i + 1
    return cand


def add_loras(model, specs: list, *, allow_pickle: bool = False, dtype=None) -> list[str]:
    """Attach LoRAs (``FILE[:SCALE]`` strings, LoraSpecs or resolved Loras) to a loaded model as
    run-time branches; returns their names (the keys of :func:`set_lora_scale` / :func:`remove_loras`).
    Every file is read and checked against the model before any layer is touched. ``dtype``: the
    branches' dtype (default: each layer's compute dtype)."""
    import torch

    from ..families import for_model

    family = for_model(model)
    layers = linear_layers(model)
    loras = [s if isinstance(s, Lora) else load(LoraSpec.parse(s), family, layers, allow_pickle=allow_pickle)
             for s in specs]
    cls = lora_linear_class()
    attached: dict[str, dict[str, Any]] = getattr(model, "zopt_loras", None) or {}
    # layers that store no float weight (FP8, INT8, INT4, NF4) run in the model's float dtype
    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and p.element_size() >= 2),
                       torch.float32)
    names = []
    placed: dict[tuple, Any] = {}  # a down matrix q, k and v share (fused qkv) is held once

    def place(t, dt, dev):
        k = (id(t), dt, str(dev))
        if k not in placed:
            placed[k] = t.to(device=dev, dtype=dt)
        return placed[k]

    for lora in loras:
        key = _key(lora.name, set(attached))
        for path, branch in lora.branches.items():
            layer = model.get_submodule(path)
            if not isinstance(layer, cls):
                wrapped = cls(layer)
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, wrapped)
                layer = wrapped
            dt = dtype or _compute_dtype(layer, model_dtype)
            dev = _device(layer.base)
            layer.add(key, place(branch.down, dt, dev), place(branch.up, dt, dev), branch.factor * lora.scale)
        attached[key] = {**lora.record(), "factors": {p: b.factor for p, b in lora.branches.items()}}
        names.append(key)
    model.zopt_loras = attached
    return names


def _wrapped(model):
    cls = lora_linear_class()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def _check(model, names) -> list[str]:
    attached = getattr(model, "zopt_loras", None) or {}
    names = list(attached) if names is None else [names] if isinstance(names, str) else list(names)
    missing = [n for n in names if n not in attached]
    if missing:
        raise ZoptError(f"no run-time LoRA named {missing[0]!r} on this model; attached: "
                        f"{', '.join(attached) or 'none'}")
    return names


def set_lora_scale(model, scale: float, names: str | list[str] | None = None) -> None:
    """Set the strength of attached LoRAs ``names`` (default: all) to ``scale``, in place."""
    attached = model.zopt_loras if getattr(model, "zopt_loras", None) else {}
    for key in _check(model, names):
        factors = attached[key]["factors"]
        for path, layer in _wrapped(model):
            if key in layer.scales:
                layer.scales[key] = factors[path] * float(scale)
        attached[key]["scale"] = float(scale)


def remove_loras(model, names: str | list[str] | None = None) -> None:
    """Detach LoRAs ``names`` (default: all). A layer left with no branch is replaced by its
    original module object, so the model computes bit for bit what it did before."""
    attached = getattr(model, "zopt_loras", None) or {}
    keys = _check(model, names)
    for path, layer in _wrapped(model):
        for key in keys:
            layer.drop(key)
        if not layer.scales:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.base)
    for key in keys:
        attached.pop(key, None)
    model.zopt_loras = attached


def lora_info(model) -> dict[str, dict[str, Any]]:
    """The run-time LoRAs attached to ``model``: name -> file, sha256, scale, rank, modules."""
    return {k: {f: v for f, v in r.items() if f != "factors"} for k, r in (getattr(model, "zopt_loras", None) or {}).items()}
