"""zopt bench: sweep formats x backends on this machine; table, JSON records, HTML report, CI gate."""

from __future__ import annotations

from pathlib import Path

from . import sampling_args


def add_arguments(p) -> None:
    p.add_argument("source", nargs="?", default="tiny",
                   help="checkpoint to benchmark: 'tiny' (embedded default), a diffusers folder, a file or hub id")
    p.add_argument("--formats", default="all",
                   help="comma-separated format specs (e.g. bf16,fp8,gguf:Q4_K_M) or 'all' (every format that can "
                        "run here; gguf as Q8_0, Q4_K_M and Q2_K)")
    p.add_argument("--backend", default="auto",
                   help="'auto' (best per format), 'all' (every backend that can run here), a name, or FORMAT=NAME "
                        "pairs, comma separated")
    p.add_argument("--resolution", default=None,
                   help="WxH (default 256x256; 64x64 for the embedded tiny/micro model, what it learned)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="text file, one prompt per line (default: 2 built-in; 4 held-out shapes captions "
                        "for the embedded tiny/micro model, scored for prompt adherence)")
    p.add_argument("--seeds", nargs="+", default=["0"], help="seeds, e.g. --seeds 0 1 or --seeds 0,1 (default 0)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes over all prompts x seeds (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed images before timing (default 1)")
    sampling_args.add_arguments(p, steps_default="4 unless --preset turbo|base is given")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--offload", default="none",
                   help="offload modes to run each variant with, comma separated (none, model, group, group-stream, "
                        "sequential, disk); each is a separate record")
    p.add_argument("--attention", default="auto", help="attention kernels, comma separated (auto, native, flash...)")
    p.add_argument("--reference-offload", default="auto",
                   help="offload mode of the reference run (auto: whatever fits, so a 16 GB card can run bf16)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: torch's choice); 1 on a shared machine, with the "
                        "cpu_latency gate")
    p.add_argument("--base", default=None,
                   help="pipeline folder or owner/name[@rev] supplying text encoder, tokenizer and VAE")
    p.add_argument("--option", action="append", default=[], metavar="K=V", help="conversion option for every format")
    p.add_argument("--reconvert", action="store_true", help="convert again instead of using cached conversions")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per run before it is stopped")
    p.add_argument("-o", "--out", default="exports/bench", help="output folder (records/, images/, logs/, "
                   "results.json, report.html; default exports/bench)")
    p.add_argument("--results", default=None, metavar="FILE",
                   help="do not run: read records from FILE (results.json, a record or a folder) for the table, "
                        "report and gate")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument("--wide", action="store_true",
                   help="every column in the results table (default: the ones that fit 100 columns)")
    p.add_argument("--baseline", default=None, metavar="OLD.json",
                   help="compare with these records and exit 3 if a metric regressed (4 if nothing is comparable)")
    p.add_argument("--against", default=None, metavar="DIR",
                   help="a checkout of the baseline code (a folder holding its zopt package): every run also runs "
                        "with that code, both loaded and taking images in turns, and the gate compares the two "
                        "(exit 3 on a regression); baseline records go to OUT/baseline")
    p.add_argument("--max-regression", default=None, metavar="LIMITS",
                   help="e.g. 'latency=10%%,memory=5%%,psnr=0.5dB' (the default with --baseline); metrics: latency, "
                        "latency_p90, cpu_latency, image_latency, memory, load, size, psnr, ssim, lpips, rel_l2, cosine, latent_err")


def _prompts(path: str | None) -> list[str] | None:
    from ..errors import ZoptError

    if not path:
        return None
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ZoptError(f"cannot read prompts file ({getattr(e, 'strerror', None) or e.__class__.__name__})",
                        path) from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise ZoptError("prompts file has no prompts (one per line)", path)
    return prompts


def _seeds(items: list[str]) -> list[int]:
    from ._args import parse_seeds

    return parse_seeds(items)


def check_formats(formats: str) -> list[str]:
    """Every spec of ``--formats`` checked (did-you-mean included) before the reference run."""
    from ..bench.harness import expand_formats
    from ..formats.outputs import check_spec

    specs = expand_formats([formats])
    for spec in specs:
        check_spec(spec)
    return specs


def check_runtime(offload: list[str], attention: list[str], reference_offload: str) -> None:
    """Offload modes and attention kernels are known names (availability is the sweep's business)."""
    from ..errors import ZoptError
    from ..runtime.attention import ATTENTION
    from ..runtime.offload import MODES

    for mode in [*offload, reference_offload]:
        if mode not in ("auto", *MODES):
            raise ZoptError(f"offload mode {mode!r}: choose auto or one of {', '.join(MODES)}")
    for name in attention:
        if name != "auto" and name not in ATTENTION:
            raise ZoptError(f"--attention {name!r}: unknown kernel (zopt doctor lists them)")


def _list(text: str) -> list[str]:
    from ..errors import ZoptError

    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ZoptError(f"empty list {text!r}")
    return list(dict.fromkeys(items))


def _options(items: list[str]) -> dict[str, str]:
    from ..errors import ZoptError

    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise ZoptError(f"--option {item!r} is not K=V")
        out[k.strip()] = v.strip()
    return out


def run(args) -> int:
    from ..bench import gate as G
    from ..bench.display import print_table
    from ..bench.schema import load_records
    from ..errors import ZoptError
    from .generate import parse_resolution

    given = sampling_args.explicit(args)  # bad values stop here, before a sweep starts
    gating = args.baseline or args.against
    limits = G.parse_limits(args.max_regression or G.DEFAULT_LIMITS) if gating else None
    if args.max_regression and not gating:
        raise ZoptError("--max-regression needs --baseline OLD.json or --against DIR")
    if args.against and (args.baseline or args.results):
        raise ZoptError("--against runs the baseline itself: it goes without --baseline and --results")
    baseline = load_records(args.baseline) if args.baseline else None  # fail before a long sweep
    out = Path(args.out)
    if args.results:
        records = load_records(args.results)
        root = Path(args.results) if Path(args.results).is_dir() else Path(args.results).parent
    else:
        from ._args import check_source, source_defaults

        specs = check_formats(args.formats)
        check_source(args.source)
        if args.base:
            check_source(args.base)
        for name in ("repeats",) + (("threads",) if args.threads is not None else ()):
            if getattr(args, name) < 1:
                raise ZoptError(f"--{name} must be at least 1")
        if args.warmup < 0:
            raise ZoptError("--warmup cannot be negative")
        defaults = source_defaults(args.source)
        w, h = parse_resolution(args.resolution or defaults.get("resolution", "256x256"))
        seeds, offload, attention = _seeds(args.seeds), _list(args.offload), _list(args.attention)
        check_runtime(offload, attention, args.reference_offload)
        prompts = _prompts(args.prompts)
        from ..progress import note

        note(f"bench: {len(specs)} format{'s' * (len(specs) != 1)} of {args.source} -> {out}; "
             "loading torch, then the reference run")
        from ..bench.harness import BenchConfig, sweep
        from ..runtime.sampling import resolve_for

        prompts = prompts or defaults.get("prompts") or list(BenchConfig().prompts)
        negatives = [n or "" for n in sampling_args.negatives(args.negative_prompt, len(prompts))]
        if args.preset == "auto" and given["steps"] is None and given["sigmas"] is None:
            given["steps"] = defaults.get("steps", BenchConfig().steps)  # a few steps time a step as well as many
        s, _ = resolve_for(args.source, args.base, args.preset, **given)
        cfg = BenchConfig(source=args.source, formats=[args.formats], backend=args.backend, steps=s.steps,
                          width=w, height=h, seeds=seeds, repeats=args.repeats, warmup=args.warmup,
                          guidance_scale=s.guidance, negative_prompts=negatives, cfg_normalization=s.cfg_normalization,
                          cfg_truncation=s.cfg_truncation, max_sequence_length=s.max_sequence_length, shift=s.shift,
                          sigmas=list(s.sigmas) if s.sigmas else None, prompts=prompts, device=args.device,
                          base=args.base,
                          options=_options(args.option), out=out, timeout=args.timeout,
                          progress=not args.no_progress, reconvert=args.reconvert,
                          offload=offload, attention=attention,
                          reference_offload=args.reference_offload, threads=args.threads, against=args.against)
        records = sweep(cfg)
        root = out
        if args.against:
            baseline = load_records(out / "baseline" / "results.json")
    print_table(records, wide=args.wide)
    if not args.no_report and records:
        from ..bench.report import write_html

        report = out / "report.html" if not args.results else root / "report.html"
        write_html(records, root, report)
        print(f"report: {report}")
    if not args.results:
        print(f"records: {out / 'results.json'} ({len(records)} runs)")
    if baseline is not None:
        res = G.compare(baseline, records, limits)
        G.print_gate(res)
        return res.exit_code
    ref = next((r for r in records if r["role"] == "reference"), None)
    if not args.results and (ref is None or ref["status"] != "ok"):
        msg = ref.get("message") if ref else "no reference record"
        raise ZoptError(f"the reference run did not succeed ({msg}); see {out / 'logs' / 'reference.log'}")
    return 0
