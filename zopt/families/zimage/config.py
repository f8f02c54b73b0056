"""Z-Image configs: the named sizes, inference from a source's shapes, and the shape check."""

from __future__ import annotations

from typing import Any

from ...checkpoint import TensorSource
from ...errors import ShapeMismatch, UnknownArchitecture
from ..views import MappedSource
from .keys import as_diffusers

DIFFUSERS_CLASS = "ZImageTransformer2DModel"
PIPELINE_CLASS = "ZImagePipeline"

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
