"""The micro Z-Image: configs, tokenizer, and the pipeline built from the shipped weights.

Real diffusers/transformers classes at small size: a ``ZImageTransformer2DModel`` (dim 96), a
16-channel ``AutoencoderKL`` with 4x downsampling (64 px images -> 16 x 16 latents), and a frozen,
seeded ``Qwen3Model`` text encoder. The tokenizer is byte-level BPE whose merges make each word of
the shapes grammar one token (as a real BPE vocabulary does for common words); any other text
still encodes, byte by byte. Trained weights live in ``weights/`` next to this file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import FULL_CONFIG
from ..tiny import VAE_CONFIG as TINY_VAE_CONFIG

WEIGHTS_DIR = Path(__file__).parent / "weights"
MICRO_SEED = 20251126
IMAGE_SIZE = 64
# shapes per scene the model is trained on and scored with (the grammar and the detector take up to
# three): one shape binds its colour, kind, size and place without a second one to confuse it with
MAX_SHAPES = 1

TRANSFORMER_CONFIG: dict[str, Any] = {
    **{k: v for k, v in FULL_CONFIG.items() if not k.startswith("_")},
    # dim 96: the FFN's hidden size int(96 / 3 * 8) = 256 keeps every linear weight a whole number of
    # GGUF blocks (32; 256 for the FFN's w2), as the full model's are
    "dim": 96,
    "n_layers": 3,
    "n_refiner_layers": 1,
    "n_heads": 3,
    "n_kv_heads": 3,
    "cap_feat_dim": 256,
    "axes_dims": [8, 12, 12],
    "axes_lens": [1024, 512, 512],
}

# the tiny pipeline's 16-channel VAE, wider in its deeper blocks; latent statistics measured in training.
# One normalization group and no mid-block attention: together they learn much faster on these
# mostly flat images (14.1 dB after 200 steps against 11.3 dB; one group alone did not help, see
# docs/micro.md). One group also keeps a constant channel's value, which eight groups over the
# 8-channel full-resolution stage normalize away.
VAE_CONFIG: dict[str, Any] = {
    **TINY_VAE_CONFIG,
    # three stages: 4x downsampling (64 px -> 16 x 16 latents, 8 x 8 transformer tokens). With four
    # (8x, as the full model) a short run's decoder drew blobs for stars and triangles (the detector
    # found 47% of shapes in its reconstructions against 74% here, docs/micro.md)
    "block_out_channels": [16, 32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "norm_num_groups": 1,
    "mid_block_add_attention": False,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 1.0,  # replaced by the measured latent statistics when trained
    "shift_factor": 0.0,
}

# shift of the flow-matching sigmas, used alike by training and by the pipeline's scheduler
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 2.0, "use_dynamic_shifting": False}


def build_tokenizer():
    """Byte-level BPE with Qwen-style special tokens and chat template; the shapes grammar's words
    (and the template's) are single tokens. Deterministic: merges are trained on a fixed word list."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..tiny import CHAT_TEMPLATE, SPECIAL_TOKENS
    from .shapes import WORDS

    words = [*WORDS, "user", "assistant", "system"]
    corpus = [w for w in words] + [" " + w for w in words]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus * 2, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def text_encoder_config(vocab_size: int) -> dict[str, Any]:
    """The tiny Qwen3 text encoder's config with this tokenizer's vocabulary."""
    from ..tiny import TEXT_ENCODER_CONFIG

    return {**TEXT_ENCODER_CONFIG, "vocab_size": vocab_size}


def build_text_encoder(tokenizer):
    """The frozen text encoder: a seeded ``Qwen3Model`` (the same recipe as the random tiny one)."""
    from transformers import Qwen3Config, Qwen3Model

    from ..tiny import _seeded_init

    model = Qwen3Model(Qwen3Config(**text_encoder_config(len(tokenizer))))
    _seeded_init(model, MICRO_SEED + 2)
    return model.eval()


def build_pipeline(transformer, vae, tokenizer=None, text_encoder=None):
    """A ``ZImagePipeline`` of the micro model around the given transformer and VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    tokenizer = tokenizer or build_tokenizer()
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder if text_encoder is not None else build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _public(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def load_shipped(weights: str | os.PathLike = WEIGHTS_DIR):
    """(transformer, vae) with the trained weights of ``weights`` (bf16 files, loaded in fp32)."""
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from safetensors.torch import load_file

    weights = Path(weights)
    meta = json.loads((weights / "micro.json").read_text())
    transformer = ZImageTransformer2DModel(**_public(meta["transformer_config"]))
    transformer.load_state_dict({k: v.float() for k, v in load_file(weights / "transformer.safetensors").items()})
    vae = AutoencoderKL(**_public(meta["vae_config"]))
    vae.load_state_dict({k: v.float() for k, v in load_file(weights / "vae.safetensors").items()})
    return transformer.to(torch.bfloat16).eval(), vae.eval()


def build_micro_pipeline(weights: str | os.PathLike = WEIGHTS_DIR):
    """The trained micro ``ZImagePipeline`` from the shipped weights (transformer in bf16)."""
    from transformers import PreTrainedTokenizerFast

    from ....quiet import quiet_libraries

    quiet_libraries()
    transformer, vae = load_shipped(weights)
    # the tokenizer that trained the weights travels with them (its ids index the text encoder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(Path(weights) / "tokenizer")
    return build_pipeline(transformer, vae, tokenizer)


def micro_pipeline_dir(root: str | os.PathLike | None = None) -> Path:
    """Folder of the trained micro Z-Image pipeline (source name ``micro``), built on first use from
    the weights shipped in the package (``families/zimage/micro/weights``)."""
    import hashlib

    from ...._io import build_cached, cache_dir

    digest = hashlib.sha256()
    for name in ("micro.json", "transformer.safetensors", "vae.safetensors"):
        digest.update((WEIGHTS_DIR / name).read_bytes())
    root = Path(root) if root else cache_dir() / "models"
    target = root / f"micro-zimage-{digest.hexdigest()[:12]}"

    def build(tmp: Path) -> None:
        from ....progress import note

        note(f"building the embedded micro pipeline from its shipped weights (first use only) in {target}")
        build_micro_pipeline().save_pretrained(tmp, safe_serialization=True)
        (tmp / "zopt.json").write_text(json.dumps({"kind": "micro", "sha256": digest.hexdigest()}))

    return build_cached(target, build)
