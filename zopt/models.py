"""The old address of the embedded tiny pipeline and the synthetic checkpoint builders.

They live with their family now (:mod:`zopt.families.zimage.tiny`,
:mod:`zopt.families.zimage.synthetic`); these names stay importable from here.
"""

from __future__ import annotations

from .families.zimage.synthetic import synthetic_header, synthetic_layout, write_synthetic
from .families.zimage.tiny import (
    CHAT_TEMPLATE,
    SCHEDULER_CONFIG,
    SPECIAL_TOKENS,
    TEXT_ENCODER_CONFIG,
    TINY_SEED,
    TINY_VERSION,
    VAE_CONFIG,
    build_tiny_pipeline,
    build_tiny_transformer,
    build_tokenizer,
    tiny_pipeline_dir,
)

__all__ = [
    "CHAT_TEMPLATE", "SCHEDULER_CONFIG", "SPECIAL_TOKENS", "TEXT_ENCODER_CONFIG", "TINY_SEED", "TINY_VERSION",
    "VAE_CONFIG", "build_tiny_pipeline", "build_tiny_transformer", "build_tokenizer", "synthetic_header",
    "synthetic_layout", "tiny_pipeline_dir", "write_synthetic",
]
