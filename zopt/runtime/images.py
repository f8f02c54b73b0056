"""Run a :class:`~zopt.runtime.pipeline.GenerateRequest` on a prepared pipeline.

Every prompt and negative prompt is encoded first, ``batch_size`` at a time; then the text
encoder leaves the device when the plan placed it ``free`` (model offload), and the images are
denoised and decoded batch by batch, one PNG and one JSON sidecar each. This is the order the
planner's stages assume (text, then denoise, then decode), also for a request of many batches.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def run(pipe, req, out_dir: str | os.PathLike, extra_meta: dict[str, Any] | None = None, callback=None) -> list:
    """Generate one image per job of ``req`` (batched by ``req.batch_size``); write PNG + JSON sidecar.

    The sidecar holds the prompt, negative prompt, seed, the sampling settings, the size, the
    :class:`~zopt.runtime.pipeline.RuntimeChoice` of ``pipe`` (format, backend, offload, attention,
    device, with reasons) and timings. Guidance > 0 on a Turbo checkpoint warns
    (:class:`~zopt.runtime.sampling.TurboGuidanceWarning`) and runs as asked.
    """
    import torch

    from . import sampling as S
    from .pipeline import GeneratedImage, initial_latents

    s = req.sampling()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    choice = getattr(pipe, "zopt_runtime", None)
    msg = S.turbo_warning(getattr(choice, "variant", None), s.guidance)
    if msg:
        warnings.warn(msg, S.TurboGuidanceWarning, stacklevel=3)
    device = torch.device(choice.device) if choice else pipe._execution_device
    dtype = pipe.transformer.dtype if hasattr(pipe.transformer, "dtype") else torch.float32
    jobs = req.triples()
    bs = max(1, req.batch_size)
    t0 = time.perf_counter()
    embeds = S.encode_texts(pipe, [p for p, _, _ in jobs] + ([n for _, _, n in jobs] if s.cfg else []),
                            s.max_sequence_length, bs)
    encode_s = time.perf_counter() - t0
    if choice is not None:
        S.release_text_encoder(pipe, choice.offload, choice.text_encoder)
    S.apply_shift(pipe, s.shift)
    settings = s.as_dict()
    results: list[GeneratedImage] = []
    for start in range(0, len(jobs), bs):
        chunk = jobs[start : start + bs]
        latents = torch.cat([initial_latents(pipe, seed, req.height, req.width, dtype) for _, seed, _ in chunk])
        t0 = time.perf_counter()
        images = pipe(
            prompt_embeds=[embeds[p] for p, _, _ in chunk],
            negative_prompt_embeds=[embeds[n] for _, _, n in chunk] if s.cfg else None,
            height=req.height,
            width=req.width,
            latents=latents.to(device),
            callback_on_step_end=callback,
            **S.call_kwargs(s),
        ).images
        batch_s = time.perf_counter() - t0
        dt = batch_s / len(chunk) + encode_s / len(jobs)  # end to end: its share of the encoding too
        for (prompt, seed, negative), img in zip(chunk, images, strict=True):
            idx = len(results)
            path = out_dir / f"{idx:03d}-seed{seed}.png"
            _write_atomic(path, lambda t, img=img: img.save(t, format="PNG"))
            meta = {"prompt": prompt, "negative_prompt": negative if s.cfg else None, "seed": seed, **settings,
                    "height": req.height, "width": req.width, "batch_size": len(chunk), "seconds": round(dt, 4),
                    **(choice.to_dict() if choice else {}),
                    "timings": {"load_seconds": choice.load_seconds if choice else None,
                                "encode_seconds": round(encode_s, 4), "batch_seconds": round(batch_s, 4),
                                "seconds_per_image": round(dt, 4),
                                "steps_per_second": round(s.steps * len(chunk) / batch_s, 3) if batch_s else None},
                    **(extra_meta or {})}
            meta.pop("load_seconds", None)
            text = json.dumps(meta, indent=1) + "\n"
            _write_atomic(path.with_suffix(".json"), lambda t, text=text: t.write_text(text))
            results.append(GeneratedImage(path, prompt, seed, dt, meta))
    return results
