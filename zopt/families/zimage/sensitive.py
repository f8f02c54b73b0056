"""Z-Image tensors that must keep higher precision, and why (diffusers names; first match wins)."""

from __future__ import annotations

import re

from ..base import SensitiveRule
from .keys import to_diffusers_name

SENSITIVE: tuple[SensitiveRule, ...] = (
    SensitiveRule(r"^(x|cap|siglip)_pad_token$", "F32",
                  "learned pad embeddings substituted for padded tokens; a (1, dim) vector, tiny and read raw"),
    SensitiveRule(r"(^|\.)(norm_q|norm_k|attention_norm\d|ffn_norm\d)\.weight$", "F32",
                  "RMSNorm gains multiply every activation; small vectors where rounding shifts the whole stream"),
    SensitiveRule(r"\.bias$", "F32", "biases are added unscaled; 1-D and cheap to keep exact"),
    SensitiveRule(r"^t_embedder\.", "BF16",
                  "timestep MLP drives every adaLN modulation; errors here scale and gate all blocks"),
    SensitiveRule(r"^cap_embedder\.", "BF16",
                  "projects text features into the stream; its RMSNorm and linear see raw encoder outputs"),
    SensitiveRule(r"^siglip_embedder\.", "BF16", "image-feature projection of the Omni variant, as cap_embedder"),
    SensitiveRule(r"^all_x_embedder\.", "BF16",
                  "patch embedding of the noisy latent: tiny (64 inputs), errors reach every image token"),
    SensitiveRule(r"^all_final_layer\.", "BF16",
                  "projects back to latent space: its error lands directly in the predicted velocity"),
    SensitiveRule(r"\.adaLN_modulation\.\d+\.weight$", "BF16",
                  "produces per-block scale and tanh gates; quantizing it has been seen to wreck images"),
)

# Blocks that quantize worse than the body: the refiners see un-normalized inputs first and the
# first/last main blocks set up and read out the stream. Recipes may give these a higher type.
REFINER_PATTERN = r"^(noise_refiner|context_refiner|siglip_refiner)\."


def sensitive_reason(name: str) -> SensitiveRule | None:
    """The rule that makes ``name`` (either layout) precision-sensitive, or None."""
    dname = to_diffusers_name(name)
    for rule in SENSITIVE:
        if re.search(rule.pattern, dname):
            return rule
    return None
