"""zopt generate: images from any variant, with a metadata sidecar per image."""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--model", default="tiny", help="'tiny', a diffusers folder, a .gguf file or a zopt artifact folder")
    p.add_argument("--base", default=None, help="pipeline folder supplying text encoder, tokenizer and VAE")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeat for several)")
    p.add_argument("--prompts-file", default=None,
                   help="one prompt per line, or JSON lines {\"prompt\": ..., \"seed\": ...} for per-prompt seeds")
    p.add_argument("--seed", action="append", type=int, default=[],
                   help="seed; repeat to give one per prompt (a single seed applies to all; default 0)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="N images per prompt, seeds s, s+1, ...")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--resolution", default="256x256", help="WxH")
    p.add_argument("--guidance", type=float, default=0.0, help="CFG scale (Turbo: 0)")
    p.add_argument("--batch-size", type=int, default=1)
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


def read_prompts_file(path: str) -> tuple[list[str], list[int | None]]:
    """Prompts (and optional per-prompt seeds) from a text or JSON-lines file."""
    import json

    from ..errors import ZoptError

    try:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ZoptError(f"cannot read prompts file ({getattr(e, 'strerror', None) or e})", path) from None
    prompts, seeds = [], []
    for i, ln in enumerate(lines, 1):
        if ln.startswith("{"):
            try:
                obj = json.loads(ln)
                prompts.append(str(obj["prompt"]))
                seeds.append(None if obj.get("seed") is None else int(obj["seed"]))
            except (ValueError, KeyError, TypeError):
                raise ZoptError(f"line {i} is not a JSON object with a \"prompt\" (and optional \"seed\")",
                                path) from None
        else:
            prompts.append(ln)
            seeds.append(None)
    return prompts, seeds


def run(args) -> int:
    import os
    import shutil

    import torch

    from ..errors import ZoptError
    from ..runtime import pipeline as P

    prompts = list(args.prompt)
    file_seeds: list[int | None] = [None] * len(prompts)
    if args.prompts_file:
        more, seeds = read_prompts_file(args.prompts_file)
        prompts += more
        file_seeds += seeds
    if not prompts:
        prompts, file_seeds = ["a lighthouse on a cliff at dawn, photograph"], [None]
    if args.batch_size < 1 or args.steps < 1:
        raise ZoptError("--batch-size and --steps must be at least 1")
    jobs = P.make_jobs(prompts, args.seed, args.images_per_prompt,
                       file_seeds if any(s is not None for s in file_seeds) else None)
    w, h = parse_resolution(args.resolution)
    dtype = None if args.dtype == "auto" else {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    single = args.out.lower().endswith(".png")
    if single and len(jobs) != 1:
        raise ZoptError(f"-o {args.out} names one image but {len(jobs)} were requested; give a folder")
    out_dir = Path(args.out).parent / (".zopt-gen-" + Path(args.out).stem) if single else Path(args.out)
    pipe, choice = P.prepare(args.model, device=args.device, offload=args.offload, attention=args.attention,
                             backend=args.backend, dtype=dtype, base=args.base, width=w, height=h,
                             batch=min(args.batch_size, len(jobs)), disk_dir=out_dir / ".offload",
                             text_encoder=args.text_encoder, vae_tiling=args.vae_tiling, guidance=args.guidance,
                             loras=args.lora, allow_pickle=args.allow_pickle)
    print(f"{choice.format} via {choice.backend} on {choice.device} ({choice.dtype}); offload {choice.offload}: "
          f"{choice.offload_reason}; text encoder {choice.text_encoder}; attention {choice.attention}")
    from .._compile import enabled

    if choice.backend == "int-mm-cpu" and choice.format == "gguf" and enabled():
        print("compiling the transformer blocks during the first step (10-20 s once; ZOPT_COMPILE=0 skips it)")
    req = P.GenerateRequest(prompts=prompts, seeds=sorted({s for _, s in jobs}), steps=args.steps, height=h,
                            width=w, guidance_scale=args.guidance, batch_size=args.batch_size, jobs=jobs)
    meta = {"model": str(args.model)}
    if args.lora:
        from ..lora import lora_info

        meta["loras"] = list(lora_info(pipe.transformer).values())
    results = P.run(pipe, req, out_dir, extra_meta=meta)
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
