"""Rate-distortion of zopt's GGUF files: size, bits per weight and output error, per type and budget.

On one source and one set of inputs, converts the source to every requested ``gguf:TYPE`` (uniform
types and recipes), to ``gguf:auto`` at each ``--auto`` budget (bits per parameter, whole file),
each with and without ``--imatrix`` (and, with ``--calls``, the measured ones with their
sensitivity measured on the model's output; with ``--weights``, with each tensor's weight errors
alone instead of the default gradient gains); loads each file with zopt's exact ``torch-dequant`` backend in
float32 and measures the relative output error ``||out - ref|| / ||ref||`` of the transformer
against the source in float32, summed over fixed inputs at two timesteps. With ``--adherence N``
(the micro model) it also generates N held-out shapes prompts through the pipeline and scores
prompt adherence. stable-diffusion.cpp's converter joins as a peer when
``stable_diffusion_cpp`` imports (``--peer``). Prints a markdown table, writes ``--json`` and a
``--plot`` (error against bits per weight).

Usage::

    python benchmarks/rate_distortion.py SOURCE [--imatrix FILE] [--calls FILE] [--types Q4_K,Q3_K]
        [--auto 2.5,3.5,4.5] [--option min_elements=0] [--quantize .] [--adherence 24]
        [--json out.json] [--plot out.png] [--work DIR] [--peer] [--ref-dtype bfloat16]

``SOURCE``: a checkpoint (``zopt synth --size medium -o medium.safetensors``) or ``micro``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1",
                 "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
DEFAULT_AUTO = (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.5, 8.5)


def make_inputs(config: dict, latent: int = 16, cap_tokens: int = 32, seed: int = 1234):
    """Fixed transformer inputs: seeded latents and caption features at timesteps 0.3 and 0.7."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(config["in_channels"], 1, latent, latent, generator=g)]
    cap = [torch.randn(cap_tokens, config["cap_feat_dim"], generator=g)]
    return [(x, torch.tensor([t]), cap) for t in (0.3, 0.7)]


def pipeline_inputs(source: str, model, n: int, steps: int = 8, size: int = 64) -> list:
    """The transformer's inputs while ``model`` generates ``n`` shapes captions (seeds apart from the
    adherence prompts') through the source's pipeline: ``steps`` calls per image, the latents,
    timesteps and caption features the model sees in use (a trained model's outputs on random
    caption features say little about its outputs in use)."""
    import copy

    from zopt.families.zimage.micro.adherence import held_out_prompts
    from zopt.runtime.pipeline import GenerateRequest, build_pipeline, run

    calls = []

    def grab(_mod, args, kwargs):
        kw = {k: v for k, v in kwargs.items() if k != "return_dict"}
        calls.append(copy.deepcopy((args, kw)))

    pipe = build_pipeline(source, device="cpu", dtype=torch.float32, transformer=model)
    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run(pipe, GenerateRequest(prompts=held_out_prompts(n, seed=2_000_000), seeds=[0], steps=steps,
                                      height=size, width=size), tmp)
    finally:
        handle.remove()
    return calls


def _cast(v, dtype):
    if isinstance(v, torch.Tensor):
        return v.to(dtype) if v.is_floating_point() else v
    if isinstance(v, (list, tuple)):
        return type(v)(_cast(x, dtype) for x in v)
    if isinstance(v, dict):
        return {k: _cast(x, dtype) for k, x in v.items()}
    return v


def outputs(model, inputs, dtype=None) -> list[torch.Tensor]:
    """The model's outputs (float32) on ``inputs``: (x, t, cap) triples, or (args, kwargs) pairs
    from :func:`pipeline_inputs`; ``dtype`` casts the floating inputs (a BF16 reference)."""
    outs = []
    with torch.inference_mode():
        for item in inputs:
            args, kw = (item, {}) if len(item) == 3 else item
            if dtype is not None:
                args, kw = _cast(args, dtype), _cast(kw, dtype)
            out = model(*args, **kw, return_dict=False)[0]
            outs.append(torch.cat([o.float().flatten() for o in out]) if isinstance(out, (list, tuple))
                        else out.float())
    return outs


def rel_err(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    num = sum(float((o - r).square().sum()) for o, r in zip(outs, refs, strict=True))
    den = sum(float(r.square().sum()) for r in refs)
    return math.sqrt(num / den)


def adherence(source: str, model, n: int) -> dict | None:
    """Prompt adherence (colour, shape, position, size and their mean) of ``n`` held-out shapes
    prompts generated with ``model`` (micro only)."""
    from zopt.families.zimage.micro.adherence import held_out_prompts, prompt_adherence
    from zopt.runtime.pipeline import GenerateRequest, build_pipeline, run

    prompts = held_out_prompts(n)
    pipe = build_pipeline(source, device="cpu", dtype=torch.float32, transformer=model)
    with tempfile.TemporaryDirectory() as tmp:
        res = run(pipe, GenerateRequest(prompts=prompts, seeds=[0], steps=8, height=64, width=64), tmp)
        from PIL import Image

        images = [Image.open(r.path).convert("RGB") for r in res]
        acc = prompt_adherence(images, prompts)
    return acc


def measure(source, spec: str, options: dict, path: Path, refs, inputs, params: int, adh: int, label: str) -> dict:
    from zopt.formats import convert

    t0 = time.perf_counter()
    convert(source, spec, path, options={"hash_source": False, **options}, progress=False, force=True)
    return file_row(source, path, label, spec, time.perf_counter() - t0, refs, inputs, params, adh,
                    bool(options.get("imatrix")))


def file_row(source, path: Path, label: str, spec: str, conv_s: float, refs, inputs, params: int, adh: int,
             imatrix: bool = False) -> dict:
    """One GGUF file's point, printed as a JSON line: loaded with zopt's exact ``torch-dequant``
    backend in float32, its size and output error on ``inputs`` (and adherence with ``adh``)."""
    from zopt.formats import load

    model = load(path, device="cpu", dtype=torch.float32, backend="torch-dequant")
    size = path.stat().st_size
    row = {"label": label, "spec": spec, "file": str(path), "imatrix": imatrix, "bytes": size,
           "bpw": round(8 * size / params, 4), "rel_error": round(rel_err(outputs(model, inputs), refs), 6),
           "convert_s": round(conv_s, 1)}
    if adh:
        row["adherence"] = adherence(str(source), model, adh)
    print(json.dumps(row), flush=True)
    return row


SDCPP_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def base_type(t: str) -> str:
    """The GGML type a recipe is built on: Q4_K_M -> Q4_K (stable-diffusion.cpp has no recipes)."""
    t = t.upper()
    return t[:-2] if t.endswith(("_S", "_M", "_L")) else t


def peer_types(types: list[str]) -> list[str]:
    """stable-diffusion.cpp's types for zopt's ``types`` (one per base type); every type of its
    converter when no zopt type is asked for."""
    out = []
    for t in types or SDCPP_TYPES:
        base = base_type(t)
        if base in SDCPP_TYPES and base not in out:
            out.append(base)
    return out


def peer_file(source) -> Path | None:
    """The one safetensors file stable-diffusion.cpp's converter reads: the source itself or the
    single file of a diffusers ``transformer/`` folder."""
    p = Path(source)
    if p.is_file():
        return p
    folder = p / "transformer" if (p / "transformer").is_dir() else p
    files = sorted(folder.glob("*.safetensors"))
    return files[0] if len(files) == 1 else None


def sdcpp_convert(src: Path, out: Path, t: str, log: Path, rules: str = "") -> bool:
    """stable-diffusion.cpp's converter (``sd -M convert``; ``rules``: its ``--tensor-type-rules``,
    ``regex=type,...``) in a child process, its output sent to ``log``: a failed assertion in the
    C code (its converter sizes its buffers by the base type, so a rule that raises a tensor's type
    aborts it) ends that process, not the benchmark."""
    import subprocess

    code = ("import sys; from stable_diffusion_cpp import stable_diffusion_cpp as sd; "
            "a = sys.argv[1:]; "
            # the C API: convert(input, vae, output, sd_type_t, tensor_type_rules, convert_name)
            "sys.exit(0 if sd.convert(a[0].encode(), b'', a[1].encode(), int(getattr(sd.GGMLType, 'SD_TYPE_' + a[2])), "
            "a[3].encode(), False) else 1)")
    with open(log, "ab") as f:
        done = subprocess.run([sys.executable, "-c", code, str(src), str(out), t, rules], stdout=f, stderr=f)
    if done.returncode != 0:
        out.unlink(missing_ok=True)
    return done.returncode == 0 and out.exists()


def peer_points(source, types, refs, inputs, params: int, work: Path, adh: int,
                mixes: list[str] = (), plain: bool = True) -> list[dict]:
    """stable-diffusion.cpp's converter (stable-diffusion-cpp-python) at each type, and at each of
    ``mixes`` (``TYPE:regex=type,...``: a base type with its tensor type rules), loaded by zopt with
    the same backend and inputs as zopt's own files."""
    try:
        import stable_diffusion_cpp  # noqa: F401
    except (ImportError, OSError) as e:
        print(f"stable-diffusion-cpp-python is not usable here ({e}): no peer points")
        return []

    src = peer_file(source)
    if src is None:
        print(f"{source}: stable-diffusion.cpp's converter reads one safetensors file; none found: no peer points")
        return []
    rows = []
    jobs = [(t, "") for t in peer_types(types) if plain] + [tuple(m.split(":", 1)) for m in mixes]
    for t, rules in jobs:
        t = t.upper()
        tag = hashlib.sha256(rules.encode()).hexdigest()[:8]  # one file per rule set, whichever run made it
        out = work / (f"sdcpp-{t}.gguf" if not rules else f"sdcpp-{t}-{tag}.gguf")
        t0 = time.perf_counter()
        try:
            ok = sdcpp_convert(src, out, t, work / "sdcpp.log", rules)
        except Exception as e:  # another package version (a type it lacks): keep the measured points
            print(f"sd.cpp {t}: {type(e).__name__}: {e}")
            continue
        if not ok:
            print(f"sd.cpp {t}: the converter failed (see {work / 'sdcpp.log'})")
            continue
        rows.append(file_row(source, out, f"sd.cpp {t}" + (f" + {rules}" if rules else ""),
                             f"sdcpp:{t}" + ("+rules" if rules else ""), time.perf_counter() - t0, refs, inputs,
                             params, adh))
    return rows


def reused_peer_points(path: Path, base: dict, ref_dtype: str) -> list[dict]:
    """The peer rows of an earlier ``--json`` output; SystemExit unless it measured the same source
    (parameters, bytes, config) against a reference of the same dtype on the same kind of inputs."""
    try:
        old = json.loads(path.read_text())
        same = all(old.get(k) == json.loads(json.dumps(base[k])) for k in ("params", "ref_bytes", "config")) \
            and old.get("ref_dtype", "float32") == ref_dtype and old.get("inputs", "random") == base.get("inputs", "random")
        rows = [r for r in old["rows"] if r["spec"].startswith("sdcpp:")]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"{path}: not a rate_distortion --json output ({e})") from None
    if not same:
        raise SystemExit(f"{path}: measured another source, reference dtype or inputs; its peer points do not compare")
    if not rows:
        raise SystemExit(f"{path}: has no peer points (run it with --peer)")
    for r in rows:
        print(json.dumps({**r, "reused_from": str(path)}), flush=True)
    return rows


BLOCK32_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
SAME_SIZE = 0.01  # files within 1% of each other's bits count as one size (Q4_0 and Q4_K often are)


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto frontier of (bits, error), by size: the points no file of the same size (within
    :data:`SAME_SIZE`) or smaller beats."""
    hull: list[tuple[float, float]] = []
    for b, e in sorted(set(points)):
        while hull and b <= hull[-1][0] * (1 + SAME_SIZE) and e < hull[-1][1]:
            hull.pop()  # as small, in effect, and better: the smaller file is not the best at this size
        if hull and e >= hull[-1][1]:
            continue  # a file at most this size is at least as good
        hull.append((b, e))
    return hull


def frontier_error(hull: list[tuple[float, float]], bpw: float) -> float | None:
    """The frontier's error at ``bpw``: log-linear between its neighbouring points, its best error
    beyond its largest file, None below its smallest."""
    if not hull or bpw < hull[0][0]:
        return None
    for (x1, e1), (x2, e2) in zip(hull, hull[1:]):
        if x1 <= bpw <= x2:
            return math.exp(math.log(e1) + (math.log(e2) - math.log(e1)) * (bpw - x1) / (x2 - x1))
    return hull[-1][1]


def compare_to_peer(rows: list[dict]) -> list[dict]:
    """For each zopt point: the peer frontier's error at its size and the ratio; prints a table."""
    peer = [(r["bpw"], r["rel_error"]) for r in rows if r["spec"].startswith("sdcpp")]
    if not peer:
        return []
    same = {r["spec"].split(":")[1]: r for r in rows if r["spec"].startswith("sdcpp")}
    hull = frontier(peer)
    # the 32-block types (a legacy type cannot reach a K type's error at its size, the peer's own
    # included): their own frontier, printed beside the verdict, which stays against every file
    hull32 = frontier([(r["bpw"], r["rel_error"]) for r in rows
                       if r["spec"].startswith("sdcpp") and r["spec"].split(":")[1] in BLOCK32_TYPES])
    out = []
    print()
    print("| zopt point | bits/param | rel. output error | peer frontier at that size | ratio | verdict "
          "| peer's same type: bits, error | peer's 32-block files' frontier: error, ratio |")
    print("|---|---:|---:|---:|---:|---|---|---|")
    for r in sorted((r for r in rows if not r["spec"].startswith("sdcpp")), key=lambda r: r["bpw"]):
        pe = frontier_error(hull, r["bpw"])
        if pe is None:  # smaller than every peer file: compare with the smallest one
            ratio = r["rel_error"] / hull[0][1]
            verdict = "at or below (smaller than every peer file)" if ratio <= 1.0 else "no peer file this small"
        else:
            ratio = r["rel_error"] / pe
            verdict = "at or below" if ratio <= 1.0 else "above"
        row = {"label": r["label"], "bpw": r["bpw"], "rel_error": r["rel_error"], "peer_error": pe,
               "ratio": ratio, "verdict": verdict}
        cell = f"{pe:.4f}" if pe is not None else f"({hull[0][1]:.4f} at {hull[0][0]:.3f})"
        s = same.get(base_type(r["spec"].split(":")[1])) if r["spec"] != "gguf:auto" else None
        scell = f"{s['bpw']:.3f}, {s['rel_error']:.4f}" if s else "-"
        bcell = "-"
        if r["spec"] != "gguf:auto" and base_type(r["spec"].split(":")[1]) in BLOCK32_TYPES and hull32:
            pe32 = frontier_error(hull32, r["bpw"]) or hull32[0][1]
            row["peer_block32_error"] = pe32
            bcell = f"{pe32:.4f}, {r['rel_error'] / pe32:.3f}"
        out.append(row)
        print(f"| {r['label']} | {r['bpw']:.3f} | {r['rel_error']:.4f} | {cell} | {ratio:.3f} | {verdict} | {scell} "
              f"| {bcell} |")
    n_ok = sum(o["verdict"].startswith("at or below") for o in out)
    print(f"{n_ok} of {len(out)} zopt points at or below stable-diffusion.cpp's frontier "
          "(error at most the peer's, log-linear between its files, at the same bits per parameter)")
    return out


def predict(source, rows: list[dict], imatrix_path: str | None) -> list[tuple[float, float]]:
    """gguf:auto's predicted error (summed importance-weighted squared error of every tensor at the
    type the file stores it in) for each row's file, against its measured output error; prints
    both and their Spearman rank correlation. Uses ``imatrix_path`` for the weights when given."""
    import gguf

    from zopt import checkpoint
    from zopt.families import zimage
    from zopt.formats.gguf.auto import measure
    from zopt.formats.imatrix import read

    view = zimage.as_original(checkpoint.open(source))
    im = read(imatrix_path) if imatrix_path else None
    types: dict[str, set[str]] = {}
    files = {}
    for r in rows:
        tensors = {t.name: t.tensor_type.name for t in gguf.GGUFReader(r["file"]).tensors}
        files[r["label"]] = tensors
        for n, t in tensors.items():
            if t not in ("F32",) and len(view.info(n).shape) == 2:
                types.setdefault(n, set()).add(t)
    torch.set_num_threads(1)
    errs = {}
    for n, ts in types.items():
        w = view.get(n)
        imp = im.importance(n, w.shape[-1]) if im is not None else None
        errs[n] = measure(n, w, imp, tuple(sorted(ts))).errors
    pairs = []
    print("| point | predicted (sum of weighted sq. errors) | measured rel. output error |")
    print("|---|---:|---:|")
    for r in sorted(rows, key=lambda r: r["bpw"]):
        pred = sum(errs[n][t] for n, t in files[r["label"]].items() if n in errs)
        pairs.append((pred, r["rel_error"]))
        print(f"| {r['label']} | {pred:.4g} | {r['rel_error']:.4f} |")
    rank = lambda v: {x: i for i, x in enumerate(sorted(v))}  # noqa: E731
    rp, rm = rank([p for p, _ in pairs]), rank([m for _, m in pairs])
    n = len(pairs)
    d2 = sum((rp[p] - rm[m]) ** 2 for p, m in pairs)
    print(f"Spearman rank correlation, predicted vs measured: {1 - 6 * d2 / (n * (n * n - 1)):.3f} over {n} files")
    return pairs


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    groups = {}
    for r in rows:
        kind = "auto" if r["spec"] == "gguf:auto" else ("sd.cpp" if r["spec"].startswith("sdcpp") else "type")
        calls = "all" if r["label"].endswith("+calls-all") else "one" if r["label"].endswith("+calls") else \
            "weights" if r["label"].endswith("+weights") else ""
        groups.setdefault((kind, r["imatrix"], calls), []).append(r)
    names = {"auto": "zopt gguf:auto", "type": "zopt named types", "sd.cpp": "stable-diffusion.cpp"}
    for (kind, imat, calls), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["bpw"])
        style = ("-o" if kind == "auto" else ("s" if kind == "sd.cpp" else "x")) if not calls else \
            ("--^" if kind == "auto" else "+") if calls == "one" else \
            (":D" if kind == "auto" else "d") if calls == "weights" else ("--v" if kind == "auto" else "1")
        measured = {"": "", "one": ", measured on the output (calls)", "weights": ", weight errors alone (sensitivity=weights)",
                    "all": ", measured on the output, every type run (calls_types=all)"}[calls]
        ax.plot([r["bpw"] for r in rs], [r["rel_error"] for r in rs], style,
                label=f"{names[kind]}{' + imatrix' if imat else ''}{measured}")
        if kind == "sd.cpp":
            hull = frontier([(r["bpw"], r["rel_error"]) for r in rs])
            ax.plot([b for b, _ in hull], [e for _, e in hull], ":", color="grey", label="its frontier")
        if kind in ("type", "sd.cpp"):
            for r in rs:
                ax.annotate(r["spec"].split(":")[1], (r["bpw"], r["rel_error"]), fontsize=6)
    ax.set_yscale("log")
    ax.set_xlabel("bits per parameter (whole file)")
    ax.set_ylabel("relative output error")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the points, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("--imatrix", default=None, help="also convert every point with this importance matrix")
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES), help="comma-separated gguf types/recipes ('' for none)")
    ap.add_argument("--auto", default=",".join(map(str, DEFAULT_AUTO)), help="gguf:auto budgets in bits per weight")
    ap.add_argument("--calls", default=None, metavar="FILE",
                    help="also convert gguf:auto and the re-tuned recipes with --option calls=FILE (sensitivity "
                         "measured on the model's output over these transformer calls; zopt calibrate --save-calls), "
                         "labelled +calls")
    ap.add_argument("--calls-types", default=None, choices=("one", "all"),
                    help="with --calls: run the calls once per tensor and scale the other types by their weight "
                         "errors (one), or once per candidate type (all); the +calls points are labelled +calls-all "
                         "for all")
    ap.add_argument("--weights", action="store_true",
                    help="also convert gguf:auto and the re-tuned recipes with --option sensitivity=weights (each "
                         "tensor's weight errors alone, no gradient gains), labelled +weights")
    ap.add_argument("--no-plain", action="store_true", help="only the imatrix / calls / weights points")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="gguf option for every point")
    ap.add_argument("--quantize", action="append", default=[], help="--quantize pattern for every point")
    ap.add_argument("--adherence", type=int, default=0, help="held-out prompts to score (micro model)")
    ap.add_argument("--peer", action="store_true", help="add stable-diffusion.cpp's converter when installed")
    ap.add_argument("--peer-mix", action="append", default=[], metavar="TYPE:RULES",
                    help="with --peer or --peer-from, also a stable-diffusion.cpp file of base TYPE and its tensor type rules "
                         "(regex=type,...; e.g. Q3_K:feed_forward.w[13]=q4_K): the peer's own mixes join its frontier")
    ap.add_argument("--peer-from", action="append", default=[], metavar="JSON",
                    help="reuse the peer points of an earlier --json run on the same source and inputs (its "
                         "conversions are slow); repeatable")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--ref-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the reference model's dtype (bfloat16: the full-size model in 24 GiB; its outputs are "
                         "compared in float32)")
    ap.add_argument("--inputs", default="random", metavar="random|pipeline[:N]",
                    help="the transformer inputs the error is measured on: seeded random latents and caption features "
                         "at two timesteps (default), or those of generating N (4) held-out captions through the "
                         "source's pipeline, 8 steps each (a trained model with a pipeline: micro)")
    ap.add_argument("--title", default=None, help="the plot's title (default: SOURCE: rate-distortion)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--predict", nargs="+", metavar="JSON", help="instead of measuring: compare gguf:auto's "
                    "predicted error with the measured error of the files listed in these --json outputs")
    args = ap.parse_args()
    import re

    if not re.fullmatch(r"random|pipeline(:[1-9][0-9]*)?", args.inputs):
        ap.error(f"--inputs {args.inputs!r}: random, pipeline or pipeline:N")
    if any(":" not in m for m in args.peer_mix):
        ap.error("--peer-mix takes TYPE:RULES, e.g. Q4_K:feed_forward\\.w[13]=q3_K")
    if args.calls_types is not None and not args.calls:
        ap.error("--calls-types says how the --calls points are measured; give --calls FILE too")
    if args.peer_mix and not (args.peer or args.peer_from):
        ap.error("--peer-mix needs --peer or --peer-from")
    if args.peer and args.peer_from:
        ap.error("--peer converts the peer's files again; --peer-from reuses them: one of the two")
    if args.predict:
        from zopt.families import resolve_source

        rows = []
        for j in args.predict:
            for r in json.loads(Path(j).read_text())["rows"]:
                # rows without a path: the file name the measuring run gave it, in --work
                r.setdefault("file", str(Path(args.work or ".") / (r["label"].replace("auto ", "auto-") + ".gguf")))
                rows.append(r)
        predict(resolve_source(args.source), rows, args.imatrix)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    from zopt import checkpoint
    from zopt.families import resolve_source, zimage
    from zopt.formats.plain import load_source

    source = resolve_source(args.source)
    src = checkpoint.open(source)
    params = sum(math.prod(src.info(n).shape) for n in src.names())
    ref_path = Path(source) / "transformer" if (Path(source) / "transformer").is_dir() else Path(source)
    dt = getattr(torch, args.ref_dtype)
    ref_model = load_source(ref_path, dtype=dt)
    if args.inputs == "random":
        inputs, inputs_name = make_inputs(dict(ref_model.config)), "random"
    else:
        n = int(args.inputs.partition(":")[2] or 4)
        inputs = pipeline_inputs(str(source), ref_model.float(), n)
        ref_model = ref_model.to(dt)
        inputs_name = f"pipeline: {n} prompts, 8 steps, 64 px"
    refs = outputs(ref_model, inputs, dt)
    base = {"ref_bytes": sum(src.info(n).nbytes for n in src.names()), "params": params, "ref_dtype": args.ref_dtype,
            "inputs": inputs_name, "config": {k: v for k, v in zimage.infer_config(src).items() if not k.startswith("_")}}
    if args.adherence:
        base["ref_adherence"] = adherence(str(source), ref_model, args.adherence)
    print(json.dumps(base), flush=True)
    del ref_model
    work = Path(args.work or tempfile.mkdtemp(prefix="zopt-rd-"))
    work.mkdir(parents=True, exist_ok=True)
    opts: dict = {}
    for kv in args.option:
        k, _, v = kv.partition("=")
        opts[k] = v
    if args.quantize:
        opts["quantize"] = args.quantize
    variants = (([] if args.no_plain else [("", {})]) + ([("+imat", {"imatrix": args.imatrix})] if args.imatrix else [])
                + ([("+calls-all" if args.calls_types == "all" else "+calls",
                     {"calls": args.calls, "calls_types": args.calls_types or "one"})] if args.calls else [])
                + ([("+weights", {"sensitivity": "weights"})] if args.weights else []))
    rows = []
    types = [t for t in args.types.split(",") if t]
    budgets = [float(b) for b in args.auto.split(",") if b]
    from zopt.formats.gguf.recipes import recipe

    for tag, extra in variants:
        for t in types:
            if ("calls" in extra or "sensitivity" in extra) and not recipe(t).measured:
                continue  # one rule: nothing to measure
            rows.append(measure(source, f"gguf:{t}", {**opts, **extra}, work / f"{t}{tag}.gguf", refs, inputs,
                                params, args.adherence, f"{t}{tag}"))
        for b in budgets:
            try:
                rows.append(measure(source, "gguf:auto", {**opts, **extra, "target_bpw": b},
                                    work / f"auto-{b}{tag}.gguf", refs, inputs, params, args.adherence,
                                    f"auto {b}{tag}"))
            except Exception as e:  # a budget below the float tensors' share cannot be met
                print(f"auto {b}{tag}: {e}")
    if args.peer:
        rows += peer_points(source, types, refs, inputs, params, work, args.adherence, args.peer_mix)
    elif args.peer_from:
        for j in args.peer_from:  # one row per peer file (a later run may carry an earlier one's rows)
            seen = {r["label"] for r in rows}
            rows += [r for r in reused_peer_points(Path(j), base, args.ref_dtype) if r["label"] not in seen]
        if args.peer_mix:  # the earlier run's files, and these mixes measured now
            rows += peer_points(source, types, refs, inputs, params, work, args.adherence, args.peer_mix, plain=False)
    print()
    print(f"source {args.source}: {params:,} parameters, BF16 {base['ref_bytes'] / 1e6:.1f} MB")
    adh = ("colour", "shape", "position", "size")

    def adh_cells(acc) -> str:
        return " |".join(f" {acc[k]:.2f}" if acc else " -" for k in adh) + " |"

    print("| point | MB | bits/param | rel. output error |" + (" " + " | ".join(adh) + " |" if args.adherence else ""))
    print("|---|---:|---:|---:|" + ("---:|" * len(adh) if args.adherence else ""))
    if args.adherence:
        print(f"| source (BF16 weights, run in FP32) | {base['ref_bytes'] / 1e6:.2f} | 16.000 | 0 |"
              + adh_cells(base["ref_adherence"]))
    for r in sorted(rows, key=lambda r: r["bpw"]):
        line = f"| {r['label']} | {r['bytes'] / 1e6:.2f} | {r['bpw']:.3f} | {r['rel_error']:.4f} |"
        if args.adherence:
            line += adh_cells(r.get("adherence"))
        print(line)
    versus = compare_to_peer(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({**base, "rows": rows, "versus_peer": versus}, indent=1) + "\n")
    if args.plot:
        plot(rows, Path(args.plot), args.title or f"{args.source}: rate-distortion")


if __name__ == "__main__":
    main()
