"""The embedded tiny Z-Image pipeline: built by zopt itself, seeded, byte-for-byte reproducible.

Model weights cannot be downloaded everywhere zopt runs (CI, air-gapped machines), so zopt builds
its own: a complete ``ZImagePipeline`` with the real classes at small dimensions and an offline
byte-level tokenizer, saved as an ordinary diffusers folder (the built-in source ``tiny``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..._io import cache_dir
from .config import TINY_CONFIG

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
    "hidden_size": TINY_CONFIG["cap_feat_dim"],  # the transformer reads its hidden states
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


def tiny_pipeline_dir(root: str | os.PathLike | None = None) -> Path:
    """Folder of the embedded tiny pipeline, building it on first use (deterministic from TINY_SEED)."""
    from ..._io import build_cached

    root = Path(root) if root else cache_dir() / "models"
    target = root / f"tiny-zimage-v{TINY_VERSION}-{TINY_SEED}"

    def build(tmp: Path) -> None:
        from ...progress import note

        note(f"building the embedded tiny pipeline (first use only, a few seconds) in {target}")
        build_tiny_pipeline(TINY_SEED).save_pretrained(tmp, safe_serialization=True)
        (tmp / "zopt.json").write_text(json.dumps({"kind": "tiny", "seed": TINY_SEED, "version": TINY_VERSION}))

    return build_cached(target, build)


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

    cfg = {k: v for k, v in (config or TINY_CONFIG).items() if not k.startswith("_")}
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

    from ...quiet import quiet_libraries

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

