"""Export skeletons: a family's graph module with value-free weights, ready to trace.

The family supplies the module ``torch.onnx.export`` traces (:meth:`Family.graph_module`; Z-Image's
is :mod:`zopt.families.zimage.graph`), its constant tables and example inputs. This module hollows
the weights and decides the storage dtype of each: half-precision variants store only the large
non-sensitive matmul weights in fp16/bf16 (the family's sensitive rules keep the rest in fp32).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...families import for_config


def graph_tables(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The constant tables (e.g. RoPE cos/sin) the graph of ``config``'s family holds."""
    return for_config(config).graph_tables(config)


def graph_inputs(config: dict[str, Any], batch: int = 2, height: int = 16, width: int = 12, text_len: int = 37,
                 seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded example inputs of the graph of ``config``'s family (latent height/width must be even)."""
    return for_config(config).graph_inputs(config, batch, height, width, text_len, seed)


def half_policy(name: str, half: torch.dtype | None, shape: tuple[int, ...], policy: Any = None) -> torch.dtype:
    """The dtype tensor ``name`` (diffusers name) of ``shape`` is stored in for an export with
    ``half``: ``half`` where ``policy`` (default: :class:`zopt.policy.Policy` without patterns)
    quantizes it, float32 where it keeps it."""
    from ...policy import Policy

    if half is not None and (policy or Policy()).decide(name, tuple(shape)).quantize:
        return half
    return torch.float32


def skeleton(config: dict[str, Any], half: torch.dtype | None = None, policy: Any = None) -> nn.Module:
    """A value-free graph module for tracing: every tensor is a zero-stride CPU view (no memory).

    Linear layers carry ``weight_t`` (in, out) in their storage dtype; the weights themselves are
    written later, one tensor at a time, by :func:`zopt.formats.onnx.export.export`.
    """
    family = for_config(config)
    model = family.empty_model(config)

    def hollow(shape, dtype):
        return torch.zeros((), dtype=dtype).expand(*shape)

    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            w = mod._parameters.pop("weight")
            dt = half_policy(f"{name}.weight", half, tuple(w.shape), policy)
            mod.register_parameter("weight_t", nn.Parameter(hollow((w.shape[1], w.shape[0]), dt), requires_grad=False))
    for name, p in list(model.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if p.device.type == "meta":
            mod._parameters[attr] = nn.Parameter(hollow(p.shape, torch.float32), requires_grad=False)
    tables = {k: hollow(v.shape, torch.float32) for k, v in family.graph_tables(config).items()}
    return family.graph_module(model, None, tables=tables).eval()
