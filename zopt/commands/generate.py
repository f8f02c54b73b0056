"""zopt generate: images from any variant, with a metadata sidecar per image."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import sampling_args


def add_arguments(p) -> None:
    from ._args import DeprecatedAlias

    p.add_argument("source", nargs="?", default=None, metavar="SOURCE",
                   help="model: 'tiny' (default), a diffusers folder, a .gguf file, a zopt artifact folder or "
                        "owner/name[@rev]")
    p.add_argument("--model", action=DeprecatedAlias, new="a positional SOURCE (zopt generate SOURCE ...)")
    p.add_argument("--base", default=None,
                   help="pipeline folder or owner/name[@rev] supplying text encoder, tokenizer and VAE")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeat for several)")
    p.add_argument("--prompts-file", default=None,
                   help="one prompt per line, or JSON lines {\"prompt\": ..., \"seed\": ..., \"negative_prompt\": ...} "
                        "for per-prompt seeds and negative prompts")
    p.add_argument("--seeds", dest="seed", nargs="+", action="extend", default=[],
                   help="seeds, one per prompt (space or comma separated; a single seed applies to all; default 0)")
    p.add_argument("--seed", action=DeprecatedAlias, new="--seeds", append=True)
    p.add_argument("--images-per-prompt", type=int, default=1, help="N images per prompt, seeds s, s+1, ...")
    p.add_argument("--resolution", default=None,
                   help="WxH (default 256x256; 64x64 for the embedded tiny/micro model, what it learned)")
    sampling_args.add_arguments(p)
    p.add_argument("--batch", dest="batch_size", type=int, default=1, help="images per pipeline call (default 1)")
    p.add_argument("--batch-size", type=int, action=DeprecatedAlias, new="--batch")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the transformer blocks where the backend benefits (default: auto, "
                        "as ZOPT_COMPILE says; the first step then takes 10-20 s longer)")
    p.add_argument("--no-progress", action="store_true", help="no step progress display")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--backend", default=None, help="kernel backend for the format (default: auto; see zopt doctor)")
    p.add_argument("--offload", default="auto",
                   help="auto, none, model, group, group-stream, sequential or disk (see docs/runtime.md)")
    p.add_argument("--attention", default="auto", help="auto or a diffusers attention backend (native, flash, ...)")
    p.add_argument("--text-encoder", default="auto", choices=["auto", "device", "free", "cpu", "int8", "nf4"],
                   help="where the text encoder runs: on the device, freed after encoding (needs an offload mode), "
                        "on the CPU, or quantized on the fly (see zopt plan)")
    p.add_argument("--vae-tiling", action="store_true", help="decode in 512-pixel tiles (less memory at large sizes)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="run-time LoRA beside the (quantized) layers (repeatable; scale default 1)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle LoRA files (weights_only=True)")
    p.add_argument("-o", "--out", default="exports/images", help="a .png file (one image) or a folder")


def parse_resolution(text: str) -> tuple[int, int]:
    from ..errors import ZoptError

    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ZoptError(f"--resolution {text!r} is not WxH (e.g. 512x512)") from None
    if w % 16 or h % 16 or w <= 0 or h <= 0:
        raise ZoptError(f"--resolution {text!r}: width and height must be positive multiples of 16")
    return w, h


def read_prompts_file(path: str) -> tuple[list[str], list[int | None], list[str | None]]:
    """Prompts, per-prompt seeds and negative prompts (None where a line gives none) from a text or
    JSON-lines file: ``{"prompt": ..., "seed": ..., "negative_prompt": ...}``, the last two optional."""
    import json

    from ..errors import ZoptError

    try:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ZoptError(f"cannot read prompts file ({getattr(e, 'strerror', None) or e})", path) from None
    prompts, seeds, negatives = [], [], []
    for i, ln in enumerate(lines, 1):
        if ln.startswith("{"):
            try:
                obj = json.loads(ln)
                prompts.append(str(obj["prompt"]))
                seeds.append(None if obj.get("seed") is None else int(obj["seed"]))
                neg = obj.get("negative_prompt")
                if neg is not None and not isinstance(neg, str):
                    raise TypeError
                negatives.append(neg)
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ZoptError(f"line {i} is not a JSON object with a \"prompt\" (and optional \"seed\", "
                                "text \"negative_prompt\")", path) from None
        else:
            prompts.append(ln)
            seeds.append(None)
            negatives.append(None)
    return prompts, seeds, negatives


def check_args(args) -> tuple[list[str], list, int, int, dict]:
    """Every argument checked before torch or diffusers is imported: (prompts, jobs, width, height,
    sampling values)."""
    from ..errors import ZoptError
    from ..runtime.attention import ATTENTION
    from ..runtime.offload import MODES
    from ..runtime.pipeline import make_jobs
    from ._args import check_source, parse_seeds, source_defaults

    args.model = args.source or args.model or "tiny"
    check_source(args.model)
    defaults = args.source_defaults = source_defaults(args.model)  # kept for _explain_defaults
    if args.base:
        check_source(args.base)
    if args.offload not in ("auto", *MODES):
        raise ZoptError(f"--offload {args.offload!r}: choose auto or one of {', '.join(MODES)}")
    if args.attention != "auto" and args.attention not in ATTENTION:
        from ..formats.outputs import _suggest

        raise ZoptError(f"--attention {args.attention!r}: unknown kernel"
                        f"{_suggest(args.attention, {a: a for a in ATTENTION})} (zopt doctor lists them)")
    if args.device.split(":")[0] not in ("auto", "cpu", "cuda", "mps", "xpu"):
        raise ZoptError(f"--device {args.device!r}: choose auto, cpu, cuda[:N], mps or xpu")
    given = sampling_args.explicit(args)  # bad sampling values stop here too
    from ..lora.files import LoraSpec

    for spec in args.lora:  # a scale that is not a number or a missing file, before torch
        LoraSpec.parse(spec)
    prompts = list(args.prompt)
    file_seeds: list[int | None] = [None] * len(prompts)
    file_negs: list[str | None] = [None] * len(prompts)
    if args.prompts_file:
        more, seeds, negs = read_prompts_file(args.prompts_file)
        prompts += more
        file_seeds += seeds
        file_negs += negs
    if not prompts:
        prompts = defaults.get("prompts", ["a lighthouse on a cliff at dawn, photograph"])[:1]
        file_seeds, file_negs = [None], [None]
    if args.batch_size < 1:
        raise ZoptError("--batch must be at least 1")
    negatives = [f if f is not None else n
                 for f, n in zip(file_negs, sampling_args.negatives(args.negative_prompt, len(prompts)), strict=True)]
    jobs = make_jobs(prompts, parse_seeds(args.seed), args.images_per_prompt,
                     file_seeds if any(s is not None for s in file_seeds) else None, negatives)
    w, h = parse_resolution(args.resolution or defaults.get("resolution", "256x256"))
    if args.out.lower().endswith(".png") and len(jobs) != 1:
        raise ZoptError(f"-o {args.out} names one image but {len(jobs)} were requested; give a folder")
    return prompts, jobs, w, h, given


def _explain_defaults(args, prompts: list[str], w: int, h: int) -> None:
    """Say which prompt a bare ``zopt generate tiny`` draws, and when a request is outside what a
    built-in model learned (the micro model knows 64 px shapes captions only). Reads the defaults
    :func:`check_args` found."""
    defaults = args.source_defaults
    if not defaults:
        return
    import sys

    def warn(text: str) -> None:
        print(f"zopt: warning: {text}", file=sys.stderr)

    if not args.prompt and not args.prompts_file:
        print(f"prompt: {prompts[0]!r} (the default for {args.model}; --prompt to choose)")
    if "prompts" in defaults:
        from ..families.zimage.micro.shapes import parse_caption

        def known(text: str) -> bool:
            try:
                parse_caption(text)
            except ValueError:
                return False
            return True

        if not all(known(p) for p in prompts):
            warn(f"{args.model} only learned shapes captions such as {defaults['prompts'][0]!r} "
                 "(docs/micro.md); other prompts give coloured blobs")
    if "resolution" in defaults and f"{w}x{h}" != defaults["resolution"]:
        warn(f"{args.model} learned {defaults['resolution']} images; at {w}x{h} it repeats or stretches them")


def run(args) -> int:
    import os
    import shutil
    import sys
    import warnings

    from ..progress import note

    prompts, jobs, w, h, given = check_args(args)
    if args.compile is not None:  # the loaders read the switch (ZOPT_COMPILE) when they build the model
        os.environ["ZOPT_COMPILE"] = "1" if args.compile else "0"
    note(f"generating {len(jobs)} image{'s' * (len(jobs) != 1)} with {args.model}: loading torch and the pipeline")
    _explain_defaults(args, prompts, w, h)
    import torch

    from ..progress import progress_bar
    from ..runtime import pipeline as P
    from ..runtime import sampling as S

    sampling, _ = S.resolve_for(args.model, args.base, args.preset, **given)
    dtype = None if args.dtype == "auto" else {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    single = args.out.lower().endswith(".png")
    out_dir = Path(args.out).parent / (".zopt-gen-" + Path(args.out).stem) if single else Path(args.out)
    pipe, choice = P.prepare(args.model, device=args.device, offload=args.offload, attention=args.attention,
                             backend=args.backend, dtype=dtype, base=args.base, width=w, height=h,
                             batch=min(args.batch_size, len(jobs)), disk_dir=out_dir / ".offload",
                             text_encoder=args.text_encoder, vae_tiling=args.vae_tiling, guidance=sampling.guidance,
                             loras=args.lora, allow_pickle=args.allow_pickle)
    print(f"{choice.format} via {choice.backend} on {choice.device} ({choice.dtype}); offload {choice.offload}: "
          f"{choice.offload_reason}; text encoder {choice.text_encoder}; attention {choice.attention}")
    print(f"sampling: {sampling.preset or 'default'} preset, {sampling.steps} steps, guidance {sampling.guidance:g}"
          + (f", cfg normalization {sampling.cfg_normalization:g}" if sampling.cfg and sampling.cfg_normalization else "")
          + (f", cfg truncation {sampling.cfg_truncation:g}" if sampling.cfg and sampling.cfg_truncation < 1 else ""))
    req = P.GenerateRequest.from_sampling(sampling, prompts, sorted({j[1] for j in jobs}), height=h, width=w,
                                          batch_size=args.batch_size, jobs=jobs)
    calls = -(-len(jobs) // max(1, args.batch_size))
    with progress_bar(calls * sampling.steps, "generate", unit="steps", enabled=not args.no_progress) as bar, \
            warnings.catch_warnings():  # sampling warnings (Turbo with guidance, a cut prompt) as one line each
        def step(pipe, i, t, kw):  # diffusers' callback_on_step_end: one call per denoising step
            bar.advance(1)
            return kw

        warnings.simplefilter("always", S.SamplingWarning)
        shown = warnings.showwarning
        warnings.showwarning = lambda message, category, *a, **k: (
            print(f"zopt: warning: {message}", file=sys.stderr) if issubclass(category, S.SamplingWarning)
            else shown(message, category, *a, **k))
        meta = {"model": str(args.model)}
        if args.lora:
            from ..lora import lora_info

            meta["loras"] = list(lora_info(pipe.transformer).values())
        results = P.run(pipe, req, out_dir, extra_meta=meta, callback=step)
    shutil.rmtree(out_dir / ".offload", ignore_errors=True)
    if single:
        os.replace(results[0].path, args.out)
        os.replace(results[0].path.with_suffix(".json"), Path(args.out).with_suffix(".json"))
        shutil.rmtree(out_dir, ignore_errors=True)
        print(f"wrote {args.out} ({results[0].seconds:.2f} s)")
    else:
        for r in results:
            print(f"wrote {r.path} ({r.seconds:.2f} s)")
    return 0
