"""Memory planner: which format, offload mode and attention kernel fit a memory budget.

The memory model (what each stage holds, per format) is :mod:`zopt.runtime.memory`; the
time model is :mod:`zopt.runtime.costs`; the options by stage are :mod:`zopt.runtime.stages`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..formats.registry import Candidate, planner_candidates
from ..platform.hardware import Hardware
from .memory import (  # noqa: F401  (the memory model, also read from here)
    ACT_FIXED,
    ACT_PER_DIM,
    ACT_PER_FFN,
    DEFAULT_TEXT_TOKENS,
    TEXT_ENCODER_PARAMS,
    VAE_ACT,
    VAE_PARAMS,
    Shape,
    _key,
    _param_split,
    activation_bytes,
    footprint,
    quant_io,
    shape_for,
    weight_bytes,
)
from .offload import GIB


def candidates() -> tuple[Candidate, ...]:
    """The transformer formats the planner weighs, best quality first: each format declares its
    candidates in the format registry (effective bits = nominal + scale overhead of the storage
    layout; how costly its dequantization is); everything else in the planner is derived."""
    return planner_candidates()


CANDIDATES: tuple[Candidate, ...] = candidates()

# How a backend or device holds a format's weights when that differs from the file:
# (format, backend or device) -> effective bits. GGUF, INT4 and NF4 on int-mm-cpu keep INT8 codes
# plus one float32 scale per output row (rows of 3,840 or more weights); MPS has no float8 dtype,
# so FP8 weights are held as bf16 there.
HELD_BITS = {**{(f, "int-mm-cpu"): 8.0 + 32 / 3840 for f in ("gguf", "int4", "nf4")}, ("fp8", "mps"): 16.0}


def held(cand: Candidate, backend: str | None, device: str | None = None) -> Candidate:
    """``cand`` as ``backend`` on ``device`` holds it in memory (see :data:`HELD_BITS`)."""
    import dataclasses

    fmt = cand.spec.split(":")[0]
    bits = HELD_BITS.get((fmt, backend), HELD_BITS.get((fmt, device)))
    if bits is None:
        return cand
    if bits >= 16:  # held dense: a plain model, nothing to dequantize
        return dataclasses.replace(cand, bits=bits, dequant=False, transient=False, unpack=0.0)
    return dataclasses.replace(cand, bits=bits, transient=False)


BAND = 1.35  # predicted times within 35 % count as equal (the time model's error); quality decides
# An option fits comfortably when it leaves this much of the budget free: 20 % of it, at most 2 GiB.
# The uncertain part of a peak (activations, the allocator's fragmentation, other programs' use of
# the device) does not grow with the card, so the margin is capped.
HEADROOM, HEADROOM_CAP = 0.2, 2 * GIB
PREFER = ("speed", "quality")


@dataclass
class PlanRow:
    """The best option for one format (or why none runs): a row of ``zopt plan``'s table."""

    spec: str
    offload: str | None  # None: does not fit (or cannot run)
    device_bytes: int  # predicted peak (the largest stage)
    weights_bytes: int
    backend: str | None
    note: str
    text_encoder: str | None = None
    vae_tiling: bool = False
    step_s: float | None = None
    image_s: float | None = None
    stages: dict[str, int] = field(default_factory=dict)


@dataclass
class Plan:
    hardware: Hardware
    budget: int
    shape: Shape
    width: int
    height: int
    attention: str
    attention_reason: str
    recommended: PlanRow | None
    rows: list[PlanRow] = field(default_factory=list)
    options: list[Any] = field(default_factory=list)  # every stages.Option considered
    dtype: str = "bf16"
    steps: int = 8
    prefer: str = "speed"
    reason: str = ""
    ideal_s: float | None = None  # bf16, everything resident, memory unlimited: the slowdown's yardstick
    guidance: float = 0.0
    cfg_steps: int = 0  # steps that run guided (two forwards, twice the activations)

    @property
    def slowdown(self) -> float | None:
        r = self.recommended
        return None if r is None or not self.ideal_s else r.image_s / self.ideal_s

    def to_dict(self) -> dict[str, Any]:
        def row(r: PlanRow | None):
            if r is None:
                return None
            d = {k: v for k, v in r.__dict__.items() if k != "stages"}
            return {**d, "device_gib": round(r.device_bytes / GIB, 2), "weights_gib": round(r.weights_bytes / GIB, 2),
                    "stages_gib": {k: round(v / GIB, 2) for k, v in r.stages.items()}}

        return {"device": self.hardware.device, "device_name": self.hardware.device_name,
                "budget_gib": round(self.budget / GIB, 2), "width": self.width, "height": self.height,
                "batch": self.shape.batch, "image_tokens": self.shape.image_tokens,
                "text_tokens": self.shape.text_tokens, "dtype": self.dtype, "steps": self.steps,
                "guidance": self.guidance, "cfg_steps": self.cfg_steps,
                "prefer": self.prefer, "attention": self.attention, "attention_reason": self.attention_reason,
                "recommended": row(self.recommended), "reason": self.reason,
                "slowdown": None if self.slowdown is None else round(self.slowdown, 2),
                "rows": [row(r) for r in self.rows], "options": [o.to_dict() for o in self.options]}


def compute_dtype(hw: Hardware) -> str:
    """fp32 on CPU (the reference), bf16 on GPUs that have it, fp16 on older ones (T4, V100, RTX 20xx)."""
    return "fp32" if hw.device == "cpu" else "bf16" if hw.bf16 else "fp16"


def _runnable_backends(fmt: str, hw: Hardware) -> tuple[list[str | None], str | None]:
    """Backends that run ``fmt`` on ``hw`` (best first), or ([], why not); [None] when not in this build."""
    from ..errors import UnsupportedFormat
    from ..formats.registry import entry, select_backend, status
    from ..platform.backends import availability

    if status(fmt) == "not in this build":
        return [None], "format not in this build"
    names = [b.name for b, missing in availability(entry(fmt), hw) if not missing]
    if names:
        return names, None
    try:
        select_backend(fmt, hw)
    except UnsupportedFormat as e:
        return [], f"cannot run: {e.problem}"
    return [], "cannot run here"


def choose(options: list, prefer: str = "speed", approximate: bool = False, budget: int | None = None,
           sequential: bool = False):
    """The recommended option among ``options`` (None when none fits).

    ``speed``: options that keep the transformer resident (no weights streamed per step) first, in
    this order: 4 bits or more with :data:`HEADROOM` to spare, any format with it to spare, 4 bits
    or more filling the budget tightly; then everything that fits. In the first group that has
    any, the fastest prediction, with predictions within
    :data:`BAND` of it counted as equal and decided by quality (an exact text encoder first, then
    the format's place in :func:`candidates`). ``quality``: the best format that fits, then the
    best text-encoder placement, then the fastest. Activation-quantizing kernels (``scaled-mm``,
    ``int-mm-*``) only with ``approximate``; ``sequential`` offload only with ``sequential`` (never
    recommended: no CPU can stand in for it, so no check here runs it).
    """
    from .stages import TE_QUALITY

    fit = [o for o in options if o.fits and (approximate or not o.approximate)
           and (sequential or o.offload != "sequential")]
    if not fit:
        return None
    if prefer == "quality":
        return min(fit, key=lambda o: (o.fallback, o.quality, TE_QUALITY[o.text_encoder], o.image_s))
    roomy = budget - min(HEADROOM * budget, HEADROOM_CAP) if budget is not None else float("inf")
    resident = [o for o in fit if o.resident]
    good = [o for o in resident if not o.fallback]
    for group in ([o for o in good if o.peak <= roomy], [o for o in resident if o.peak <= roomy], good, fit):
        if group:
            best = min(o.image_s for o in group)
            near = [o for o in group if o.image_s <= BAND * best]
            return min(near, key=lambda o: (TE_QUALITY[o.text_encoder], o.quality, o.image_s))
    return None


def plan(hw: Hardware, width: int = 1024, height: int = 1024, batch: int = 1,
         text_tokens: int = DEFAULT_TEXT_TOKENS, config: dict[str, Any] | None = None, steps: int = 8,
         guidance: float = 0.0, prefer: str = "speed", approximate: bool = False,
         cfg_truncation: float = 1.0) -> Plan:
    """Plan the whole pipeline for ``hw`` (its free memory minus the reserve is the budget).

    With ``guidance`` > 0 the guided steps (all, or those before ``cfg_truncation``) run the
    prompt and the negative prompt as one batch of twice the size: the denoise stage's activations
    double and each guided step costs two forwards.

    Every option of :mod:`zopt.runtime.stages` is sized by stage and timed with
    :mod:`zopt.runtime.costs`; :func:`choose` picks one. Formats whose module is not in this
    build are still planned, and flagged.
    """
    from ..errors import ZoptError
    from ..families import zimage
    from . import costs, stages
    from .attention import choose as choose_attention
    from .offload import reserve
    from .sampling import Sampling, cfg_steps

    if prefer not in PREFER:
        raise ZoptError(f"--prefer {prefer!r}: choose one of {', '.join(PREFER)}")
    config = config or zimage.FULL_CONFIG
    dtype = compute_dtype(hw)
    elem = 4 if dtype == "fp32" else 2
    guided = cfg_steps(Sampling(steps, guidance, cfg_truncation=cfg_truncation))
    att = choose_attention("auto", hw, dtype, batch, guidance=guidance if guided else 0.0)
    shape = shape_for(width, height, batch, text_tokens)
    budget = hw.free_memory - reserve(hw)
    quant, other, *_ = _param_split(_key(config))
    work = costs.work_for(config, quant + other, quant, shape.tokens, shape.text_tokens, width * height, batch,
                          guided / steps, TEXT_ENCODER_PARAMS, quant_io(_key(config)))
    act_tr = activation_bytes(config, dataclasses.replace(shape, batch=shape.batch * (2 if guided else 1)), elem,
                              att.name)
    act_te = batch * shape.text_tokens * ((stages.TE_LAYERS + 1) * stages.TE_HIDDEN + 3 * stages.TE_FFN) * elem
    options: list[stages.Option] = []
    rows: list[PlanRow] = []
    ideal = None
    for qi, cand in enumerate(CANDIDATES):
        fmt = cand.spec.split(":")[0]
        backends, problem = _runnable_backends(fmt, hw)
        mine = []
        for backend in backends:
            c = held(cand, backend, hw.device)
            fp = footprint(config, c, shape, width, height, elem, att.name)
            if dtype == "fp16":  # the VAE runs in fp32 there (it overflows fp16)
                fp = dataclasses.replace(fp, vae=VAE_PARAMS * 4)
            for mode, te in stages.placements(hw):
                for tiled in (False, True):
                    o = stages.Option(cand.spec, backend, mode, te, tiled, qi, cand.fallback,
                                      backend in costs.APPROXIMATE, fp.transformer)
                    o.stages = stages.stage_bytes(mode, te, tiled, fp, act_te, act_tr, width, height, elem,
                                                 VAE_ACT, 4 if dtype == "fp16" else elem)
                    o.step_s, o.image_s = stages.timing(o, hw, work, c, fp, quant, elem, steps, batch)
                    o.fits = o.peak <= budget
                    mine.append(o)
                    if qi == 0 and mode == "none" and te == "device" and not tiled:
                        ideal = o.image_s
        options += mine
        best = (choose(mine, prefer, approximate, budget) or choose(mine, prefer, True, budget)
                or choose(mine, prefer, approximate, budget, sequential=True))
        if best is not None:
            note = problem or ("approximate kernel" if best.approximate else cand.note)
            rows.append(_row(best, note + ("; sequential offload: not recommended" if best.offload == "sequential"
                                           else "")))
        elif mine:
            small = min(mine, key=lambda o: o.peak)
            rows.append(PlanRow(cand.spec, None, small.peak, small.weights_bytes, small.backend,
                                f"does not fit: needs {small.peak / GIB:.1f} GiB at least", stages=small.stages))
        else:
            rows.append(PlanRow(cand.spec, None, 0, weight_bytes(config, cand.bits), None, problem or "cannot run"))
    rec = choose(options, prefer, approximate, budget)
    p = Plan(hw, budget, shape, width, height, att.name, att.reason, _row(rec, "") if rec else None, rows, options,
             dtype, steps, prefer, ideal_s=ideal, guidance=guidance, cfg_steps=guided)
    p.reason = _reason(p, rec, options)
    if rec is None:
        last = choose(options, prefer, approximate, budget, sequential=True)
        if last is not None and ideal:
            flags = (f" --text-encoder {last.text_encoder}" if last.text_encoder != "device" else "") + (
                " --vae-tiling" if last.vae_tiling else "")
            p.reason += (f"; only sequential offload fits (every layer copied in as it runs: --to {last.spec} "
                         f"--offload sequential{flags}, peak {last.peak / GIB:.1f} GiB), predicted "
                         f"{last.image_s / ideal:.1f}x slower than bf16 with unlimited memory; not recommended: "
                         "no check here runs it")
    return p


def _row(o, note: str) -> PlanRow:
    return PlanRow(o.spec, o.offload, o.peak, o.weights_bytes, o.backend, note, o.text_encoder, o.vae_tiling,
                   o.step_s, o.image_s, dict(o.stages))


def _reason(p: Plan, rec, options: list) -> str:
    """One sentence on why: what fits, what it costs, or that nothing does."""
    if rec is None:
        need = min((o.peak for o in options if o.offload != "sequential"), default=0)
        where = "RAM" if p.hardware.unified_memory else "device memory"
        return (f"nothing fits: the smallest option needs {need / GIB:.1f} GiB of {where}, "
                f"{max(p.budget, 0) / GIB:.1f} GiB usable")
    stage = max(rec.stages, key=rec.stages.get)
    what = "kept resident" if rec.resident else "streamed every step"
    te = {"device": "on the device", "free": "moved in for encoding, then out", "cpu": "on the CPU",
          "int8": "quantized to INT8 on the device", "nf4": "quantized to NF4 on the device"}[rec.text_encoder]
    text = (f"transformer {what}, text encoder {te}{', VAE tiled' if rec.vae_tiling else ''}; "
            f"peak {rec.peak / GIB:.1f} of {p.budget / GIB:.1f} GiB in the {stage} stage")
    if p.slowdown and p.slowdown > 1.05:
        text += f"; predicted {p.slowdown:.1f}x slower than bf16 with unlimited memory"
    return text


DESKTOP_SHARE = (0.6 * GIB, 0.02)  # what a GPU driving a display typically has in use before zopt starts


def budget_hardware(vram: int, base: Hardware | None = None) -> Hardware:
    """``base`` (default: a generic CUDA sm_89 GPU with the usual packages) as a card of ``vram`` bytes.

    A GPU's free memory is less than its size (display, driver): free = ``vram`` minus
    :data:`DESKTOP_SHARE`. A CPU machine's ``vram`` is its free RAM.
    """
    import dataclasses

    if base is not None and base.device in ("cpu", "mps"):
        return dataclasses.replace(base, total_memory=vram, free_memory=vram, system_memory=vram, system_free=vram)
    if base is None:
        base = Hardware("cuda", "CUDA GPU", (8, 9), "sm_89", vram, vram, fp8_matmul=True, int8_matmul=True,
                        cores=8, cpu_flags=("avx2", "fma", "f16c"), packages={"bitsandbytes": "?"},
                        system_memory=64 * GIB, system_free=48 * GIB)
    free = int(vram - DESKTOP_SHARE[0] - DESKTOP_SHARE[1] * vram)
    return dataclasses.replace(base, total_memory=vram, free_memory=max(0, free))


def parse_size(text: str) -> int:
    """``"8GB"``, ``"7.5G"``, ``"8192MB"`` -> bytes (GB means GiB, as GPU makers' "8 GB" does)."""
    from ..errors import ZoptError

    t = text.strip().upper().replace("IB", "B")
    units = {"TB": 1024**4, "GB": GIB, "MB": 1024**2, "T": 1024**4, "G": GIB, "M": 1024**2}
    for u, mult in units.items():
        if t.endswith(u):
            try:
                v = float(t[: -len(u)])
            except ValueError:
                break
            if v <= 0:
                break
            return int(v * mult)
    raise ZoptError(f"memory size {text!r} is not like 8GB, 7.5G or 8192MB")
