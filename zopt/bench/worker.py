"""One benchmark run, inside its own process: ``python -m zopt.bench.worker SPEC.json``.

The harness writes a JSON spec and reads back a JSON result (path given in the spec). Two modes:

* ``convert``: convert the source to one format spec (the harness caches the artifact);
* ``run``: load a model, generate every (prompt, seed) ``repeats`` times after ``warmup`` images,
  measuring load time, peak memory and latency. The *reference* run also saves, per image, the
  transformer's inputs and outputs at every step, its final latents and its images. A *variant*
  run then evaluates its own transformer on the reference's step inputs (so per-step errors are
  not compounded by earlier steps) and compares its free-running final latents and images.

Progress goes to stdout as lines ``@zopt-bench {json}``; anything else there is ignored. Whatever
happens, the result file is written with a status, unless the process itself dies (the harness
then records the crash from the exit code).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

EVENT_PREFIX = "@zopt-bench "
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def emit(**event: Any) -> None:
    """One progress event for the harness (a line on stdout)."""
    sys.stdout.write(EVENT_PREFIX + json.dumps(event) + "\n")
    sys.stdout.flush()


def _sync(device: str) -> None:
    """Wait for queued device work, so a timer measures the work and not its launch."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device.startswith("mps"):
        torch.mps.synchronize()


def _convert(spec: dict[str, Any], metrics: dict[str, Any]) -> None:
    from .. import formats

    emit(phase="convert")
    t0 = time.perf_counter()
    # a sweep's options apply to the formats that have them (group_size to int4, workers to gguf...)
    info, _ = formats.parse_spec(spec["to"])
    known = set(info.options_class().names())
    options = {k: v for k, v in (spec.get("options") or {}).items() if k in known}
    # a rerun of the same sweep replaces its own earlier artifact
    formats.convert(spec["source"], spec["to"], spec["out"], options=options, progress=False, force=True)
    metrics["convert_s"] = round(time.perf_counter() - t0, 4)


class _StepProbe:
    """Hooks on the transformer: times each denoising step (transformer call to the end of the
    scheduler step) and, for the reference, captures the step's inputs and outputs."""

    def __init__(self, transformer, device: str):
        self.device = device
        self.capture: dict[str, list] | None = None
        self.start = 0.0
        self.excluded = 0.0
        self.cpu_start = 0.0
        self.cpu_excluded = 0.0
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU seconds per step (all threads)
        self._h1 = transformer.register_forward_pre_hook(self._pre, with_kwargs=True)
        self._h2 = transformer.register_forward_hook(self._post)

    def _pre(self, module, args, kwargs):
        if self.capture is not None:
            x, t, cap = args[0], args[1], args[2]
            self.capture["x"].append([v.detach().cpu().clone() for v in x])
            self.capture["t"].append(t.detach().cpu().clone())
            self.capture["cap"].append([v.detach().cpu().clone() for v in cap])
        _sync(self.device)
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.excluded = self.cpu_excluded = 0.0

    def _post(self, module, args, output):
        if self.capture is not None:
            t0, c0 = time.perf_counter(), time.process_time()
            out = output[0] if isinstance(output, (tuple, list)) and isinstance(output[0], (list, tuple)) else output
            out = out.sample if hasattr(out, "sample") else out
            self.capture["out"].append([v.detach().float().cpu().clone() for v in out])
            self.excluded += time.perf_counter() - t0
            self.cpu_excluded += time.process_time() - c0

    def step_done(self) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter() - self.start - self.excluded)
        self.cpu_times.append(time.process_time() - self.cpu_start - self.cpu_excluded)


def _sampling(spec: dict[str, Any]):
    from ..runtime.sampling import Sampling, check

    s = Sampling(int(spec["steps"]), float(spec.get("guidance_scale") or 0.0),
                 float(spec.get("cfg_normalization") or 0.0), float(spec.get("cfg_truncation", 1.0)),
                 int(spec.get("max_sequence_length") or 512), spec.get("shift"),
                 tuple(spec["sigmas"]) if spec.get("sigmas") else None)
    check(**{k: getattr(s, k) for k in ("steps", "guidance", "cfg_normalization", "cfg_truncation",
                                        "max_sequence_length", "shift", "sigmas")})
    return s


def _generate(pipe, probe: _StepProbe, spec: dict[str, Any], prompt: str, seed: int, on_step, negative: str = ""):
    """One image from fixed initial noise; returns (PIL image, final latents, seconds end to end)."""
    import torch

    from ..runtime import pipeline as P
    from ..runtime import sampling as S

    device = spec["device"]
    steps = int(spec["steps"])
    final: dict[str, Any] = {}

    def callback(_pipe, i, _t, kwargs):
        probe.step_done()
        if i == steps - 1:
            final["latents"] = kwargs["latents"].detach().float().cpu().clone()
        on_step(i)
        return {}

    _sync(device)
    t0 = time.perf_counter()
    latents = P.initial_latents(pipe, seed, spec["height"], spec["width"], torch.float32).to(device)
    s = _sampling(spec)
    S.apply_shift(pipe, s.shift)
    image = pipe(prompt=[prompt], negative_prompt=[negative] if s.cfg else None, height=spec["height"],
                 width=spec["width"], latents=latents, callback_on_step_end=callback,
                 callback_on_step_end_tensor_inputs=["latents"], **S.call_kwargs(s)).images[0]
    _sync(device)
    return image, final.get("latents"), time.perf_counter() - t0


def _await_turn() -> None:
    """Say this side is ready for its next image and wait until the driver says go."""
    emit(phase="turn")
    if not sys.stdin.readline():
        raise RuntimeError("the paired run's driver went away")


def _run(spec: dict[str, Any], metrics: dict[str, Any], result: dict[str, Any]) -> None:
    from ..families import resolve_source
    from ..formats import artifact_format

    artifact_format(resolve_source(spec["model"]))  # a missing model fails here, before seconds of imports
    import torch

    from ..runtime import pipeline as P
    from .metrics import PeakMemory, latency_stats

    torch.set_grad_enabled(False)
    if spec.get("threads"):  # one thread: contention from other processes stretches wall time, not CPU time
        torch.set_num_threads(int(spec["threads"]))
    device = spec["device"]
    dtype = getattr(torch, DTYPES[spec["dtype"]]) if spec.get("dtype") else P.default_dtype(device)
    result["compute_dtype"] = str(dtype).replace("torch.", "")
    P.quiet_libraries()
    negs = spec.get("negative_prompts") or [""] * len(spec["prompts"])
    negative = dict(zip(spec["prompts"], negs, strict=True))
    jobs = [(p, int(s)) for p in spec["prompts"] for s in spec["seeds"]]
    steps, repeats, warmup = int(spec["steps"]), max(1, int(spec["repeats"])), max(0, int(spec["warmup"]))
    reference = spec["role"] == "reference"
    image_dir = Path(spec["image_dir"])
    image_dir.mkdir(parents=True, exist_ok=True)
    ref_dir = Path(spec["ref_dir"])
    total = warmup + repeats * len(jobs)
    image_times: list[float] = []
    finals: list[Any] = []

    # import the model code before the baseline: load time and memory are the model's, not Python's
    import diffusers  # noqa: F401

    from ..families import DEFAULT, get

    family = get(DEFAULT)
    family.model_class()
    family.pipeline_class()

    emit(phase="load")
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        # the same path as `zopt generate`: backend, offload, text encoder, attention decided by prepare()
        pipe, choice = P.prepare(spec["model"], device=device, offload=spec.get("offload") or "none",
                                 attention=spec.get("attention") or "auto", backend=spec.get("backend"),
                                 dtype=dtype, base=spec.get("base"), width=int(spec["width"]),
                                 height=int(spec["height"]), guidance=float(spec.get("guidance_scale") or 0.0),
                                 text_encoder=spec.get("text_encoder") or "auto")
        _sync(device)
        metrics["load_s"] = round(time.perf_counter() - t0, 4)
        metrics["pipeline_s"] = round(choice.load_seconds, 4)
        result["runtime"] = choice.to_dict()
        probe = _StepProbe(pipe.transformer, device)
        for n in range(warmup + repeats * len(jobs)):
            measuring = n >= warmup
            k = (n - warmup) % len(jobs) if measuring else 0
            first_pass = measuring and n - warmup < len(jobs)
            phase = "generate" if measuring else "warmup"

            def on_step(i, _n=n, _phase=phase):
                emit(phase=_phase, image=_n + 1, images=total, step=i + 1, steps=steps)

            probe.capture = {"x": [], "t": [], "cap": [], "out": []} if (reference and first_pass) else None
            if spec.get("paced"):  # a paired run: wait for this side's turn
                _await_turn()
            image, final, seconds = _generate(pipe, probe, spec, jobs[k][0], jobs[k][1], on_step,
                                              negative[jobs[k][0]])
            if not measuring:
                probe.times, probe.cpu_times = [], []
                if spec.get("paced"):
                    emit(phase="turn_done")
                continue
            image_times.append(seconds)
            if first_pass:
                path = image_dir / f"{k:03d}-seed{jobs[k][1]}.png"
                image.save(path, format="PNG")
                result["images"].append({"prompt": jobs[k][0], "seed": jobs[k][1], "path": str(path)})
                finals.append(final)
                if reference:
                    probe.capture["final"] = final
                    ref_dir.mkdir(parents=True, exist_ok=True)
                    torch.save(probe.capture, ref_dir / f"capture-{k:03d}.pt")
                    probe.capture = None
            if spec.get("paced"):  # after this image's files are written: the other side may run
                emit(phase="turn_done")
    metrics["memory"] = mem.as_dict()
    step_ms = latency_stats(probe.times, 1000.0, 3)
    step_ms["samples"] = [round(t * 1000.0, 3) for t in probe.times]  # the gate's confidence bounds need them
    step_cpu_ms = latency_stats(probe.cpu_times, 1000.0, 3)
    step_cpu_ms["samples"] = [round(t * 1000.0, 3) for t in probe.cpu_times]
    metrics["latency"] = {"step_ms": step_ms, "step_cpu_ms": step_cpu_ms, "image_s": latency_stats(image_times)}
    if reference:
        metrics["quality"] = None
        return
    if not spec.get("ref_images"):
        metrics["quality"] = None
        result["message"] = "the reference run failed: quality not measured"
        return
    emit(phase="quality", images=len(jobs))
    metrics["quality"] = _quality(pipe, spec, jobs, finals, result["images"])


def _quality(pipe, spec: dict[str, Any], jobs, finals, images) -> dict[str, Any]:
    """Per-step deltas on the reference's inputs, final latent error, PSNR/SSIM/LPIPS per image."""
    import torch
    from PIL import Image

    from ..families.zimage.micro.adherence import prompt_adherence  # shapes prompts, read from pixels
    from .metrics import Lpips, cosine, psnr, rel_l2, ssim, summarize_steps

    ref_dir = Path(spec["ref_dir"])
    ref_images = spec["ref_images"]
    device = spec["device"]
    tr = pipe.transformer
    x_dtype = getattr(tr, "dtype", torch.float32)
    cap_dtype = pipe.text_encoder.dtype
    lp = Lpips()
    steps_l2: dict[int, list[float]] = {}
    steps_cos: dict[int, list[float]] = {}
    per_image = []
    pixels, ref_pixels = [], []
    for k, (prompt, seed) in enumerate(jobs):
        cap = torch.load(ref_dir / f"capture-{k:03d}.pt", weights_only=True)
        for i in range(len(cap["out"])):
            x = [v.to(device=device, dtype=x_dtype) for v in cap["x"][i]]
            c = [v.to(device=device, dtype=cap_dtype) for v in cap["cap"][i]]
            out = tr(x, cap["t"][i].to(device), c, return_dict=False)[0]
            steps_l2.setdefault(i, []).append(rel_l2(out, cap["out"][i]))
            steps_cos.setdefault(i, []).append(cosine(out, cap["out"][i]))
        with Image.open(ref_images[k]) as im:
            ref_img = im.convert("RGB")
        with Image.open(images[k]["path"]) as im:
            img = im.convert("RGB")
        pixels.append(img)
        ref_pixels.append(ref_img)
        one = prompt_adherence([img], [prompt])
        per_image.append({"prompt": prompt, "seed": seed,
                          "final_latent_rel_err": round(rel_l2(finals[k], cap["final"]), 6),
                          "psnr_db": round(psnr(img, ref_img), 4), "ssim": round(ssim(img, ref_img), 6),
                          "lpips": None if not lp.available else round(lp(img, ref_img), 6),
                          "adherence": one and one["mean"]})
    per_step = [{"step": i, "rel_l2": round(sum(v) / len(v), 6),
                 "cosine": round(sum(steps_cos[i]) / len(steps_cos[i]), 6)} for i, v in sorted(steps_l2.items())]

    def mean(key):
        vals = [p[key] for p in per_image if p[key] is not None]
        return round(sum(vals) / len(vals), 6) if vals else None

    prompts = [p for p, _ in jobs]
    adh, adh_ref = prompt_adherence(pixels, prompts), prompt_adherence(ref_pixels, prompts)
    return {"per_step": per_step, **summarize_steps(per_step),
            "adherence": adh and adh["mean"], "adherence_ref": adh_ref and adh_ref["mean"], "adherence_detail": adh,
            "final_latent_rel_err": mean("final_latent_rel_err"), "psnr_db": mean("psnr_db"),
            "ssim": mean("ssim"), "lpips": mean("lpips"), "lpips_status": lp.status, "per_image": per_image}


def _classify(e: BaseException) -> str:
    from ..errors import MissingDependency, UnsupportedFormat

    if isinstance(e, MissingDependency):
        return "missing_dependency"
    if isinstance(e, UnsupportedFormat):
        return "unsupported"
    if isinstance(e, MemoryError) or e.__class__.__name__ == "OutOfMemoryError":
        return "oom"
    return "failed"


def main(argv: list[str] | None = None) -> int:
    """Run the spec named by ``argv[0]``; always writes its result file. Exit code 0 unless the
    spec itself cannot be read."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m zopt.bench.worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    metrics: dict[str, Any] = {}
    result: dict[str, Any] = {"status": "ok", "message": None, "metrics": metrics, "images": []}
    t0 = time.perf_counter()
    try:
        if spec["mode"] == "convert":
            _convert(spec, metrics)
        else:
            _run(spec, metrics, result)
    except BaseException as e:  # recorded, never raised: the sweep goes on
        if isinstance(e, KeyboardInterrupt):
            raise
        result["status"] = _classify(e)
        first = (str(e).strip().splitlines() or [""])[0][:400]
        result["message"] = f"{e.__class__.__name__}: {first}" if result["status"] == "failed" else first
        traceback.print_exc(file=sys.stderr)
    result["duration_s"] = round(time.perf_counter() - t0, 3)
    out = Path(spec["result"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
