"""zopt doctor: the hardware at hand and which format runs through which backend (or why not)."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--hardware", default=None, metavar="NAME",
                   help="show a simulated machine instead (cuda-sm80-24gb, cuda-sm89-8gb, cuda-sm90-80gb, "
                        "rocm-mi300x, apple-mps, cpu-only)")


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def run(args) -> int:
    import json

    from ..platform.fakes import fake

    simulated = fake(args.hardware) if args.hardware else None  # an unknown name fails before any output
    if args.json:
        from ..progress import note

        note("detecting hardware and optional packages")
    else:  # the first line, before the slow part (importing torch to ask the device)
        print("hardware" + (f" (simulated: {args.hardware})" if args.hardware else ""), flush=True)
    from ..runtime import detect
    from ..runtime.matrix import attention_report, format_report

    hw = simulated or detect()
    dtype = "fp32" if hw.device == "cpu" else "bf16"
    formats, attention = format_report(hw), attention_report(hw, dtype)
    if args.json:
        print(json.dumps({"hardware": hw.to_dict(), "simulated": bool(args.hardware), "formats": formats,
                          "attention": attention}, indent=1))
        return 0
    cc = ".".join(map(str, hw.compute_capability)) if hw.compute_capability else None
    rows = [
        ("device", f"{hw.device}: {hw.device_name}"),
        ("compute", f"compute capability {cc}" if cc else (hw.arch or "-")),
        ("memory", f"{_gib(hw.free_memory)} free of {_gib(hw.total_memory)}"),
        ("system RAM", f"{_gib(hw.system_free)} free of {_gib(hw.system_memory)}" if hw.system_memory else "-"),
        ("matmul", ", ".join(k for k, v in (("bf16", hw.bf16), ("fp16", hw.fp16), ("fp8", hw.fp8_matmul),
                                             ("int8", hw.int8_matmul)) if v)),
        ("CPU", f"{hw.cores} cores, {', '.join(hw.isa()) or 'no SIMD flags found'}"
                + (f"; torch kernels: {hw.cpu_capability}" if hw.cpu_capability else "")),
        ("torch", hw.torch_version or "-"),
        ("packages", ", ".join(f"{k} {v}" for k, v in sorted(hw.packages.items())) or "none of the optional ones"),
        ("onnxruntime", ", ".join(hw.ort_providers) or "not installed"),
    ]
    for k, v in rows:
        print(f"  {k:<12} {v}")
    print("\nformats (selected backend first)")
    for fmt, e in formats.items():
        if e["status"] != "ok":
            print(f"  {fmt:<10} — {e['status']}")
            continue
        head = f"-> {e['selected']}" if e["selected"] else "cannot run here"
        print(f"  {fmt:<10} {head}")
        for b in e["backends"]:
            mark = "ok " if b["available"] else "no "
            why = "" if b["available"] else ": " + "; ".join(b["missing"])
            print(f"      {mark} {b['name']}{why}")
    print(f"\nattention ({dtype}): auto -> {attention['auto']}")
    for name, a in attention["backends"].items():
        why = "available" if a["available"] else "; ".join(a["missing"])
        print(f"      {'ok ' if a['available'] else 'no '} {name}: {why}")
    return 0
