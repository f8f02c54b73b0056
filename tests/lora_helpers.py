"""Small seeded LoRA files for the tiny model in every layout zopt reads, and the merged weights
they imply, computed here with plain torch (independently of zopt.lora)."""

from __future__ import annotations

from pathlib import Path

# layout -> (key prefix, module naming, A/B suffixes, with alpha)
#   naming: "diffusers" (to_q/to_k/to_v/to_out.0), "original" (fused qkv, attention.out,
#   x_embedder...), and the kohya spellings of each (dots as underscores)
LAYOUTS = {
    "diffusers": ("transformer.", "diffusers", ("lora_A.weight", "lora_B.weight"), False),
    "peft": ("base_model.model.", "diffusers", ("lora_A.default.weight", "lora_B.default.weight"), False),
    "peft-alpha": ("diffusion_model.", "diffusers", ("lora_A.weight", "lora_B.weight"), True),
    "comfy-qkv": ("diffusion_model.", "original", ("lora_A.weight", "lora_B.weight"), True),
    "kohya": ("lora_unet_", "kohya-diffusers", ("lora_down.weight", "lora_up.weight"), True),
    "kohya-qkv": ("lora_unet_", "kohya-original", ("lora_down.weight", "lora_up.weight"), True),
}


def tiny_modules() -> dict[str, tuple[int, int]]:
    """Diffusers paths -> (out, in) of the tiny model's Linear layers."""
    from zopt.families.zimage import config

    shapes = config.expected_shapes(config.config_for("tiny"))
    return {n[: -len(".weight")]: tuple(s) for n, s in shapes.items() if n.endswith(".weight") and len(s) == 2}


def random_lora(modules: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0, alpha: float | None = None,
                attention_only: bool = False, std: float = 0.05) -> dict[str, tuple]:
    """{diffusers module: (A (rank, in), B (out, rank), alpha)} drawn from ``seed``. Both matrices
    are random (a trained LoRA's B is not zero), scaled so the update is a few percent of a weight."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (o, i) in sorted(modules.items()):
        if attention_only and ".attention." not in m:
            continue
        a = torch.randn(rank, i, generator=g) * std
        b = torch.randn(o, rank, generator=g) * std
        out[m] = (a, b, float(alpha if alpha is not None else rank))
    return out


def _original(module: str) -> str:
    from zopt.families.zimage.keys import to_original_name

    return to_original_name(module + ".weight")[: -len(".weight")]


def lora_tensors(lora: dict[str, tuple], layout: str) -> dict:
    """The tensors of ``lora`` as a file in ``layout`` writes them. Original-layout layouts store
    q/k/v of a block as one fused ``attention.qkv`` pair: downs concatenated, ups block-diagonal
    (each alpha / rank folded into the up matrix, alpha written = the fused rank)."""
    import torch

    prefix, naming, (sa, sb), with_alpha = LAYOUTS[layout]
    entries: dict[str, tuple] = {}
    done = set()
    fuse = naming.endswith("original")
    for m, (a, b, alpha) in lora.items():
        if m in done or (fuse and m.endswith((".attention.to_k", ".attention.to_v"))):
            continue
        if fuse and m.endswith(".attention.to_q"):
            base = m[: -len(".to_q")]
            parts = [lora[f"{base}.{p}"] for p in ("to_q", "to_k", "to_v")]
            done.update(f"{base}.{p}" for p in ("to_q", "to_k", "to_v"))
            down = torch.cat([p[0] for p in parts], 0)
            up = torch.block_diag(*[p[1] * (p[2] / p[1].shape[1]) for p in parts])
            name = _original(base + ".x")[: -len(".x")] + ".qkv"
            entries[name] = (down, up, float(down.shape[0]))
            continue
        name = _original(m) if naming.endswith("original") else m
        entries[name] = (a, b, alpha)
    out = {}
    for name, (a, b, alpha) in entries.items():
        key = prefix + (name.replace(".", "_") if naming.startswith("kohya") else name)
        out[f"{key}.{sa}"] = a.contiguous()
        out[f"{key}.{sb}"] = b.contiguous()
        if with_alpha:
            out[f"{key}.alpha"] = torch.tensor(alpha)
        elif alpha != a.shape[0]:
            raise ValueError(f"layout {layout} stores no alpha: give alpha = rank")
    return out


def write_lora(path: Path, lora: dict[str, tuple], layout: str) -> Path:
    from safetensors.torch import save_file

    save_file(lora_tensors(lora, layout), str(path))
    return path


def merged_weights(weights: dict, loras: list[tuple[dict[str, tuple], float]]) -> dict:
    """Diffusers weights ``{module.weight: W}`` with each (lora, scale) added as
    ``W + scale * alpha / rank * B @ A`` (float32)."""
    out = {}
    for n, w in weights.items():
        m = n[: -len(".weight")] if n.endswith(".weight") else None
        w = w.float().clone()
        for lora, scale in loras:
            if m in lora:
                a, b, alpha = lora[m]
                w += scale * alpha / a.shape[0] * (b @ a)
        out[n] = w
    return out
