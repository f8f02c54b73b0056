"""zopt generate: images from any variant, with a metadata sidecar per image."""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--model", default="tiny", help="'tiny', a diffusers folder, a .gguf file or a zopt artifact folder")
    p.add_argument("--base", default=None, help="pipeline folder supplying text encoder, tokenizer and VAE")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeat for several)")
    p.add_argument("--prompts-file", default=None, help="text file, one prompt per line")
    p.add_argument("--seed", action="append", type=int, default=[], help="seed (repeat for several; default 0)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--resolution", default="256x256", help="WxH")
    p.add_argument("--guidance", type=float, default=0.0, help="CFG scale (Turbo: 0)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--backend", default=None, help="kernel backend for the format (default: auto)")
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


def resolve_device(name: str) -> str:
    if name != "auto":
        return name
    from ..runtime.hardware import detect

    return detect().torch_device


def run(args) -> int:
    import os
    import shutil

    import torch

    from ..errors import ZoptError
    from ..runtime import pipeline as P

    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            prompts += [ln.strip() for ln in Path(args.prompts_file).read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise ZoptError(f"cannot read prompts file ({e.strerror})", args.prompts_file) from None
    prompts = prompts or ["a lighthouse on a cliff at dawn, photograph"]
    w, h = parse_resolution(args.resolution)
    device = resolve_device(args.device)
    dtype = None if args.dtype == "auto" else {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    pipe = P.build_pipeline(args.model, device=device, dtype=dtype, base=args.base, backend=args.backend)
    req = P.GenerateRequest(prompts=prompts, seeds=args.seed or [0], steps=args.steps, height=h, width=w,
                            guidance_scale=args.guidance, batch_size=args.batch_size)
    single = args.out.lower().endswith(".png")
    out_dir = Path(args.out).parent / (".zopt-gen-" + Path(args.out).stem) if single else Path(args.out)
    meta = {"model": str(args.model), "device": device}
    results = P.run(pipe, req, out_dir, extra_meta=meta)
    if single:
        if len(results) != 1:
            raise ZoptError(f"-o {args.out} names one image but {len(results)} were requested; give a folder")
        os.replace(results[0].path, args.out)
        os.replace(results[0].path.with_suffix(".json"), Path(args.out).with_suffix(".json"))
        shutil.rmtree(out_dir, ignore_errors=True)
        print(f"wrote {args.out} ({results[0].seconds:.2f} s)")
    else:
        for r in results:
            print(f"wrote {r.path} ({r.seconds:.2f} s)")
    return 0
