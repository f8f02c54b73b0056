"""Build the family's diffusers pipeline around any transformer variant and generate images.

:func:`prepare` is the one path from "a variant on disk" to "a pipeline running on this machine":
hardware detection, backend selection, offload and attention choice, each with a reason, recorded
in a :class:`RuntimeChoice`. :func:`run` generates images and writes a JSON sidecar per image.
``zopt generate`` and the benchmark harness both go through these two functions.

The text encoder, tokenizer, VAE and scheduler come from a *base* pipeline folder: an embedded
pipeline (trained micro ``tiny`` or seeded ``tiny-random``) when the transformer has its dimensions, the source pipeline recorded in an
artifact's manifest when it is a diffusers pipeline folder, or ``base=`` given by the user.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ZoptError
from ..quiet import quiet_libraries


@dataclass
class GenerateRequest:
    """What to generate. Without ``jobs``: every prompt with every seed; ``jobs`` lists
    (prompt, seed) pairs explicitly (see :func:`make_jobs` for per-prompt seeds)."""

    prompts: list[str]
    seeds: list[int]
    steps: int = 8
    height: int = 256
    width: int = 256
    guidance_scale: float = 0.0
    batch_size: int = 1
    max_sequence_length: int = 512
    jobs: list[tuple] | None = None  # (prompt, seed) or (prompt, seed, negative prompt)
    negative_prompt: str = ""  # for jobs that name none (used when guidance_scale > 0)
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    shift: float | None = None
    sigmas: list[float] | None = None
    preset: str | None = None

    def pairs(self) -> list[tuple[str, int]]:
        return [(p, s) for p, s, _ in self.triples()]

    def triples(self) -> list[tuple[str, int, str]]:
        """(prompt, seed, negative prompt) of every image."""
        jobs = self.jobs if self.jobs is not None else [(p, s) for p in self.prompts for s in self.seeds]
        return [(j[0], int(j[1]), j[2] if len(j) > 2 and j[2] is not None else self.negative_prompt) for j in jobs]

    def sampling(self):
        """These settings as a checked :class:`~zopt.runtime.sampling.Sampling`."""
        from .sampling import Sampling, check

        s = Sampling(self.steps, float(self.guidance_scale), float(self.cfg_normalization), float(self.cfg_truncation),
                     int(self.max_sequence_length), self.shift, tuple(self.sigmas) if self.sigmas else None,
                     self.preset)
        check(**{k: getattr(s, k) for k in ("steps", "guidance", "cfg_normalization", "cfg_truncation",
                                            "max_sequence_length", "shift", "sigmas")})
        return s

    @classmethod
    def from_sampling(cls, s, prompts: list[str], seeds: list[int], **kw) -> GenerateRequest:
        """A request with the settings of ``s`` (see :func:`zopt.runtime.sampling.resolve`)."""
        return cls(prompts, seeds, steps=s.steps, guidance_scale=s.guidance, cfg_normalization=s.cfg_normalization,
                   cfg_truncation=s.cfg_truncation, max_sequence_length=s.max_sequence_length, shift=s.shift,
                   sigmas=list(s.sigmas) if s.sigmas else None, preset=s.preset, **kw)


def make_jobs(prompts: list[str], seeds: list[int] | None = None, images_per_prompt: int = 1,
              prompt_seeds: list[int | None] | None = None,
              negatives: list[str | None] | None = None) -> list[tuple]:
    """(prompt, seed) pairs. Seeds broadcast against prompts: none -> 0 for all; one -> the same for
    all; one per prompt -> paired in order; a single prompt takes every seed. ``prompt_seeds``
    (from a prompts file) overrides per prompt. ``images_per_prompt`` N adds seeds s, s+1, ..., s+N-1.
    With ``negatives`` (one per prompt, None: the request's default) the jobs are (prompt, seed, negative).
    """
    seeds = list(seeds or [0])
    if len(prompts) == 1 and len(seeds) > 1:
        base = [(0, s) for s in seeds]
    elif len(seeds) == 1:
        base = [(i, seeds[0]) for i in range(len(prompts))]
    elif len(seeds) == len(prompts):
        base = list(enumerate(seeds))
    else:
        raise ZoptError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed, or one per prompt")
    if prompt_seeds:
        base = [(i, s if prompt_seeds[i] is None else prompt_seeds[i]) for i, s in base]
    if images_per_prompt < 1:
        raise ZoptError("--images-per-prompt must be at least 1")
    if negatives is not None:
        return [(prompts[i], int(s) + k, negatives[i]) for i, s in base for k in range(images_per_prompt)]
    return [(prompts[i], int(s) + k) for i, s in base for k in range(images_per_prompt)]


@dataclass
class RuntimeChoice:
    """How a variant runs here, and why (goes into every image's sidecar and benchmark record)."""

    device: str
    dtype: str
    format: str
    backend: str
    backend_reason: str
    offload: str
    offload_reason: str
    attention: str
    attention_reason: str
    hardware: str  # Hardware.fingerprint()
    load_seconds: float = 0.0
    text_encoder: str = "device"  # device, free, cpu, int8, nf4 (see runtime/text_encoder.py)
    vae_tiling: bool = False
    stand_in_for: str | None = None  # decisions were made for this device; ``device`` stood in for it
    variant: str | None = None  # turbo / base / None: what the pipeline folder says (families/zimage/variants.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    from ..families import for_config

    family = for_config(transformer_config)
    builtin = family.builtin_sources()  # name -> builder of an embedded pipeline folder
    if base and base not in builtin:
        from ..checkpoint import hub_pipeline

        p = hub_pipeline(os.fspath(base)) or Path(base)  # a Hub id, as SOURCE takes
        if not (p / "model_index.json").exists():
            raise ZoptError("not a diffusers pipeline folder (no model_index.json)", p)
        return p
    if base in builtin or os.fspath(model) in builtin:
        return builtin[base or os.fspath(model)]()
    p = Path(model)
    if p.is_dir() and (p / "model_index.json").exists():
        return p
    manifest = (p / "zopt-manifest.json") if p.is_dir() else None
    if manifest and manifest.exists():  # first: tiny and tiny-base share a transformer, not a pipeline
        from ..formats.artifact import read_manifest

        src = Path(str(read_manifest(p).get("source", {}).get("path", "")))
        for cand in (src, src.parent):
            if (cand / "model_index.json").exists():
                return cand
    for name in builtin:  # an embedded model's transformer finds its own text encoder and VAE
        cfg = family.builtin_config(name)
        if cfg and all(transformer_config.get(k) == cfg[k] for k in ("dim", "n_layers", "cap_feat_dim", "n_heads")):
            return builtin[name]()
    raise ZoptError(
        "cannot tell which text encoder and VAE go with this transformer; pass --base PIPELINE_FOLDER", model
    )


DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def load_transformer(model: str | os.PathLike, device: str, dtype=None, backend: str | None = None,
                     loras: list | None = None, allow_pickle: bool = False):
    from .. import formats

    extra = {"loras": loras, "allow_pickle": allow_pickle} if loras else {}
    return formats.load(model, device=device, backend=backend, dtype=dtype, **extra)


def runtime_hardware(device: str, hw=None):
    """The hardware record decisions are made for: ``hw`` (default: detected), or its CPU side
    when ``device`` asks for CPU on a machine with an accelerator (see ``hardware.for_device``)."""
    from ..platform.hardware import for_device
    from . import detect

    return for_device(hw or detect(), device)


def _format_of(model: str | os.PathLike) -> str:
    from .. import formats

    fmt = formats.artifact_format(model)
    # sources loaded as they are (the tiny model, a single safetensors file) run like a plain folder
    return "bf16" if fmt in ("tiny", "safetensors") else fmt


def _module_bytes(module) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _transformer_estimate(model, fmt: str, elem: int, config: dict[str, Any] | None) -> int:
    """Transformer bytes once loaded, before loading it: plain formats from the parameter count at
    the compute dtype, quantized ones from their file sizes."""
    from .. import checkpoint
    from .planner import weight_bytes

    if fmt in ("bf16", "fp16", "fp32") and config:
        return weight_bytes(config, elem * 8, elem * 8)
    p = Path(model)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.suffix in (".safetensors", ".gguf", ".onnx",
                                                                             ".engine", ".plan", ".data")]
    total = sum(f.stat().st_size for f in files)
    if total == 0 and config:  # e.g. "tiny"
        src = checkpoint.open(model)
        total = sum(src.info(n).nbytes for n in src.names())
    return total


def prepare(model: str | os.PathLike = "tiny", *, device: str = "auto", offload: str = "auto",
            attention: str | None = "auto", backend: str | None = None, dtype=None, base: str | None = None,
            hardware=None, width: int = 1024, height: int = 1024, batch: int = 1,
            disk_dir: str | os.PathLike | None = None, text_encoder: str = "auto", vae_tiling: bool | None = None,
            guidance: float = 0.0, place: str | None = None, loras: list | None = None,
            allow_pickle: bool = False):
    """Load ``model`` (any variant) into a ready pipeline of its family on this machine.

    Decides device, compute dtype (bf16 on GPUs that have it, fp16 on older ones, fp32 on CPU),
    backend (``select_backend``, once, for the device that computes, also when weights load into
    RAM for offloading: the loader receives the selection as made), offload mode
    (``offload.choose``), text-encoder placement (``text_encoder.PLACEMENTS``; ``auto`` =
    ``device``), VAE tiling and the attention kernel (``attention.choose``, which accounts for
    guidance); ``attention=None`` leaves the model's default. ``place`` runs the decisions made for
    ``hardware`` on another device (a simulated GPU's plan on the CPU); a kernel that cannot run
    there is recorded but not switched on. ``loras`` (``FILE[:SCALE]``) run beside the transformer's
    layers (:func:`zopt.lora.add_loras`). Returns ``(pipe, RuntimeChoice)``; the choice is also
    ``pipe.zopt_runtime``.
    """
    import torch

    from ..families import detect as detect_family
    from ..families import for_config, for_model, resolve_source
    from ..formats.registry import select_backend
    from . import attention as A
    from . import offload as O
    from . import text_encoder as TE
    from .planner import _key, _param_split, activation_bytes, compute_dtype, shape_for

    t0 = time.perf_counter()
    model = resolve_source(model)
    hw = runtime_hardware(device, hardware)
    dev = place or hw.torch_device
    dtype = dtype or {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[compute_dtype(hw)]
    dname = DTYPE_NAMES[str(dtype).replace("torch.", "")]
    elem = torch.tensor([], dtype=dtype).element_size()
    fmt = _format_of(model)
    te = "device" if text_encoder in (None, "auto") else text_encoder
    if te not in TE.PLACEMENTS:
        raise ZoptError(f"--text-encoder {te!r}: choose auto or one of {', '.join(TE.PLACEMENTS)}")
    sel = select_backend(fmt, hw, prefer=backend)  # the one selection: load() receives it as made
    att = A.choose(attention, hw, dname, batch, guidance) if attention else None
    from .. import checkpoint

    try:
        src = checkpoint.open(model) if fmt in ("bf16", "fp16", "fp32") else None
        config = detect_family(src).infer_config(src) if src is not None else None
    except ZoptError:
        config = None
    family = for_config(config or {})
    base_dir = resolve_base(model, config or {}, base) if (config or base or os.fspath(model) == "tiny") else None
    quiet_libraries()
    parts = None
    if base_dir is not None:
        parts = family.pipeline_class().from_pretrained(base_dir, transformer=None).components
        for name in ("vae", "text_encoder"):
            parts[name].to(dtype=dtype)
    t_bytes = _transformer_estimate(model, fmt, elem, config)
    act_cfg = config or family.default_config
    quant, other, block, nonblock, largest = _param_split(_key(act_cfg))
    total = quant + other  # block / non-block / largest-matrix shares of the parameters, applied to bytes
    fp = O.Footprint(
        transformer=t_bytes,
        text_encoder=0 if te == "cpu" else _module_bytes(parts and parts["text_encoder"]),
        vae=_module_bytes(parts and parts["vae"]),
        # guidance runs the prompt and the negative prompt as one batch of twice the size
        activations=activation_bytes(act_cfg, shape_for(width, height, batch * (2 if guidance > 0 else 1)), elem,
                                     att.name if att else "native"),
        largest_block=t_bytes * block // total,
        non_block=t_bytes * nonblock // total,
        largest_leaf=t_bytes * largest // total,
    )
    off = O.choose(offload, hw, fp)
    if te == "free" and off.mode == "none":
        raise ZoptError("--text-encoder free moves the encoder in for encoding and out again: it needs --offload "
                        "model (or a streaming mode); with --offload none use device, cpu, int8 or nf4")
    # weights that will be offloaded load into RAM; the backend stays the one chosen for `dev`
    transformer = load_transformer(model, dev if off.mode == "none" else "cpu", dtype=dtype, backend=sel,
                                   loras=loras, allow_pickle=allow_pickle)
    if parts is None:
        base_dir = resolve_base(model, dict(transformer.config), base)
        family = for_model(transformer)
        parts = family.pipeline_class().from_pretrained(base_dir, transformer=None).components
        for name in ("vae", "text_encoder"):
            parts[name].to(dtype=dtype)
    if dtype == torch.float16:
        parts["vae"].to(dtype=torch.float32)  # the 16-channel VAE overflows fp16 (NaN images); it is small
    if te in ("int8", "nf4"):
        TE.quantize(parts["text_encoder"], te)
    elif te == "cpu":
        TE.keep_on_host(parts["text_encoder"], dev, dtype)
    parts["transformer"] = transformer
    pipe = family.pipeline_class()(**parts)
    att_reason = att.reason if att else "model default"
    if att is not None and not A.runs_torch_attention(pipe.transformer):
        att = A.AttentionChoice("graph", f"{fmt}: the runtime runs attention inside its graph")
        att_reason = att.reason
    elif att is not None:
        if place and place != hw.torch_device and A.ATTENTION[att.name].requires:
            att_reason += f" (not switched on: {place} stands in for {hw.device})"
        else:
            A.apply(pipe.transformer, att.name)
    O.apply(pipe, off.mode, dev, disk_dir=disk_dir or (Path(os.fspath(base_dir)).parent / ".zopt-offload"),
            skip=("text_encoder",) if te == "cpu" else ())
    tiling = bool(vae_tiling)
    if tiling:
        pipe.vae.enable_tiling()
    if batch > 1:
        pipe.vae.enable_slicing()  # decode one image at a time: the batch's decode peak is one image's
    pipe.set_progress_bar_config(disable=True)
    torch.set_grad_enabled(False)
    choice = RuntimeChoice(dev, dname, fmt, sel.name, sel.reason, off.mode, off.reason,
                           att.name if att else "default", att_reason, hw.fingerprint(),
                           round(time.perf_counter() - t0, 3), TE.placement_of(pipe.text_encoder)
                           if te != "free" else "free", tiling, hw.torch_device if dev != hw.torch_device else None,
                           family.variant_of(base_dir))
    pipe.zopt_runtime = choice
    return pipe, choice


def build_pipeline(model: str | os.PathLike = "tiny", *, device: str = "cpu", dtype=None, base: str | None = None,
                   backend: str | None = None, transformer=None, offload: str = "none", attention: str | None = None):
    """A ready pipeline of the model's family whose transformer is ``model`` (any artifact or source).

    With ``transformer`` given, that module is used as is (no selection, no offload).
    """
    import torch

    from ..families import for_model

    if transformer is None:
        pipe, _ = prepare(model, device=device, offload=offload, attention=attention, backend=backend,
                          dtype=dtype, base=base)
        return pipe
    dtype = dtype or default_dtype(device)
    base_dir = resolve_base(model, dict(transformer.config), base)
    quiet_libraries()
    pipe = for_model(transformer).pipeline_class().from_pretrained(base_dir, transformer=transformer)
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
    """Generate every image of ``req`` and write PNG + JSON sidecar (see :func:`zopt.runtime.images.run`)."""
    from .images import run as run_images

    return run_images(pipe, req, out_dir, extra_meta, callback)


def request_dict(req: GenerateRequest) -> dict[str, Any]:
    return asdict(req)
