"""Calibration: run the model over prompts and collect an importance matrix (``zopt calibrate``).

Forward pre-hooks on every Linear of the transformer accumulate, per input channel, the sum of
squares, the token count and the largest magnitude (:class:`zopt.formats.imatrix.Stat`): one vector
per matrix, whatever the number of prompts, so memory stays bounded, and the pipeline runs as users
run it (:func:`zopt.runtime.pipeline.prepare` then :func:`~zopt.runtime.pipeline.run`, offload
included). Every denoising step is a different timestep, so ``steps`` spreads the statistics over
the noise schedule.

A transformer with no text encoder and VAE that go with it (a bare synthetic checkpoint) is
calibrated on seeded random latents and caption features at ``steps`` timesteps instead
(``inputs="random"``); the file records which in ``imatrix.datasets``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ZoptError
from ..formats.imatrix import Imatrix, Stat

# Captions in the micro model's grammar (plain English: any text encoder reads them)
DEFAULT_PROMPTS = (
    "a large red circle at the top left on a blue background",
    "a small white star in the centre and a medium black square at the bottom right on an orange and green background",
    "a medium green triangle at the bottom on a white background",
    "a large yellow square in the centre on a purple background",
    "a small blue circle at the top right and a large orange star at the left on a black and white background",
    "a medium purple star at the right on a yellow background",
    "a large black triangle at the top and a small red square at the bottom left on a green background",
    "a medium white circle at the bottom right on a red and blue background",
)


def tensor_name(module_name: str) -> str | None:
    """The GGUF (original-layout) weight name a Linear's input statistics belong to; q, k and v share
    their input, stored under the fused ``attention.qkv`` (k and v give None: counted once)."""
    from ..families import zimage

    if module_name.endswith((".attention.to_k", ".attention.to_v")):
        return None
    name = zimage.to_original_name(module_name + ".weight")
    return name.replace(".attention.to_q.weight", ".attention.qkv.weight")


class Collector:
    """Forward pre-hooks on a module's Linears that accumulate :class:`Stat` per weight name."""

    def __init__(self, model) -> None:
        self.sum2: dict[str, Any] = {}
        self.count: dict[str, int] = {}
        self.absmax: dict[str, Any] = {}
        self.calls = 0
        self._handles = []
        for mname, mod in model.named_modules():
            n_in = getattr(mod, "in_features", None)
            if not isinstance(n_in, int) or not mname:
                continue
            name = tensor_name(mname)
            if name is not None:
                self._handles.append(mod.register_forward_pre_hook(self._hook(name, n_in)))

    def _hook(self, name: str, n_in: int):
        import torch

        def hook(_mod, args):
            x = args[0].detach().reshape(-1, n_in)
            xf = x.float()
            s2 = xf.square().sum(0, dtype=torch.float64)
            am = xf.abs().amax(0)
            if name in self.sum2:
                self.sum2[name] += s2
                torch.maximum(self.absmax[name], am, out=self.absmax[name])
                self.count[name] += x.shape[0]
            else:
                self.sum2[name], self.absmax[name], self.count[name] = s2, am, x.shape[0]
            self.calls += 1

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def result(self, datasets: list[str], chunks: int, chunk_size: int) -> Imatrix:
        """The collected statistics (on CPU, float64 sums)."""
        if not self.sum2:
            raise ZoptError("calibration saw no Linear inputs (is this a transformer?)")
        entries = {n: Stat(self.sum2[n].cpu().numpy(), float(self.count[n]), self.absmax[n].cpu().numpy())
                   for n in sorted(self.sum2)}
        return Imatrix(entries, datasets, chunks, chunk_size)


def read_prompts(path: str | os.PathLike | None) -> list[str]:
    """One prompt per non-empty line of ``path`` (default: :data:`DEFAULT_PROMPTS`)."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ZoptError(f"cannot read prompts ({e.__class__.__name__})", p) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ZoptError("no prompts in file (one prompt per line)", p)
    return prompts


def _record_calls(model, calls: list):
    """A forward pre-hook that appends each transformer call's (latents, timestep, caption features),
    copied to the CPU, to ``calls``; returns its handle."""

    def hook(_mod, args, kwargs):
        xs = args[0] if args else kwargs["x"]
        t = args[1] if len(args) > 1 else kwargs["t"]
        caps = args[2] if len(args) > 2 else kwargs["cap_feats"]
        calls.append(([x.detach().float().cpu() for x in xs], t.detach().float().cpu(),
                      [c.detach().float().cpu() for c in caps]))

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def calibrate(source: str | os.PathLike, prompts: list[str] | None = None, *, steps: int = 8, resolution: int = 256,
              seed: int = 0, device: str = "auto", inputs: str = "auto", base: str | None = None,
              calls: list | None = None) -> Imatrix:
    """Collect an importance matrix of ``source``'s transformer over ``prompts`` (one image each,
    ``steps`` denoising steps at ``resolution`` px). ``inputs``: ``pipeline`` (the full pipeline),
    ``random`` (seeded random latents and caption features, no text encoder), ``auto`` (pipeline when
    a text encoder and VAE go with the model, else random). ``calls``: a list that receives every
    transformer call (latents, timestep, caption features) on the CPU, for
    :func:`zopt.formats.gguf.outputs.save_calls`."""
    if steps < 1 or resolution < 16:
        raise ZoptError(f"calibration needs steps >= 1 and resolution >= 16 (got {steps}, {resolution})")
    if inputs not in ("auto", "pipeline", "random"):
        raise ZoptError(f"--inputs {inputs!r}: choose auto, pipeline or random")
    prompts = list(prompts or DEFAULT_PROMPTS)
    if inputs == "random":
        return _calibrate_random(source, len(prompts), steps, resolution, seed, device, calls)
    from .pipeline import GenerateRequest, prepare, run

    try:
        pipe, _ = prepare(source, device=device, base=base, width=resolution, height=resolution)
    except ZoptError as e:
        if inputs == "pipeline" or "text encoder" not in str(e):
            raise
        return _calibrate_random(source, len(prompts), steps, resolution, seed, device, calls)
    col = Collector(pipe.transformer)
    handle = _record_calls(pipe.transformer, calls) if calls is not None else None
    try:
        req = GenerateRequest(prompts=prompts, seeds=[seed], steps=steps, height=resolution, width=resolution)
        with tempfile.TemporaryDirectory(prefix="zopt-calibrate-") as tmp:
            run(pipe, req, tmp)
    finally:
        col.close()
        if handle is not None:
            handle.remove()
    return col.result([f"pipeline: {len(prompts)} prompts, {steps} steps, {resolution}px, seed {seed}"],
                      len(prompts) * steps, 1)


def _random_dtype(path, dev):
    """The transformer's dtype for calibration on random inputs, where it is loaded whole on ``dev``
    (:func:`zopt.platform.hardware.whole_model_dtype`: bfloat16 for the full model on a 24 GB machine); ZoptError
    where neither fits (a full pipeline offloads instead)."""
    import math

    import torch

    from ..checkpoint import open as open_checkpoint
    from ..platform.hardware import whole_model_dtype

    try:
        src = open_checkpoint(path)
        params = sum(math.prod(src.info(n).shape) for n in src.names())
    except Exception:  # the loader reports what it cannot read
        return torch.float32
    dtype, free = whole_model_dtype(params, dev)
    if dtype is None:
        raise ZoptError(f"calibrating on random inputs loads the transformer whole: {params * 2 / 1e6:,.0f} MB in "
                        f"bfloat16, {free / 1e6:,.0f} MB free on {dev}; calibrate through its pipeline "
                        f"(--inputs pipeline, which offloads) or on a machine with more memory", path)
    return dtype


def _calibrate_random(source, n: int, steps: int, resolution: int, seed: int, device: str,
                      calls: list | None = None) -> Imatrix:
    """Transformer-only calibration on seeded N(0, 1) latents and caption features, timesteps
    spread evenly over (0, 1]."""
    import torch

    from ..families import resolve_source
    from ..formats.gguf.outputs import random_calls
    from .pipeline import load_transformer, runtime_hardware

    dev = runtime_hardware(device).torch_device
    path = resolve_source(source)
    dtype = _random_dtype(path, dev)
    model = load_transformer(path, dev, dtype=dtype)
    cfg = dict(model.config)
    col = Collector(model)
    handle = _record_calls(model, calls) if calls is not None else None
    side = max(2, resolution // 8)  # latent side of an 8x-downsampling VAE
    try:
        with torch.inference_mode():
            for xs, t, caps in random_calls(cfg, n, steps, side, seed).items:
                model([x.to(dev, dtype) for x in xs], t.to(dev, dtype), [c.to(dev, dtype) for c in caps],
                      return_dict=False)
    finally:
        col.close()
        if handle is not None:
            handle.remove()
    precision = "" if dtype == torch.float32 else f", transformer in {str(dtype).removeprefix('torch.')}"
    return col.result([f"random: {n} inputs, {steps} timesteps, {side}x{side} latents, seed {seed}{precision}"],
                      n * steps, 1)
