"""Embedded defaults: the tiny Z-Image pipelines and the full-size synthetic checkpoint.

Model weights cannot be downloaded everywhere zopt runs (CI, air-gapped machines), so zopt builds
its own, saved as ordinary diffusers folders in the cache: ``tiny`` (also ``tiny-random``), a
complete ``ZImagePipeline`` with the real classes at small dimensions, seeded random weights and an
offline byte-level tokenizer; ``micro``, the micro Z-Image trained on procedural shapes
(``families/zimage/micro``, weights shipped in the package); and a 6.15B-parameter checkpoint with seeded random bf16 weights in
the original layout, written streaming, for scale benchmarks.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from ._io import atomic_path, cache_dir
from .families import zimage

TINY_SEED = 20251127
TINY_VERSION = "2"  # bump when the tiny pipeline's recipe changes (new cache folder)

# Chat template in the style of Qwen3's, enough for ZImagePipeline._encode_prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 256 + len(SPECIAL_TOKENS),
    "hidden_size": zimage.TINY_CONFIG["cap_feat_dim"],  # the transformer reads its hidden states
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
    # Flux VAE's latent statistics, as Z-Image uses that VAE
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}

SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}


def micro_pipeline_dir(root: str | os.PathLike | None = None) -> Path:
    """Folder of the trained micro Z-Image pipeline, built on first use from the weights shipped in
    the package (``families/zimage/micro/weights``)."""
    import hashlib

    from .families.zimage.micro import model as micro

    digest = hashlib.sha256()
    for name in ("micro.json", "transformer.safetensors", "vae.safetensors"):
        digest.update((micro.WEIGHTS_DIR / name).read_bytes())
    root = Path(root) if root else cache_dir() / "models"
    target = root / f"micro-zimage-{digest.hexdigest()[:12]}"
    return _cached_pipeline(target, micro.build_micro_pipeline, {"kind": "micro", "sha256": digest.hexdigest()})


def random_tiny_pipeline_dir(root: str | os.PathLike | None = None) -> Path:
    """Folder of the seeded random tiny pipeline (``tiny-random``), built on first use from TINY_SEED:
    faster than the trained default and with the shapes of ``zimage.TINY_CONFIG``."""
    root = Path(root) if root else cache_dir() / "models"
    target = root / f"tiny-zimage-v{TINY_VERSION}-{TINY_SEED}"
    return _cached_pipeline(target, lambda: build_tiny_pipeline(TINY_SEED),
                            {"kind": "tiny", "seed": TINY_SEED, "version": TINY_VERSION})


# source names that stand for a pipeline zopt builds itself. ``tiny`` becomes the micro model once
# its shipped weights pass the adherence floors of tests/families/test_micro_model.py.
EMBEDDED = {"tiny": random_tiny_pipeline_dir, "tiny-random": random_tiny_pipeline_dir, "micro": micro_pipeline_dir}


def tiny_pipeline_dir(root: str | os.PathLike | None = None) -> Path:
    """Folder of the embedded default pipeline (source name ``tiny``)."""
    return EMBEDDED["tiny"](root)


def embedded_pipeline_dir(spec: str) -> Path:
    """The folder of an embedded pipeline by source name (a key of ``EMBEDDED``)."""
    return EMBEDDED[spec]()


def _cached_pipeline(target: Path, build, info: dict[str, Any]) -> Path:
    """``target``, saving ``build()``'s pipeline there first if absent (atomic: temp folder, rename)."""
    if (target / "model_index.json").exists():
        return target
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build().save_pretrained(tmp, safe_serialization=True)
        (tmp / "zopt.json").write_text(json.dumps(info))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").exists():  # not just another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _seeded_init(module, seed: int) -> None:
    """Reinitialize every parameter from one generator: normal(0, 1/sqrt(fan_in)); norms near 1."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim == 1 and ("norm" in name or name.endswith("cap_embedder.0.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # biases
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def build_tiny_transformer(seed: int = TINY_SEED, config: dict[str, Any] | None = None):
    """The real ``ZImageTransformer2DModel`` at tiny size (or ``config``), seeded, in bf16."""
    import torch
    from diffusers import ZImageTransformer2DModel

    cfg = {k: v for k, v in (config or zimage.TINY_CONFIG).items() if not k.startswith("_")}
    model = ZImageTransformer2DModel(**cfg)
    _seeded_init(model, seed)
    return model.to(torch.bfloat16).eval()


def build_tokenizer():
    """A byte-level tokenizer with Qwen-style special tokens and chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # the byte-level pre-tokenizer maps bytes to printable characters; each gets its byte's id
    byte_to_unicode = _bytes_to_unicode()
    vocab = {byte_to_unicode[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable-character table (a well-known public algorithm)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_tiny_pipeline(seed: int = TINY_SEED):
    """A complete, seeded ``ZImagePipeline`` at tiny size: transformer, VAE, text encoder, tokenizer."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    from .runtime.pipeline import quiet_libraries

    quiet_libraries()
    torch.manual_seed(seed)
    transformer = build_tiny_transformer(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    _seeded_init(vae, seed + 1)
    text_encoder = Qwen3Model(Qwen3Config(**TEXT_ENCODER_CONFIG))
    _seeded_init(text_encoder, seed + 2)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return ZImagePipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=build_tokenizer(),
        transformer=transformer,
    )


# ---------------------------------------------------------------------------------------------
# full-size synthetic checkpoint


def synthetic_layout(config: dict[str, Any], prefix: str = "") -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of ``config`` in the original layout, sorted by name."""
    shapes = zimage.expected_shapes(config)
    out: dict[str, tuple[int, ...]] = {}
    for n, s in shapes.items():
        if ".attention.to_k." in n or ".attention.to_v." in n:
            continue
        if ".attention.to_q.weight" in n:
            out[prefix + zimage.to_original_name(n.replace("to_q.weight", "")) + "qkv.weight"] = (3 * s[0], s[1])
        else:
            out[prefix + zimage.to_original_name(n)] = s
    return sorted(out.items())


def synthetic_header(layout: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None = None
                     ) -> tuple[bytes, int]:
    """(8-byte length + padded JSON header, data bytes) of a bf16 safetensors file with ``layout``."""
    header: dict[str, Any] = {
        "__metadata__": {"format": "pt", "modelspec.architecture": "Z-Image (synthetic)", **(metadata or {})}
    }
    offset = 0
    for name, shape in layout:
        n = 1
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * n]}
        offset += 2 * n
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    return struct.pack("<Q", len(hbytes)) + hbytes, offset


def write_synthetic(
    out: str | os.PathLike,
    size: str = "full",
    seed: int = 0,
    prefix: str = "",
    progress: bool = True,
    chunk_elems: int = 1 << 24,
) -> Path:
    """Stream a seeded random bf16 checkpoint of ``size`` in the original layout to ``out``.

    Tensors are generated and written in chunks of ``chunk_elems`` values, so peak memory stays
    at a few hundred MB whatever the model size. The header is written first from shapes alone.
    """
    import torch

    config = zimage.config_for(size)
    layout = synthetic_layout(config, prefix)
    hbytes, total = synthetic_header(layout, {"zopt.synthetic": json.dumps({"size": size, "seed": seed})})
    out = Path(out)
    from .progress import progress_bar

    with atomic_path(out) as tmp, open(tmp, "wb") as f, progress_bar(
        total, f"synth {size}", unit="B", enabled=progress
    ) as bar:
        f.write(hbytes)
        for name, shape in layout:
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF)
            n = 1
            for d in shape:
                n *= d
            fan_in = shape[-1] if len(shape) > 1 else 1
            std = 1.0 / fan_in**0.5 if len(shape) > 1 else 0.02
            mean = 1.0 if ("norm" in name and len(shape) == 1) else 0.0
            done = 0
            while done < n:
                k = min(chunk_elems, n - done)
                t = torch.randn(k, generator=g, dtype=torch.float32).mul_(std).add_(mean).to(torch.bfloat16)
                f.write(t.view(torch.int16).numpy().tobytes())
                done += k
                bar.advance(2 * k)
    return out
