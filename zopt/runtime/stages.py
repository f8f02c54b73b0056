"""The pipeline by stage: every way to place it on a machine, with its peak memory and time.

A generation runs three stages one after another: text encoding (Qwen3-4B), the denoising steps
(the transformer) and the VAE decode. A component occupies device memory in a stage when it is
working there, or when it stays resident while another works. The peak is the largest stage, not
the sum of everything.

An :class:`Option` fixes the transformer format and backend, the offload mode, where the text
encoder lives and whether the VAE decodes in tiles:

text encoder  ``device``  resident on the device at the compute dtype
              ``free``    moved in to encode, then out again (``model`` offload and the streaming modes)
              ``cpu``     runs on the host CPU (fp32); only its output moves to the device
              ``int8``    resident, Linear weights quantized on the fly with zopt's INT8 converter
              ``nf4``     resident, Linear weights quantized on the fly with zopt's NF4 converter
VAE           tiled decode (512-pixel tiles) caps the decode activations; batches always decode
              one image at a time (slicing, free)

On unified memory (Apple MPS, CPU) moving weights saves nothing, so only ``offload=none`` exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..platform.hardware import Hardware
from . import costs

TEXT_ENCODER_EMBED = 151_936 * 2560  # Qwen3-4B token embedding: kept at the compute dtype when quantized
TE_LAYERS, TE_HIDDEN, TE_FFN = 36, 2560, 9728
TE_BITS = {"int8": 8.0 + 32 / 2560, "nf4": 4.5 + 32 / 64 / 8}  # scales included (fp32 per row / per 64)
TE_QUALITY = {"device": 0, "free": 0, "cpu": 0, "int8": 1, "nf4": 2}  # exact placements first
VAE_TILE = 512  # diffusers' AutoencoderKL tile_sample_min_size
STREAMING = ("group-stream", "group", "sequential")


@dataclass
class Option:
    """One way to run the pipeline on a machine (see the module docstring)."""

    spec: str
    backend: str | None
    offload: str
    text_encoder: str
    vae_tiling: bool
    quality: int  # index in the candidate table (0 = best)
    fallback: bool
    approximate: bool  # the kernel quantizes activations (faster, not exact)
    weights_bytes: int  # transformer as held on the device
    stages: dict[str, int] = field(default_factory=dict)
    step_s: float = 0.0
    image_s: float = 0.0
    fits: bool = False

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    @property
    def resident(self) -> bool:
        """No transformer weights move per denoising step."""
        return self.offload in ("none", "model")

    def to_dict(self) -> dict[str, Any]:
        gib = 1024**3
        return {"spec": self.spec, "backend": self.backend, "offload": self.offload,
                "text_encoder": self.text_encoder, "vae_tiling": self.vae_tiling, "approximate": self.approximate,
                "peak_gib": round(self.peak / gib, 2), "weights_gib": round(self.weights_bytes / gib, 2),
                "stages_gib": {k: round(v / gib, 2) for k, v in self.stages.items()},
                "step_s": round(self.step_s, 3), "image_s": round(self.image_s, 2), "fits": self.fits}


def text_encoder_bytes(placement: str, elem: int) -> int:
    """Device bytes of the text encoder held as ``placement`` (0 when it runs on the host)."""
    from .planner import TEXT_ENCODER_PARAMS

    if placement == "cpu":
        return 0
    if placement in TE_BITS:
        return int((TEXT_ENCODER_PARAMS - TEXT_ENCODER_EMBED) * TE_BITS[placement] / 8 + TEXT_ENCODER_EMBED * elem)
    return TEXT_ENCODER_PARAMS * elem


def placements(hw: Hardware) -> list[tuple[str, str]]:
    """(offload mode, text-encoder placement) pairs worth planning on ``hw``."""
    if hw.unified_memory:
        return [("none", t) for t in ("device", "int8", "nf4")]
    out = [("none", t) for t in ("device", "cpu", "int8", "nf4")]
    out += [("model", t) for t in ("free", "cpu", "int8", "nf4")]
    stream = "group-stream" if hw.has_streams else "group"
    out += [(stream, "free"), (stream, "cpu"), ("sequential", "free"), ("sequential", "cpu")]
    return out


def _te_share(mode: str, te: str, elem: int, active: bool) -> int:
    full = text_encoder_bytes(te, elem)
    if te == "cpu" or full == 0:
        return 0
    if mode == "none":
        return full
    if not active:
        return 0
    if mode == "model":
        return full
    layer = (full - TEXT_ENCODER_EMBED * elem) // TE_LAYERS
    # the token embedding is the text encoder's largest leaf; streaming modes hold it while it works
    return TEXT_ENCODER_EMBED * elem + {"group-stream": 2 * layer, "group": layer}.get(mode, 0)


def _tr_share(mode: str, fp, active: bool) -> int:
    if mode == "none":
        return fp.transformer
    if not active:
        return 0
    return {"model": fp.transformer, "group": fp.non_block + fp.largest_block,
            "group-stream": fp.non_block + 2 * fp.largest_block}.get(mode, fp.largest_leaf)


def stage_bytes(mode: str, te: str, tiled: bool, fp, act_te: int, act_tr: int, width: int, height: int,
                elem: int, vae_act: float, vae_elem: int | None = None) -> dict[str, int]:
    """Device bytes of each stage (see the module docstring); the VAE decodes in ``vae_elem`` bytes."""
    vae = fp.vae
    vae_idle = vae if mode == "none" else 0
    if tiled:
        dec_act = int(vae_act * 128 * min(width, VAE_TILE) * min(height, VAE_TILE) * (vae_elem or elem)
                      + 3 * width * height * 4)
    else:
        dec_act = int(vae_act * 128 * width * height * (vae_elem or elem))
    return {
        "text": _te_share(mode, te, elem, True) + act_te + _tr_share(mode, fp, False) + vae_idle,
        "denoise": _tr_share(mode, fp, True) + act_tr + _te_share(mode, te, elem, False) + vae_idle,
        "decode": vae + dec_act + _tr_share(mode, fp, False) + _te_share(mode, te, elem, False),
    }


def timing(opt: Option, hw: Hardware, work: costs.Work, cand, fp, quant_params: int, elem: int,
           steps: int, batch: int = 1) -> tuple[float, float]:
    """(seconds per denoising step, seconds per image) for ``opt`` (see :mod:`zopt.runtime.costs`)."""
    s = costs.speed_of(hw)
    compute = costs.compute_seconds(work, s, hw, opt.backend, elem)
    if cand.dequant and not costs.KERNEL_CLASS.get(opt.backend or ""):
        compute += costs.dequant_seconds(quant_params, cand.bits,
                                         costs.dequant_passes(opt.spec, opt.backend, cand.unpack, hw), s)
    streamed = costs.link_seconds(fp.transformer, s)
    step = {"group-stream": max(compute, streamed), "group": compute + streamed,
            "sequential": compute + 1.5 * streamed}.get(opt.offload, compute)
    te_dev = text_encoder_bytes(opt.text_encoder, elem)
    text = costs.text_seconds(work.text_flops, hw, s, "cpu" if opt.text_encoder == "cpu" else "device")
    vae = work.vae_flops / ((s.fp32 or s.half) * costs.TFLOP * costs.efficiency(hw))
    vae *= 1.25 if opt.vae_tiling else 1.0  # overlapping tiles
    moved = 0.0
    if opt.offload == "model":  # every component in and back out once per image, from pageable RAM
        moved = 2 * costs.link_seconds(te_dev + fp.transformer + fp.vae, s, pageable=True)
    elif opt.offload in STREAMING:
        moved = costs.link_seconds(te_dev + fp.vae, s)
    return step, (steps * step + text + vae + moved) / max(1, batch)
