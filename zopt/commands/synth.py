"""zopt synth: write a seeded synthetic Z-Image checkpoint (original layout, bf16), streaming."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--size", default="full", choices=["full", "medium", "tiny"],
                   help="full: 6,154,908,736 params (12.3 GB); medium: dim 1536, 8 layers; tiny")
    p.add_argument("-o", "--out", required=True, help="output .safetensors file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="", help="key prefix, e.g. 'model.diffusion_model.' (ComfyUI style)")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from ..progress import note

    note(f"writing a {args.size} synthetic checkpoint to {args.out}" + (" (12.3 GB)" if args.size == "full" else ""))
    from ..families import DEFAULT, get

    out = get(DEFAULT).write_synthetic(args.out, size=args.size, seed=args.seed, prefix=args.prefix,
                          progress=not args.no_progress)
    print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB)")
    return 0
