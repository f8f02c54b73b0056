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
    p.add_argument("--save-calls", default=None, metavar="FILE",
                   help="also write the transformer calls it ran (latents, timesteps, caption features; safetensors) "
                        "for 'zopt convert --to gguf:... --option calls=FILE', which then measures each tensor's "
                        "sensitivity on the model's output (one run per call and tensor; per call, tensor and "
                        "candidate type with calls_types=all: keep it to a few prompts; the 8 built-in prompts x 8 "
                        "steps make 64 calls)")
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
    calls_out = Path(args.save_calls) if args.save_calls else None
    if calls_out is not None:
        if calls_out.is_dir():
            raise ZoptError("is a folder; name the calls file", calls_out)
        if calls_out.exists() and not args.force:
            raise ZoptError("exists; pass --force to replace it", calls_out)
        if calls_out.resolve() == out.resolve():
            raise ZoptError("name a calls file apart from the imatrix", calls_out)
    prompts = read_prompts(args.prompts)
    calls: list | None = [] if calls_out is not None else None
    im = calibrate(args.source, prompts, steps=args.steps, resolution=args.resolution, seed=args.seed,
                   device=args.device, inputs=args.inputs, base=args.base, calls=calls)
    if calls_out is not None:
        from ..formats.gguf.outputs import save_calls

        save_calls(calls, calls_out, im.datasets[0])
    try:
        write(im, out)
    except BaseException:
        if calls_out is not None:
            calls_out.unlink(missing_ok=True)  # both files or neither
        raise
    print(f"wrote {out}: {len(im.entries)} matrices, {im.datasets[0]}")
    if calls_out is not None:
        print(f"wrote {calls_out}: {len(calls)} transformer calls")
    return 0
