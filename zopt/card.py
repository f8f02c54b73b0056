"""The model card (README.md) of a published folder: front matter, measured table, usage."""

from __future__ import annotations

from typing import Any


def _get(d: Any, path: str) -> Any:
    from .bench.schema import get_path

    return get_path(d, path)


# Card table columns: header, record path, formatter. The test compares the card to records
# through these same formatters, so what the card says is what was measured.
def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


CARD_METRICS: tuple[tuple[str, str, Any], ...] = (
    ("PSNR vs ref (dB)", "metrics.quality.psnr_db", lambda v: _fmt(v, ".2f")),
    ("SSIM", "metrics.quality.ssim", lambda v: _fmt(v, ".4f")),
    ("rel. L2 / step", "metrics.quality.rel_l2_mean", lambda v: _fmt(v, ".4f")),
    ("latency / step (ms)", "metrics.latency.step_ms.median", lambda v: _fmt(v, ".1f")),
    ("peak memory (MiB)", "metrics.memory.peak_bytes", lambda v: "n/a" if v is None else f"{v / 2**20:.0f}"),
)


def _size(n: int) -> str:
    """Binary units, as in the bench table and report."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# formats whose folders diffusers' own loaders read as they are (nf4 through bitsandbytes) and
# GGUF files (diffusers' from_single_file); any other variant needs zopt.load
DIFFUSERS_READABLE = ("bf16", "fp16", "fp32", "nf4", "gguf")


def card_data(variants, license: str | None, base_model: str):
    """The card's metadata as huggingface_hub's ``ModelCardData``."""
    from huggingface_hub import ModelCardData

    from .formats.registry import card_tags

    tags = ["z-image", "text-to-image", "quantized", "zopt"]
    for v in variants:
        for tag in card_tags(v.format):
            if tag not in tags:
                tags.append(tag)
    if all(v.format == "gguf" for v in variants):
        library = "gguf"
    elif all(v.format in DIFFUSERS_READABLE for v in variants):
        library = "diffusers"
    else:  # diffusers refuses zopt-only folders (their config names quant_method "zopt")
        library = "zopt"
    return ModelCardData(base_model=base_model, base_model_relation="quantized", library_name=library,
                         pipeline_tag="text-to-image", license=license or "apache-2.0", tags=tags)


def front_matter(variants, repo_id: str | None, license: str | None, base_model: str) -> str:
    """The YAML front matter block (``---`` lines included) of the card."""
    return f"---\n{card_data(variants, license, base_model).to_yaml()}\n---\n"


def variant_rows(variants, matched: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One table row per variant: identity columns, then CARD_METRICS from its benchmark record."""
    rows = []
    for v in variants:
        rec = matched.get(v.name)
        bpw = f"{v.bits_per_weight:.2f}" if v.bits_per_weight else "n/a"
        row = [f"`{v.name}`", v.spec, _size(v.bytes), bpw]
        row += [_cell(rec, path, fmt) if rec else "not measured" for _, path, fmt in CARD_METRICS]
        row.append(rec.get("hardware_fingerprint", "?") if rec else "")
        rows.append(row)
    return rows


def _cell(rec: dict[str, Any], path: str, fmt) -> str:
    """A measured figure; a step latency whose p90 spreads far above its median is marked, not stated as fact."""
    from .bench.display import is_noisy, latency_spread
    from .bench.schema import get_path

    text = fmt(get_path(rec, path))
    if path.startswith("metrics.latency.step_ms") and is_noisy(rec):
        text += f" (noisy: p90 {latency_spread(rec):.1f}x median)"
    return text


def _usage(v, repo: str, base: str) -> str:
    if v.format == "gguf":
        return f"""### `{v.name}` ({v.spec})

diffusers (GGUF weights dequantized on the fly):

```python
import torch
from diffusers import GGUFQuantizationConfig, ZImagePipeline, ZImageTransformer2DModel

transformer = ZImageTransformer2DModel.from_single_file(
    "https://huggingface.co/{repo}/blob/main/{v.name}",
    quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),
    config="{repo}", torch_dtype=torch.bfloat16,
)
pipe = ZImagePipeline.from_pretrained("{base}", transformer=transformer, torch_dtype=torch.bfloat16)
image = pipe("a lighthouse at dawn", num_inference_steps=8, guidance_scale=0.0).images[0]
```

ComfyUI: copy `{v.name}` to `ComfyUI/models/diffusion_models/` and load it with the
*Unet Loader (GGUF)* node of ComfyUI-GGUF (the file declares the `lumina2` architecture it expects).

stable-diffusion.cpp:

```bash
sd-cli --diffusion-model {v.name} --vae ae.safetensors --llm Qwen3-4B-Instruct-2507-Q4_K_M.gguf \\
  -p "a lighthouse at dawn" --cfg-scale 1.0 --steps 8 -H 1024 -W 1024
```

zopt: `zopt generate {v.name} --base {base} --prompt "a lighthouse at dawn"`
"""
    comfy = v.options.get("layout") == "comfy"
    extra = ("\nComfyUI: the folder holds a scaled-FP8 single file in ComfyUI's layout; copy it to "
             "`ComfyUI/models/diffusion_models/` and load it with *Load Diffusion Model*.\n") if comfy else ""
    diffusers_note = (
        "diffusers' own `from_pretrained` reads this folder through its bitsandbytes quantizer (CUDA)."
        if v.format == "nf4" else
        "diffusers cannot read these weights itself: `ZImageTransformer2DModel.from_pretrained` on this folder "
        "stops with \"Unknown quantization type, got zopt\" (its config says so) instead of loading a wrong model.")
    return f"""### `{v.name}/` ({v.spec})

In a diffusers pipeline, with zopt rebuilding the transformer (it checks every file's sha256 and
picks the kernel for your hardware):

```python
import torch, zopt
from diffusers import ZImagePipeline
from huggingface_hub import snapshot_download

folder = snapshot_download("{repo}", allow_patterns="{v.name}/*") + "/{v.name}"
pipe = ZImagePipeline.from_pretrained("{base}", transformer=zopt.load(folder, device="cuda", dtype=torch.bfloat16),
                                      torch_dtype=torch.bfloat16).to("cuda")
image = pipe("a lighthouse at dawn", num_inference_steps=8, guidance_scale=0.0).images[0]
```

{diffusers_note}

zopt alone: `zopt generate {v.name} --base {base} --prompt "a lighthouse at dawn"`.
{extra}"""


GRID_ROWS = 4  # images per variant in the card (the bench's first prompts/seeds)
GRID_PX = 256  # long side of a card thumbnail


def write_grid(variants, matched: dict[str, dict[str, Any]], reference: dict[str, Any] | None,
               roots: dict[int, Any], folder) -> list[str]:
    """Copy the first GRID_ROWS images of the reference and of each measured variant, as GRID_PX
    thumbnails, to ``folder/images/``; return the markdown table (empty without images).

    ``roots`` maps ``id(record)`` to the folder its image paths are relative to.
    """
    from pathlib import Path

    cols = [("reference", reference)] if reference else []
    cols += [(v.name, matched[v.name]) for v in variants if v.name in matched]
    cols = [(n, r) for n, r in cols if r.get("images") and id(r) in roots]
    if not cols or (reference is not None and cols[0][1] is not reference):
        return []
    from PIL import Image

    out = Path(folder) / "images"
    rows = []
    for k, im in enumerate(cols[0][1]["images"][:GRID_ROWS]):
        cells = []
        for n, r in cols:
            if k >= len(r["images"]):
                cells.append("")
                continue
            src = Path(roots[id(r)]) / r["images"][k]["path"]
            if not src.is_file():
                cells.append("(missing)")
                continue
            rel = f"images/{n.replace('/', '_')}-{k}.png"
            out.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as img:
                img = img.convert("RGB")
                img.thumbnail((GRID_PX, GRID_PX))
                img.save(Path(folder) / rel, format="PNG")
            cells.append(f"![{n}, seed {im.get('seed', '?')}]({rel})")
        rows.append(f"| {str(im.get('prompt', ''))[:60]} (seed {im.get('seed', '?')}) | " + " | ".join(cells) + " |")
    head = "| prompt | " + " | ".join(f"`{n}`" for n, _ in cols) + " |"
    return [head, "|" + "---|" * (len(cols) + 1), *rows]


def render_card(variants, matched, reference, *, repo_id, license, base_model, zopt_version,
                grid: list[str] | None = None) -> str:
    """The card (README.md) text, built with huggingface_hub's ``ModelCard``: metadata, the measured
    table, the image ``grid`` (markdown lines from :func:`write_grid`), commands and usage."""
    from huggingface_hub import ModelCard

    repo = repo_id or "USER/REPO"
    head = ["file", "format", "size", "bits/weight"] + [h for h, _, _ in CARD_METRICS] + ["measured on"]
    lines = [front_matter(variants, repo_id, license, base_model)]
    lines.append(f"# {repo.split('/')[-1]}: quantized Z-Image transformer\n")
    lines.append(
        f"Quantized variants of the [{base_model}](https://huggingface.co/{base_model}) transformer "
        f"(`ZImageTransformer2DModel`), converted and measured with zopt {zopt_version}. Text encoder, "
        "VAE and scheduler are the base model's.\n"
    )
    lines.append("## Variants\n")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for row in variant_rows(variants, matched):
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if matched:
        any_rec = next(iter(matched.values()))
        s = any_rec.get("settings", {})
        ref_spec = (reference or {}).get("format", {}).get("spec", "the unquantized reference")
        lines.append(
            f"Quality is measured against {ref_spec} with the same prompts, seeds and initial noise "
            f"({s.get('steps', '?')} steps at {s.get('width', '?')}×{s.get('height', '?')}, "
            f"{len(s.get('prompts', []))} prompts × {len(s.get('seeds', []))} seeds): PSNR and SSIM of the decoded "
            "images, mean per-step relative L2 of the transformer output. Latency is the median per denoising "
            "step; memory is the peak (GPU allocator, or process RSS above baseline on CPU). "
            "`measured on` is the hardware fingerprint of the run.\n"
        )
    else:
        lines.append("No benchmark records were supplied: run `zopt bench` and publish with `--bench`.\n")
    if grid:
        lines.append("## Images\n")
        lines.append("The same prompt, seed and initial noise through the reference and each variant "
                     f"({GRID_PX} px thumbnails of the benchmark's images).\n")
        lines += [*grid, ""]
    lines.append("## How each file was made\n")
    lines.append("| file | command | zopt | source sha256 |")
    lines.append("|---|---|---|---|")
    for v in variants:
        lines.append(f"| `{v.name}` | `{v.command}` | {v.zopt_version or '?'} | `{(v.source_sha256 or 'n/a')[:16]}` |")
    lines.append("")
    lines.append("## Usage\n")
    for v in variants:
        lines.append(_usage(v, repo, base_model))
    lines.append("## Integrity\n")
    lines.append(
        "`zopt-publish.json` lists the sha256 of every file and the provenance of each variant; "
        "`zopt verify .` re-checks all of them and loads every variant.\n"
    )
    return str(ModelCard("\n".join(lines)))
