"""Z-Image's precision-sensitive tensors."""

from __future__ import annotations

from zopt.families import zimage


def test_sensitive_rules_cover_the_policy():
    must = {
        "x_pad_token": "F32",
        "cap_pad_token": "F32",
        "layers.3.attention.norm_q.weight": "F32",
        "layers.3.attention_norm1.weight": "F32",
        "all_final_layer.2-1.linear.bias": "F32",
        "t_embedder.mlp.0.weight": "BF16",
        "cap_embedder.1.weight": "BF16",
        "all_x_embedder.2-1.weight": "BF16",
        "final_layer.linear.weight": "BF16",  # original layout too
        "layers.0.adaLN_modulation.0.weight": "BF16",
    }
    for name, keep in must.items():
        rule = zimage.sensitive_reason(name)
        assert rule is not None and rule.keep == keep and rule.reason, name
    for name in ("layers.0.attention.to_q.weight", "layers.7.feed_forward.w2.weight", "layers.2.attention.qkv.weight"):
        assert zimage.sensitive_reason(name) is None, name
