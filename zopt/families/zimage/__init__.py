"""Z-Image / Z-Image-Turbo: detection, key layouts, precision-sensitive tensors, configs.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...checkpoint import TensorInfo, TensorSource
from ...errors import ShapeMismatch, UnknownArchitecture

FAMILY = "zimage"
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
DIFFUSERS_CLASS = "ZImageTransformer2DModel"

# ---------------------------------------------------------------------------------------------
# configs

FULL_CONFIG: dict[str, Any] = {
    "_class_name": DIFFUSERS_CLASS,
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-05,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1024, 512, 512],
}
FULL_NUM_PARAMS = 6_154_908_736

# Tiny, with row lengths of 384, 1024 and 256: all multiples of 128, so 32/64/128-wide blocks
# and groups fit everywhere, while 256-wide K-quant blocks fit the FFN-down and adaLN rows and the
# 384-wide rows take the documented fallback types (as odd-sized tensors of real files do).
TINY_CONFIG: dict[str, Any] = {
    **FULL_CONFIG,
    "dim": 384,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 6,
    "n_kv_heads": 6,
    "cap_feat_dim": 256,
    "axes_dims": [16, 24, 24],
    "axes_lens": [1024, 512, 512],
}

# A mid-size config for measurements that need realistic matmul shapes without 12 GB.
MEDIUM_CONFIG: dict[str, Any] = {
    **FULL_CONFIG,
    "dim": 1536,
    "n_layers": 8,
    "n_refiner_layers": 1,
    "n_heads": 12,
    "n_kv_heads": 12,
    "cap_feat_dim": 1024,
}

CONFIGS = {"full": FULL_CONFIG, "tiny": TINY_CONFIG, "medium": MEDIUM_CONFIG}


def config_for(size: str) -> dict[str, Any]:
    """A copy of the named config: ``full``, ``medium`` or ``tiny``."""
    try:
        return dict(CONFIGS[size])
    except KeyError:
        raise UnknownArchitecture(f"unknown Z-Image size {size!r}; choose one of {', '.join(CONFIGS)}") from None


# ---------------------------------------------------------------------------------------------
# precision-sensitive tensors (diffusers names). Order matters: first match wins.


@dataclass(frozen=True)
class SensitiveRule:
    pattern: str
    keep: str  # "F32" or "BF16": the precision a converter must keep at the least
    reason: str


SENSITIVE: tuple[SensitiveRule, ...] = (
    SensitiveRule(r"^(x|cap|siglip)_pad_token$", "F32",
                  "learned pad embeddings substituted for padded tokens; a (1, dim) vector, tiny and read raw"),
    SensitiveRule(r"(^|\.)(norm_q|norm_k|attention_norm\d|ffn_norm\d)\.weight$", "F32",
                  "RMSNorm gains multiply every activation; small vectors where rounding shifts the whole stream"),
    SensitiveRule(r"\.bias$", "F32", "biases are added unscaled; 1-D and cheap to keep exact"),
    SensitiveRule(r"^t_embedder\.", "BF16",
                  "timestep MLP drives every adaLN modulation; errors here scale and gate all blocks"),
    SensitiveRule(r"^cap_embedder\.", "BF16",
                  "projects text features into the stream; its RMSNorm and linear see raw encoder outputs"),
    SensitiveRule(r"^siglip_embedder\.", "BF16", "image-feature projection of the Omni variant, as cap_embedder"),
    SensitiveRule(r"^all_x_embedder\.", "BF16",
                  "patch embedding of the noisy latent: tiny (64 inputs), errors reach every image token"),
    SensitiveRule(r"^all_final_layer\.", "BF16",
                  "projects back to latent space: its error lands directly in the predicted velocity"),
    SensitiveRule(r"\.adaLN_modulation\.\d+\.weight$", "BF16",
                  "produces per-block scale and tanh gates; quantizing it has been seen to wreck images"),
)

# Blocks that quantize worse than the body: the refiners see un-normalized inputs first and the
# first/last main blocks set up and read out the stream. Recipes may give these a higher type.
REFINER_PATTERN = r"^(noise_refiner|context_refiner|siglip_refiner)\."


def sensitive_reason(name: str) -> SensitiveRule | None:
    """The rule that makes ``name`` (either layout) precision-sensitive, or None."""
    dname = to_diffusers_name(name)
    for rule in SENSITIVE:
        if re.search(rule.pattern, dname):
            return rule
    return None


def block_index(name: str) -> tuple[str, int] | None:
    """('layers'|'noise_refiner'|..., index) for a block tensor name (either layout), else None."""
    m = re.match(r"^(layers|noise_refiner|context_refiner|siglip_refiner)\.(\d+)\.", strip_prefix(name))
    return (m.group(1), int(m.group(2))) if m else None


# ---------------------------------------------------------------------------------------------
# key names

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


@dataclass(frozen=True)
class Detection:
    family: str
    variant: str  # "z-image" (Turbo/Base share layout) or "z-image-omni"
    layout: str  # "diffusers" | "original"
    prefix: str  # key prefix found in the file ("" if none)


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


# ---------------------------------------------------------------------------------------------
# lazy layout views


class MappedSource(TensorSource):
    """A source whose tensors are renamed, split or fused from another source, lazily."""

    def __init__(self, base: TensorSource, plan: dict[str, tuple], layout: str):
        self.base = base
        self.plan = plan  # new name -> ("copy", src) | ("chunk", src, i, n) | ("cat", [srcs]) | ("row", src)
        self.layout = layout
        self.kind = base.kind
        self.path = base.path
        self.metadata = base.metadata
        self.config = getattr(base, "config", None)

    def names(self) -> list[str]:
        return list(self.plan)

    @property
    def files(self) -> list[Path]:
        return self.base.files

    def sources_of(self, name: str) -> list[str]:
        op = self.plan[name]
        return list(op[1]) if op[0] == "cat" else [op[1]]

    def info(self, name: str) -> TensorInfo:
        op = self.plan[name]
        if op[0] == "copy":
            i = self.base.info(op[1])
            return TensorInfo(name, i.shape, i.dtype, i.nbytes)
        if op[0] == "row":
            i = self.base.info(op[1])
            return TensorInfo(name, (1, *i.shape), i.dtype, i.nbytes)
        if op[0] == "chunk":
            i = self.base.info(op[1])
            n = op[3]
            return TensorInfo(name, (i.shape[0] // n, *i.shape[1:]), i.dtype, i.nbytes // n)
        infos = [self.base.info(s) for s in op[1]]
        rows = sum(i.shape[0] for i in infos)
        return TensorInfo(name, (rows, *infos[0].shape[1:]), infos[0].dtype, sum(i.nbytes for i in infos))

    def get(self, name: str):
        import torch

        op = self.plan[name]
        if op[0] == "copy":
            return self.base.get(op[1])
        if op[0] == "row":
            return self.base.get(op[1]).reshape(1, -1)
        if op[0] == "chunk":
            t = self.base.get(op[1])
            return t.chunk(op[3], dim=0)[op[2]]
        return torch.cat([self.base.get(s) for s in op[1]], dim=0)

    def close(self) -> None:
        self.base.close()


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
# config inference and checks


def axes_dims_for(head_dim: int) -> list[int]:
    """RoPE axis split for a head size: 1/4 time, 3/8 height, 3/8 width (128 -> 32, 48, 48)."""
    t = head_dim // 4
    h = (head_dim - t) // 2
    return [t, h, head_dim - t - h]


def infer_config(src: TensorSource) -> dict[str, Any]:
    """The diffusers config of a Z-Image source: its config.json if it has one, else from shapes."""
    cfg = getattr(src, "config", None)
    if cfg and cfg.get("_class_name", DIFFUSERS_CLASS) == DIFFUSERS_CLASS and "dim" in cfg:
        return dict(cfg)
    d = as_diffusers(src) if not isinstance(src, MappedSource) or src.layout != "diffusers" else src
    names = d.names()

    def shape(n: str) -> tuple[int, ...]:
        return d.info(n).shape

    dim = shape("cap_embedder.1.weight")[0]
    head_dim = shape("layers.0.attention.norm_q.weight")[0] if "layers.0.attention.norm_q.weight" in names else 128
    n_layers = 1 + max(int(n.split(".")[1]) for n in names if n.startswith("layers."))
    n_ref = 1 + max(int(n.split(".")[1]) for n in names if n.startswith("context_refiner."))
    x_in = shape("all_x_embedder.2-1.weight")[1]
    cfg = dict(FULL_CONFIG)
    cfg.update(
        dim=dim,
        n_layers=n_layers,
        n_refiner_layers=n_ref,
        n_heads=dim // head_dim,
        n_kv_heads=dim // head_dim,
        cap_feat_dim=shape("cap_embedder.1.weight")[1],
        in_channels=x_in // 4,
        axes_dims=axes_dims_for(head_dim),
        qk_norm="layers.0.attention.norm_q.weight" in names,
    )
    if any(n.startswith("siglip_embedder.") for n in names):
        cfg["siglip_feat_dim"] = shape("siglip_embedder.1.weight")[1]
    return cfg


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Diffusers tensor names and shapes for a config, computed without building a model.

    Mirrors ``ZImageTransformer2DModel.__init__`` (a test checks it against the real class).
    """
    dim = int(config["dim"])
    head = dim // int(config["n_heads"])
    hidden = int(dim / 3 * 8)
    adaln = min(dim, 256)
    out: dict[str, tuple[int, ...]] = {"x_pad_token": (1, dim), "cap_pad_token": (1, dim)}
    cin = int(config["in_channels"])
    for p, f in zip(config["all_patch_size"], config["all_f_patch_size"]):
        out[f"all_x_embedder.{p}-{f}.weight"] = (dim, f * p * p * cin)
        out[f"all_x_embedder.{p}-{f}.bias"] = (dim,)
        out[f"all_final_layer.{p}-{f}.linear.weight"] = (p * p * f * cin, dim)
        out[f"all_final_layer.{p}-{f}.linear.bias"] = (p * p * f * cin,)
        out[f"all_final_layer.{p}-{f}.adaLN_modulation.1.weight"] = (dim, adaln)
        out[f"all_final_layer.{p}-{f}.adaLN_modulation.1.bias"] = (dim,)

    def block(prefix: str, modulation: bool) -> None:
        if config.get("qk_norm", True):
            out[f"{prefix}.attention.norm_q.weight"] = (head,)
            out[f"{prefix}.attention.norm_k.weight"] = (head,)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            out[f"{prefix}.attention.{proj}.weight"] = (dim, dim)
        out[f"{prefix}.feed_forward.w1.weight"] = (hidden, dim)
        out[f"{prefix}.feed_forward.w2.weight"] = (dim, hidden)
        out[f"{prefix}.feed_forward.w3.weight"] = (hidden, dim)
        for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            out[f"{prefix}.{norm}.weight"] = (dim,)
        if modulation:
            out[f"{prefix}.adaLN_modulation.0.weight"] = (4 * dim, adaln)
            out[f"{prefix}.adaLN_modulation.0.bias"] = (4 * dim,)

    n_ref = int(config["n_refiner_layers"])
    for i in range(n_ref):
        block(f"noise_refiner.{i}", True)
    for i in range(n_ref):
        block(f"context_refiner.{i}", False)
    out["t_embedder.mlp.0.weight"] = (1024, 256)
    out["t_embedder.mlp.0.bias"] = (1024,)
    out["t_embedder.mlp.2.weight"] = (adaln, 1024)
    out["t_embedder.mlp.2.bias"] = (adaln,)
    cap = int(config["cap_feat_dim"])
    out["cap_embedder.0.weight"] = (cap,)
    out["cap_embedder.1.weight"] = (dim, cap)
    out["cap_embedder.1.bias"] = (dim,)
    sig = config.get("siglip_feat_dim")
    if sig:
        out["siglip_embedder.0.weight"] = (int(sig),)
        out["siglip_embedder.1.weight"] = (dim, int(sig))
        out["siglip_embedder.1.bias"] = (dim,)
        for i in range(n_ref):
            block(f"siglip_refiner.{i}", False)
        out["siglip_pad_token"] = (1, dim)
    for i in range(int(config["n_layers"])):
        block(f"layers.{i}", True)
    return out


def check_shapes(src: TensorSource, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Verify a source against its (inferred) config; raise ShapeMismatch naming the first bad tensor."""
    d = src if isinstance(src, MappedSource) and src.layout == "diffusers" else as_diffusers(src)
    config = config or infer_config(src)
    want = expected_shapes(config)
    have = {n: d.info(n).shape for n in d.names()}
    missing = sorted(set(want) - set(have))
    if missing:
        raise ShapeMismatch(f"missing tensor {missing[0]} (and {len(missing) - 1} more)" if len(missing) > 1
                            else f"missing tensor {missing[0]}", src.path)
    for n, s in want.items():
        if have[n] != s:
            raise ShapeMismatch(f"tensor {n} has shape {list(have[n])}, expected {list(s)}", src.path)
    extra = sorted(set(have) - set(want))
    if extra:
        raise ShapeMismatch(f"unexpected tensor {extra[0]}", src.path)
    return config
