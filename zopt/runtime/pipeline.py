"""Build a ``ZImagePipeline`` around any transformer variant and generate images.

The text encoder, tokenizer, VAE and scheduler come from a *base* pipeline folder: the embedded
tiny pipeline when the transformer has tiny dimensions, the source pipeline recorded in an
artifact's manifest when it is a diffusers pipeline folder, or ``base=`` given by the user.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ZoptError


@dataclass
class GenerateRequest:
    prompts: list[str]
    seeds: list[int]
    steps: int = 8
    height: int = 256
    width: int = 256
    guidance_scale: float = 0.0
    batch_size: int = 1
    max_sequence_length: int = 128


@dataclass
class GeneratedImage:
    path: Path
    prompt: str
    seed: int
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)


def default_dtype(device: str):
    import torch

    # CPU bf16 matmuls are slow and the CPU reference is fp32; GPUs run bf16 like the real model.
    return torch.float32 if device == "cpu" else torch.bfloat16


def resolve_base(model: str | os.PathLike, transformer_config: dict[str, Any], base: str | None) -> Path:
    """Which pipeline folder supplies text encoder, tokenizer, VAE and scheduler."""
    from ..families import zimage
    from ..models import tiny_pipeline_dir

    if base and base != "tiny":
        p = Path(base)
        if not (p / "model_index.json").exists():
            raise ZoptError("not a diffusers pipeline folder (no model_index.json)", p)
        return p
    if base == "tiny" or os.fspath(model) == "tiny":
        return tiny_pipeline_dir()
    p = Path(model)
    if p.is_dir() and (p / "model_index.json").exists():
        return p
    tiny = zimage.TINY_CONFIG
    if all(transformer_config.get(k) == tiny[k] for k in ("dim", "n_layers", "cap_feat_dim", "n_heads")):
        return tiny_pipeline_dir()
    manifest = (p / "zopt-manifest.json") if p.is_dir() else None
    if manifest and manifest.exists():
        src = Path(json.loads(manifest.read_text()).get("source", {}).get("path", ""))
        for cand in (src, src.parent):
            if (cand / "model_index.json").exists():
                return cand
    raise ZoptError(
        "cannot tell which text encoder and VAE go with this transformer; pass --base PIPELINE_FOLDER", model
    )


def quiet_libraries() -> None:
    """Silence diffusers/transformers progress bars and advice; zopt reports progress itself."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()


def load_transformer(model: str | os.PathLike, device: str, dtype=None, backend: str | None = None):
    from .. import formats

    return formats.load(model, device=device, backend=backend, dtype=dtype)


def build_pipeline(model: str | os.PathLike = "tiny", *, device: str = "cpu", dtype=None, base: str | None = None,
                   backend: str | None = None, transformer=None):
    """A ready ``ZImagePipeline`` whose transformer is ``model`` (any artifact or source)."""
    import torch
    from diffusers import ZImagePipeline

    dtype = dtype or default_dtype(device)
    if transformer is None:
        transformer = load_transformer(model, device, dtype=dtype, backend=backend)
    base_dir = resolve_base(model, dict(transformer.config), base)
    quiet_libraries()
    pipe = ZImagePipeline.from_pretrained(base_dir, transformer=transformer)
    for name in ("vae", "text_encoder"):
        getattr(pipe, name).to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    torch.set_grad_enabled(False)
    return pipe


def initial_latents(pipe, seed: int, height: int, width: int, dtype):
    """The starting noise for one image: drawn on CPU from ``seed`` so every format and device
    starts from identical latents (a prerequisite for quality comparisons)."""
    import torch

    vsf = pipe.vae_scale_factor
    h, w = 2 * (int(height) // (vsf * 2)), 2 * (int(width) // (vsf * 2))
    g = torch.Generator("cpu").manual_seed(int(seed))
    c = pipe.transformer.config.in_channels
    return torch.randn((1, c, h, w), generator=g, dtype=torch.float32).to(dtype)


def run(pipe, req: GenerateRequest, out_dir: str | os.PathLike, extra_meta: dict[str, Any] | None = None,
        callback=None) -> list[GeneratedImage]:
    """Generate one image per (prompt, seed), batched by ``req.batch_size``; write PNG + JSON sidecar."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pipe._execution_device
    dtype = pipe.transformer.dtype if hasattr(pipe.transformer, "dtype") else torch.float32
    jobs = [(p, s) for p in req.prompts for s in req.seeds]
    results: list[GeneratedImage] = []
    for start in range(0, len(jobs), max(1, req.batch_size)):
        chunk = jobs[start : start + max(1, req.batch_size)]
        latents = torch.cat([initial_latents(pipe, s, req.height, req.width, dtype) for _, s in chunk]).to(device)
        t0 = time.perf_counter()
        images = pipe(
            prompt=[p for p, _ in chunk],
            height=req.height,
            width=req.width,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance_scale,
            latents=latents,
            max_sequence_length=req.max_sequence_length,
            callback_on_step_end=callback,
        ).images
        dt = (time.perf_counter() - t0) / len(chunk)
        for (prompt, seed), img in zip(chunk, images):
            idx = len(results)
            path = out_dir / f"{idx:03d}-seed{seed}.png"
            tmp = path.with_suffix(".png.tmp")
            img.save(tmp, format="PNG")
            os.replace(tmp, path)
            meta = {"prompt": prompt, "seed": seed, "steps": req.steps, "height": req.height, "width": req.width,
                    "guidance_scale": req.guidance_scale, "seconds": round(dt, 4), **(extra_meta or {})}
            path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
            results.append(GeneratedImage(path, prompt, seed, dt, meta))
    return results


def request_dict(req: GenerateRequest) -> dict[str, Any]:
    return asdict(req)
