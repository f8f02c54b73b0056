"""Z-Image key layouts: detection, name maps both ways, and lazy views in either layout.

Two key layouts exist for the same weights:

* **diffusers** (``ZImageTransformer2DModel``): ``all_x_embedder.2-1.*``, ``all_final_layer.2-1.*``,
  separate ``attention.to_q/to_k/to_v``, ``attention.to_out.0``, ``attention.norm_q/norm_k``.
* **original** (Tongyi-MAI's release, ComfyUI, stable-diffusion.cpp): ``x_embedder.*``,
  ``final_layer.*``, fused ``attention.qkv.weight`` (q, k, v stacked on dim 0), ``attention.out``,
  ``attention.q_norm/k_norm``; often prefixed ``model.diffusion_model.``.

Turbo and Base share one layout and identical shapes: no tensor name or shape tells them apart, so
the variant is reported as ``z-image`` unless file metadata names it. The Omni variant adds
``siglip_embedder``/``siglip_refiner``/``siglip_pad_token``.
"""

from __future__ import annotations

import re

from ...checkpoint import TensorSource
from ...errors import ShapeMismatch, UnknownArchitecture
from ..base import Detection
from ..views import MappedSource

FAMILY = "zimage"
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")

_ORIG_TO_DIFF = (
    ("x_embedder.", "all_x_embedder.2-1."),
    ("final_layer.", "all_final_layer.2-1."),
    (".attention.out.", ".attention.to_out.0."),
    (".attention.q_norm.", ".attention.norm_q."),
    (".attention.k_norm.", ".attention.norm_k."),
)


def strip_prefix(name: str) -> str:
    for p in ORIGINAL_PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


def to_diffusers_name(name: str) -> str:
    """Original-layout name -> diffusers name (qkv stays qkv; see :func:`as_diffusers`)."""
    n = strip_prefix(name)
    for old, new in _ORIG_TO_DIFF:
        if n.startswith(old) and not old.startswith("."):
            n = new + n[len(old) :]
        elif old.startswith(".") and old in n:
            n = n.replace(old, new)
    return n


def to_original_name(name: str) -> str:
    """Diffusers name -> original-layout name (to_q/k/v stay separate; see :func:`as_original`)."""
    n = name
    for old, new in _ORIG_TO_DIFF:
        if not new.startswith(".") and n.startswith(new):
            n = old + n[len(new) :]
        elif new.startswith(".") and new in n:
            n = n.replace(new, old)
    return n



def block_index(name: str) -> tuple[str, int] | None:
    """('layers'|'noise_refiner'|..., index) for a block tensor name (either layout), else None."""
    m = re.match(r"^(layers|noise_refiner|context_refiner|siglip_refiner)\.(\d+)\.", strip_prefix(name))
    return (m.group(1), int(m.group(2))) if m else None



def detect(names: list[str] | TensorSource, metadata: dict[str, str] | None = None) -> Detection:
    """Recognize a Z-Image transformer from its tensor names; raise UnknownArchitecture otherwise."""
    path = None
    if isinstance(names, TensorSource):
        path, metadata, names = names.path, names.metadata, names.names()
    names = list(names)
    prefix = ""
    for p in ORIGINAL_PREFIXES:
        if names and sum(n.startswith(p) for n in names) > len(names) // 2:
            prefix = p
            break
    stripped = {n[len(prefix) :] if n.startswith(prefix) else n for n in names}
    has_main = any(re.match(r"^layers\.\d+\.adaLN_modulation\.0\.weight$", n) for n in stripped)
    has_refiners = any(n.startswith("context_refiner.") for n in stripped)
    if not (has_main and has_refiners and ("cap_embedder.1.weight" in stripped)):
        raise UnknownArchitecture(
            "not a Z-Image transformer (no layers.N.adaLN_modulation / context_refiner / cap_embedder tensors)",
            path,
        )
    if "all_x_embedder.2-1.weight" in stripped or any(".attention.to_q." in n for n in stripped):
        layout = "diffusers"
    elif "x_embedder.weight" in stripped or any(".attention.qkv." in n for n in stripped):
        layout = "original"
    else:
        raise UnknownArchitecture("Z-Image-like tensors but neither diffusers nor original layout", path)
    variant = "z-image-omni" if any(n.startswith("siglip_") for n in stripped) else "z-image"
    meta_variant = _variant_from_metadata(metadata or {})
    return Detection(FAMILY, meta_variant or variant, layout, prefix)


def _variant_from_metadata(md: dict[str, str]) -> str | None:
    text = " ".join(f"{k}={v}" for k, v in md.items() if "name" in k.lower() or "base_model" in k.lower()).lower()
    if "turbo" in text:
        return "z-image-turbo"
    if "z-image" in text or "z_image" in text:
        return "z-image-base" if "base" in text else None
    return None


def as_diffusers(src: TensorSource) -> TensorSource:
    """View any Z-Image source with diffusers names and shapes (qkv split, pad tokens 2-D).

    ``norm_final.weight`` of some original files is dropped: diffusers' final LayerNorm has no
    affine parameters.
    """
    det = detect(src)
    plan: dict[str, tuple] = {}
    for n in src.names():
        s = strip_prefix(n) if det.prefix else n
        if det.layout == "original":
            if s == "norm_final.weight":
                continue
            if s.endswith(".attention.qkv.weight"):
                base = to_diffusers_name(s).replace(".attention.qkv.weight", ".attention.")
                for i, part in enumerate(("to_q", "to_k", "to_v")):
                    plan[f"{base}{part}.weight"] = ("chunk", n, i, 3)
                continue
            s = to_diffusers_name(s)
        if s.endswith("_pad_token") and len(src.info(n).shape) == 1:
            plan[s] = ("row", n)  # stable-diffusion.cpp writes pad tokens 1-D
        else:
            plan[s] = ("copy", n)
    return MappedSource(src, plan, "diffusers")


def as_original(src: TensorSource, prefix: str = "") -> TensorSource:
    """View any Z-Image source with original-layout names (fused qkv), optionally prefixed."""
    det = detect(src)
    if det.layout == "original" and det.prefix == prefix:
        return MappedSource(src, {n: ("copy", n) for n in src.names()}, "original")
    dsrc = as_diffusers(src) if det.layout == "original" or det.prefix else src
    plan: dict[str, tuple] = {}
    names = dsrc.names()
    nameset = set(names)
    for n in names:
        if ".attention.to_k.weight" in n or ".attention.to_v.weight" in n:
            continue
        if ".attention.to_q.weight" in n:
            base = n[: -len("to_q.weight")]
            parts = [f"{base}{p}.weight" for p in ("to_q", "to_k", "to_v")]
            if not all(p in nameset for p in parts):
                raise ShapeMismatch(f"{base} lacks one of to_q/to_k/to_v", src.path)
            target = prefix + to_original_name(base) + "qkv.weight"
            plan[target] = ("cat", parts)
            continue
        plan[prefix + to_original_name(n)] = ("copy", n)
    return MappedSource(dsrc, plan, "original")


# ---------------------------------------------------------------------------------------------
# LoRA key names

# prefixes published Z-Image LoRAs put before a module path: diffusers/PEFT (``transformer.``,
# ``base_model.model.``), ComfyUI / musubi / ai-toolkit (``diffusion_model.``), full checkpoints
LORA_PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.")
_FUSED_QKV = ".attention.qkv"


def lora_aliases(modules: list[str]) -> dict[str, tuple[str, ...]]:
    """Every module path a LoRA may name -> the diffusers Linear modules it updates, in row order.

    ``modules`` are the diffusers paths of the model's Linear layers (``layers.0.attention.to_q``).
    Each goes by its diffusers path, its original-layout path (``attention.out``, ``x_embedder``...)
    and the kohya spelling of both (dots as underscores: ``layers_0_attention_to_q``). The original
    layout's fused ``attention.qkv`` stands for to_q, to_k, to_v stacked on the output dimension.
    """
    out: dict[str, tuple[str, ...]] = {}
    mods = set(modules)
    for m in modules:
        orig = to_original_name(m + ".weight")[: -len(".weight")]
        for alias in (m, orig):
            out[alias] = (m,)
        if m.endswith(".attention.to_q"):
            base = m[: -len(".to_q")]
            parts = tuple(f"{base}.{p}" for p in ("to_q", "to_k", "to_v"))
            if all(p in mods for p in parts):
                out[to_original_name(base + ".x")[: -len(".x")] + ".qkv"] = parts
    for alias, parts in list(out.items()):
        out.setdefault(alias.replace(".", "_"), parts)
    return out
