"""zopt plan: which format, offload mode and attention kernel fit a memory budget."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--vram", default=None, help="device memory budget, e.g. 8GB (default: this machine's free memory)")
    p.add_argument("--resolution", default="1024x1024", help="WxH (default 1024x1024)")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass")
    p.add_argument("--text-tokens", type=int, default=512, help="prompt tokens to plan for (default: the 512 maximum)")
    p.add_argument("--hardware", default=None, metavar="NAME",
                   help="plan for a simulated machine (see zopt doctor --help); --vram overrides its memory")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    import json

    from ..errors import ZoptError
    from ..platform.fakes import fake
    from ..runtime import detect, planner
    from .generate import parse_resolution

    w, h = parse_resolution(args.resolution)
    if args.batch < 1:
        raise ZoptError("--batch must be at least 1")
    base = fake(args.hardware) if args.hardware else None
    if args.vram:
        hw = planner.budget_hardware(planner.parse_size(args.vram), base)
    else:
        hw = base or detect()
    p = planner.plan(hw, w, h, args.batch, args.text_tokens)
    if args.json:
        print(json.dumps(p.to_dict(), indent=1))
        return 0
    gib = 1024**3
    print(f"plan for {hw.device} ({hw.device_name}), {p.budget / gib:.1f} GiB usable, {w}x{h}, batch {args.batch}: "
          f"{p.shape.image_tokens} image + {p.shape.text_tokens} text tokens")
    print(f"attention: {p.attention_reason.split(' (not ')[0]}")
    r = p.recommended
    if r is None:
        print("recommended: nothing fits this budget, even with sequential offload")
    else:
        print(f"recommended: --to {r.spec} --offload {r.offload}  (peak {r.device_bytes / gib:.1f} GiB, "
              f"transformer {r.weights_bytes / gib:.1f} GiB{', backend ' + r.backend if r.backend else ''})")
    print(f"\n  {'format':<12} {'weights':>8} {'peak':>8}  offload       note")
    for row in p.rows:
        print(f"  {row.spec:<12} {row.weights_bytes / gib:>7.1f}G {row.device_bytes / gib:>7.1f}G  "
              f"{row.offload or 'does not fit':<13} {row.note}")
    return 0
