"""Throughput classes and the step-time model the planner ranks candidates by.

A prediction, not a measurement: each device gets peak dense matmul rates (bf16/fp16 with fp32
accumulation, FP8, INT8), its memory bandwidth and the host link (PCIe, or none on unified
memory), from the maker's published figures, and one efficiency factor turns peaks into what a
diffusion transformer's large matmuls reach. Predicted times are good for *ranking* candidates on
one machine (a 2x gap is real, 10 % is noise), not as promises.

Time of one denoising step = matmul FLOPs / (rate x efficiency) + dequantization traffic / memory
bandwidth + weights streamed per step / link bandwidth (overlapped with compute for
``group-stream``). Per image: steps x step + text encoding + VAE decode + weights moved per image
(``model`` offload) at pageable-copy bandwidth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..platform.hardware import Hardware

TFLOP = 1e12
GB = 1e9  # bandwidths in decimal GB/s, as makers state them
# Fitted to one GPU run (``benchmarks/gpu_vs_plan.py --fit`` over ``benchmarks/gpu_check.sh``'s
# full-size benchmark: NVIDIA H200, 2026-11-27, 1024x1024, 128 text tokens; docs/gpu.md), one
# constant per measured case, so that run is reproduced by construction; applied to NVIDIA (CUDA)
# devices only, through each card's datasheet rates and bandwidth. Other devices keep the estimates
# below them (ROCm, MPS: not measured).
CUDA_EFFICIENCY = 0.42  # share of peak a DiT forward reached (matmuls, attention, norms, launches)
GPU_EFFICIENCY = 0.5  # the estimate for other GPUs
# Dequantizing per layer on a CUDA GPU, as effective passes over one weight's bytes (packed + a
# float32 copy, see :func:`dequant_seconds`): the measured step time above bf16's, over one such
# pass at the card's bandwidth. Keyed by (format, or ``gguf:K`` for the K-quants, and backend):
# ``gguf:K`` was measured on Q4_K_M alone and stands for every K recipe; others keep their
# candidate's own estimate.
GPU_DEQUANT_PASSES = {
    ("fp8", "fp8-storage"): 4.6, ("int8", "torch-dequant"): 4.4, ("gguf:Q8_0", "torch-dequant"): 3.6,
    ("gguf:K", "torch-dequant"): 20.7, ("int4", "torch-dequant"): 10.8, ("nf4", "torch-dequant"): 17.2,
    ("nf4", "bitsandbytes"): 1.7,
}
# The extra time of the kernels that quantize activations per call (scale search, cast, rescale of
# the output) on a CUDA GPU, expressed as bytes moved per activation element in and out of each
# quantizable layer (fitted on FP8 scaled-mm at full size; INT8 int-mm-cuda measured about 40, and
# the medium model's run about 117, so per-call costs other than memory traffic are in it too)
ACT_QUANT_BYTES = 50.0


def efficiency(hw: Hardware) -> float:
    """Share of the peak rates a forward reaches on ``hw``."""
    if hw.device == "cpu":
        return CPU_EFFICIENCY
    return CUDA_EFFICIENCY if hw.device == "cuda" else GPU_EFFICIENCY
CPU_EFFICIENCY = 0.35
PAGEABLE = 0.5  # copies from pageable (unpinned) RAM run at about half the pinned link rate
VAE_FLOPS_PER_PIXEL = 5.0e6  # decoder of the 16-channel VAE, per output pixel (estimate)


@dataclass(frozen=True)
class Speed:
    """Peak rates of one device class (TFLOPs / TOPS dense; bandwidths in GB/s)."""

    half: float  # bf16 (fp16 where bf16 is absent) matmul with fp32 accumulation
    fp8: float = 0.0  # 0: no FP8 matmul
    int8: float = 0.0
    memory: float = 100.0  # device memory bandwidth
    link: float = 0.0  # host <-> device, pinned; 0 on unified memory
    fp32: float = 0.0  # plain fp32 (CPU compute); 0: half / 2
    source: str = ""


# Keyed by a substring of Hardware.device_name (first match wins); maker datasheet figures.
SPEEDS: tuple[tuple[str, Speed], ...] = (
    ("H100", Speed(989, 1979, 1979, 3350, 50, source="H100 SXM datasheet")),
    ("H200", Speed(989, 1979, 1979, 4800, 50, source="H200 SXM datasheet")),
    ("A30", Speed(165, 0, 330, 933, 25, source="A30 datasheet")),
    ("MI300X", Speed(1307, 2615, 2615, 5300, 50, source="MI300X datasheet")),
    ("7900 XTX", Speed(123, 0, 123, 960, 25, source="RDNA3 WMMA, dense")),
    ("RTX 4090", Speed(165, 330, 660, 1008, 25, source="Ada whitepaper, fp32 accumulate")),
    ("RTX 4080", Speed(97.5, 195, 390, 717, 25, source="Ada whitepaper")),
    ("RTX 4060 Ti", Speed(44, 88, 177, 288, 12.5, source="Ada whitepaper; PCIe 4.0 x8")),
    ("RTX 4060", Speed(30, 60, 121, 272, 12.5, source="Ada whitepaper; PCIe 4.0 x8")),
    ("RTX 3070", Speed(40.6, 0, 162, 448, 25, source="Ampere GA104, fp32 accumulate")),
    ("RTX 3060", Speed(25.6, 0, 102, 360, 25, source="Ampere GA106, fp32 accumulate")),
    ("RTX 3050 Laptop", Speed(13, 0, 52, 192, 8, source="GA107 laptop; PCIe 4.0 x4-x8")),
    ("RTX 3050", Speed(15, 0, 60, 168, 12.5, source="GA107; PCIe 4.0 x8")),
    ("RTX 2060", Speed(26, 0, 103, 336, 12, source="Turing TU106 fp16 tensor; PCIe 3.0 x16")),
    ("T4", Speed(65, 0, 130, 320, 12, source="T4 datasheet (70 W: sustained clocks lower)")),
    ("M2 Max", Speed(13.6, 0, 0, 400, 0, source="Apple GPU fp16 = fp32 rate")),
    ("M2", Speed(3.6, 0, 0, 100, 0, source="Apple GPU fp16 = fp32 rate")),
)


def cpu_rate(hw: Hardware) -> float:
    """Peak fp32 FLOP/s of the host CPU: cores x FMA width x 2 units x 2 FLOPs x 3.5 GHz."""
    return max(1, hw.cores) * hw.vector_width() * 2 * 2 * 3.5e9


def speed_of(hw: Hardware) -> Speed:
    """The :class:`Speed` of ``hw``: the table entry whose key its name contains, else a class default."""
    for key, s in SPEEDS:
        if key in hw.device_name:
            return s
    if hw.device == "cpu":
        return Speed(cpu_rate(hw) / TFLOP, 0, cpu_rate(hw) / TFLOP, 60, 0, fp32=cpu_rate(hw) / TFLOP,
                     source="host CPU: cores x SIMD width")
    if hw.device == "mps":
        return Speed(7, 0, 0, 200, 0, source="Apple GPU, generic")
    cc = hw.compute_capability or (0, 0)
    half = 100 if cc >= (8, 9) else 40 if cc >= (8, 0) else 25
    return Speed(half, 2 * half if hw.fp8_matmul else 0, 2 * half, 500, 25, source="generic GPU class")


@dataclass(frozen=True)
class Work:
    """FLOPs and bytes of one generation, independent of the machine."""

    step_flops: float  # one denoising step, averaged over the steps (a guided step runs two forwards)
    matmul_share: float  # share of step_flops in the quantizable Linear layers
    text_flops: float
    vae_flops: float
    act_elements: float = 0.0  # activation elements in and out of the quantizable layers per step


def work_for(config: dict[str, Any], params: int, quant_params: int, tokens: int, text_tokens: int,
             pixels: int, batch: int, cfg: bool | float, text_params: int, io_per_token: int = 0) -> Work:
    """FLOPs of one step (2 x params x tokens for the matmuls, 4 x L^2 x dim per layer for attention),
    of encoding ``text_tokens`` (padded length) and of decoding ``pixels``. ``cfg``: the share of
    steps that run guided (True = all): each runs the negative prompt too, and guidance encodes
    the negative prompts as well."""
    share = float(cfg)
    mult = batch * (1 + share)
    layers = int(config["n_layers"]) + 2 * int(config.get("n_refiner_layers", 0))
    lin = 2.0 * params * tokens
    att = 4.0 * tokens**2 * int(config["dim"]) * layers
    return Work(mult * (lin + att), (2.0 * quant_params * tokens) / (lin + att),
                batch * 2.0 * text_params * text_tokens * (2 if share > 0 else 1), batch * VAE_FLOPS_PER_PIXEL * pixels,
                mult * tokens * io_per_token)


# How compute runs per backend: "half" (dense bf16/fp16 matmuls), "fp8" / "int8" (low-precision
# tensor cores; activations quantized per call: approximate), "fp32" (CPU reference).
KERNEL_CLASS = {"scaled-mm": "fp8", "int-mm-cuda": "int8", "int-mm-cpu": "int8"}
APPROXIMATE = frozenset(KERNEL_CLASS)  # activation-quantizing kernels: opt-in, like sage attention


def compute_seconds(w: Work, s: Speed, hw: Hardware, backend: str | None, elem_bytes: int) -> float:
    """Seconds of matmul + attention compute for one step with ``backend``."""
    eff = efficiency(hw)
    base = (s.fp32 or s.half / 2) if elem_bytes == 4 else s.half
    rate = {"fp8": s.fp8, "int8": s.int8}.get(KERNEL_CLASS.get(backend or "", ""), 0.0) or base
    lin = w.step_flops * w.matmul_share
    seconds = (lin / (rate * eff) + (w.step_flops - lin) / (base * eff)) / TFLOP
    if hw.device == "cuda" and backend in APPROXIMATE:
        seconds += w.act_elements * ACT_QUANT_BYTES / (s.memory * GB)
    return seconds


def dequant_passes(spec: str, backend: str | None, default: float, hw: Hardware) -> float:
    """Effective dequantization passes of ``spec`` run by ``backend`` (see :data:`GPU_DEQUANT_PASSES`)."""
    if hw.device != "cuda":
        return default
    fmt = spec.split(":")[0]
    kquant = fmt == "gguf" and "_K" in spec
    for key in ((spec, backend), ("gguf:K", backend) if kquant else None, (fmt, backend)):
        if key in GPU_DEQUANT_PASSES:
            return GPU_DEQUANT_PASSES[key]
    return default


def dequant_seconds(quant_params: int, bits: float, unpack: float, s: Speed) -> float:
    """Per-layer dequantization per step: read the packed weight, write and re-read a dense copy,
    ``unpack`` x for formats whose decoding takes several passes (K-quants, NF4, INT4)."""
    if unpack <= 0:
        return 0.0
    return quant_params * (bits / 8 + 4) * unpack / (s.memory * GB)


def link_seconds(nbytes: float, s: Speed, pageable: bool = False) -> float:
    """Seconds to move ``nbytes`` host -> device (0 on unified memory)."""
    if s.link <= 0 or nbytes <= 0:
        return 0.0
    return nbytes / (s.link * GB * (PAGEABLE if pageable else 1.0))


def text_seconds(flops: float, hw: Hardware, s: Speed, on: str) -> float:
    """Encoding time: on the device (``on="device"``) or on the host CPU in fp32."""
    if on == "device":
        eff = efficiency(hw)
        return flops / ((s.fp32 or s.half) * TFLOP * eff) if hw.device == "cpu" else flops / (s.half * TFLOP * eff)
    return flops / (cpu_rate(hw) * CPU_EFFICIENCY)


def fmt_seconds(x: float) -> str:
    if math.isinf(x):
        return "-"
    return f"{x:.1f} s" if x >= 1 else f"{x * 1000:.0f} ms"
