"""zopt plan: how the whole pipeline fits this machine (or a simulated one), fastest first."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--vram", default=None, help="device memory budget, e.g. 8GB (default: this machine's free memory)")
    p.add_argument("--resolution", default="1024x1024", help="WxH (default 1024x1024)")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass")
    p.add_argument("--steps", type=int, default=8, help="denoising steps to time (default 8, Turbo)")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="CFG scale (> 0 runs prompt and negative prompt as one batch: twice the work and activations)")
    p.add_argument("--cfg-truncation", type=float, default=1.0, metavar="T",
                   help="guidance stops on steps whose normalized time exceeds T (default 1: every step guided)")
    p.add_argument("--text-tokens", type=int, default=512, help="prompt tokens to plan for (default: the 512 maximum)")
    p.add_argument("--prefer", default="speed", choices=["speed", "quality"],
                   help="speed: fastest that fits (quality breaks near-ties); quality: best format that fits")
    p.add_argument("--approximate", action="store_true",
                   help="also recommend kernels that quantize activations (fp8 scaled-mm, int-mm)")
    p.add_argument("--hardware", default=None, metavar="NAME",
                   help="plan for a simulated machine (`--hardware list` prints their names); --vram overrides its memory")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    if args.hardware == "list":
        from ..platform.fakes import PROFILES

        for name, hw in PROFILES.items():
            print(f"{name:24s} {hw.device_name}")
        return 0
    import json

    from ..errors import ZoptError
    from ..platform.fakes import fake
    from ..runtime import detect, planner
    from ..runtime.costs import fmt_seconds
    from ..runtime.sampling import check
    from .generate import parse_resolution

    w, h = parse_resolution(args.resolution)
    if args.batch < 1 or args.steps < 1:
        raise ZoptError("--batch and --steps must be at least 1")
    check(guidance=args.guidance, cfg_truncation=args.cfg_truncation)
    base = fake(args.hardware) if args.hardware else None
    if args.vram:
        hw = planner.budget_hardware(planner.parse_size(args.vram), base)
    else:
        hw = base or detect()
    p = planner.plan(hw, w, h, args.batch, args.text_tokens, steps=args.steps, guidance=args.guidance,
                     prefer=args.prefer, approximate=args.approximate, cfg_truncation=args.cfg_truncation)
    if args.json:
        print(json.dumps(p.to_dict(), indent=1))
        return 0
    gib = 1024**3
    print(f"plan for {hw.device} ({hw.device_name}), {max(p.budget, 0) / gib:.1f} GiB usable, {w}x{h}, batch {args.batch}, "
          f"{args.steps} steps, {p.dtype}: {p.shape.image_tokens} image + {p.shape.text_tokens} text tokens")
    if args.guidance > 0:
        print(f"guidance {args.guidance:g}: {p.cfg_steps} of {args.steps} steps guided (prompt and negative prompt "
              "batched: twice the work and activations)")
    print(f"attention: {p.attention_reason.split(' (not ')[0]}")
    r = p.recommended
    if r is None:
        print(f"recommended: none. {p.reason[0].upper()}{p.reason[1:]}")
    else:
        te = "" if r.text_encoder == "device" else f" --text-encoder {r.text_encoder}"
        print(f"recommended: --to {r.spec} --backend {r.backend or 'auto'} --offload {r.offload}{te}"
              f"{' --vae-tiling' if r.vae_tiling else ''}")
        print(f"  {p.reason}; predicted {fmt_seconds(r.step_s)}/step, {fmt_seconds(r.image_s)}/image")
    print(f"\n  {'format':<12} {'weights':>8} {'peak':>7}  {'offload':<12} {'text enc.':<9} {'step':>8} {'image':>8}  note")
    for row in p.rows:
        print(f"  {row.spec:<12} {row.weights_bytes / gib:>7.1f}G {row.device_bytes / gib:>6.1f}G  "
              f"{row.offload or 'no fit':<12} {row.text_encoder or '-':<9} "
              f"{fmt_seconds(row.step_s) if row.step_s else '-':>8} {fmt_seconds(row.image_s) if row.image_s else '-':>8}"
              f"  {row.backend or ''} {row.note}")
    return 0
