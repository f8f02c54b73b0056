"""zopt calibrate SOURCE -o model.imatrix: per-channel activation statistics of every Linear."""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("source", help="checkpoint or embedded model name (micro, tiny, a diffusers folder, .safetensors)")
    p.add_argument("-o", "--out", required=True, help="output imatrix file (llama.cpp's GGUF imatrix format)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="calibration prompts, one per line "
                   "(default: 8 built-in captions)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per prompt: each is another timestep")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--inputs", default="auto", choices=["auto", "pipeline", "random"],
                   help="pipeline: prompts through the text encoder; random: seeded random latents and caption "
                        "features (a bare transformer); auto: pipeline when a text encoder and VAE go with the model")
    p.add_argument("--base", default=None, help="pipeline folder supplying text encoder and VAE")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def run(args) -> int:
    from ..errors import ZoptError
    from ..formats.imatrix import write
    from ..runtime.calibrate import calibrate, read_prompts

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ZoptError("exists; pass --force to replace it", out)
    if out.is_dir():
        raise ZoptError("is a folder; name the imatrix file", out)
    prompts = read_prompts(args.prompts)
    im = calibrate(args.source, prompts, steps=args.steps, resolution=args.resolution, seed=args.seed,
                   device=args.device, inputs=args.inputs, base=args.base)
    write(im, out)
    print(f"wrote {out}: {len(im.entries)} matrices, {im.datasets[0]}")
    return 0
