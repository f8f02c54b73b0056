"""Z-Image tensors that must keep higher precision, and why (diffusers names; first match wins)."""

from __future__ import annotations

import re

from ..base import SensitiveRule
from .keys import to_diffusers_name

# gguf:auto keeps the patch embedding, the final layer and the timestep MLP at Q8_0 or better: its
# proxy (squared weight error, summed) misses that their errors reach the output without the
# residual stream's dilution. Measured on the medium synthetic model (docs/quality-per-bit.md):
# output error at 3.5 / 4.5 / 5.5 bits per weight 0.443 / 0.213 / 0.115 without this floor,
# 0.419 / 0.208 / 0.107 with it; the same floor on adaLN and cap_embedder too made it worse
# (0.468 / 0.231 / 0.117). At full size these tensors are 0.03% of the weights (gguf:auto applies
# the floor only to tensors under 1% of a model's weights).
DIRECT = "Q8_0"

# In a quantized GGUF recipe adaLN and the caption/image-feature projections (2.2% of the full
# model's weights) are stored Q8_0, within ~0.4% of BF16 for half its bytes; the direct-path
# tensors above stay BF16 (0.03%). Measured on the medium synthetic model (docs/quality-per-bit.md):
# Q4_K 5.158 -> 4.765 bits per weight at output error 0.1908 -> 0.1907, Q8_0 8.931 -> 8.538 at
# 0.0146 -> 0.0166; storing them at the recipe's own type instead (as stable-diffusion.cpp does)
# raised Q4_K's error to 0.217-0.270. That is the rule (allocation=rule); the GGUF recipes re-tuned
# by measurement start from those bytes and may store these tensors at another quantized type
# (docs/quality-per-bit.md, "Named recipes re-tuned by measurement").
GGUF_HIGH = "Q8_0"

SENSITIVE: tuple[SensitiveRule, ...] = (
    SensitiveRule(r"^(x|cap|siglip)_pad_token$", "F32",
                  "learned pad embeddings substituted for padded tokens; a (1, dim) vector, tiny and read raw"),
    SensitiveRule(r"(^|\.)(norm_q|norm_k|attention_norm\d|ffn_norm\d)\.weight$", "F32",
                  "RMSNorm gains multiply every activation; small vectors where rounding shifts the whole stream"),
    SensitiveRule(r"\.bias$", "F32", "biases are added unscaled; 1-D and cheap to keep exact"),
    SensitiveRule(r"^t_embedder\.", "BF16",
                  "timestep MLP drives every adaLN modulation; errors here scale and gate all blocks",
                  auto_least=DIRECT),
    SensitiveRule(r"^cap_embedder\.", "BF16",
                  "projects text features into the stream; its RMSNorm and linear see raw encoder outputs",
                  gguf=GGUF_HIGH),
    SensitiveRule(r"^siglip_embedder\.", "BF16", "image-feature projection of the Omni variant, as cap_embedder",
                  gguf=GGUF_HIGH),
    SensitiveRule(r"^all_x_embedder\.", "BF16",
                  "patch embedding of the noisy latent: tiny (64 inputs), errors reach every image token",
                  auto_least=DIRECT),
    SensitiveRule(r"^all_final_layer\.", "BF16",
                  "projects back to latent space: its error lands directly in the predicted velocity",
                  auto_least=DIRECT),
    SensitiveRule(r"\.adaLN_modulation\.\d+\.weight$", "BF16",
                  "produces per-block scale and tanh gates; quantizing it has been seen to wreck images",
                  gguf=GGUF_HIGH),
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
