"""Which tensors GGUF keeps in float for being small: small in elements and beside the model."""

from zopt.families import zimage
from zopt.families.zimage.micro import model as micro
from zopt.formats.gguf import recipes as R


def _shapes(config):
    return {n: tuple(s) for n, s in zimage.expected_shapes(config).items()}


def _quantized(plans):
    return {p.name for p in plans if p.qtype not in ("F32", "F16", "BF16")}


def test_small_tensors_of_a_large_model_stay_float():
    shapes = _shapes(zimage.config_for("tiny"))  # 9M parameters: x_embedder (24,576 elements) stays
    got = _quantized(R.plan(shapes, "Q4_0"))
    assert "all_x_embedder.2-1.weight" in shapes and "all_x_embedder.2-1.weight" not in got
    # the same as the element rule alone, plus the family's sensitive weights (large ones) at Q8_0
    policy = R.policy_for()
    sensitive = {n for n in got if policy.decide(n, shapes[n]).sensitive}
    least = min(R.SMALL_NUMEL, int(R.SMALL_SHARE * sum(R._numel(s) for s in shapes.values())))
    assert sensitive and all(R._numel(shapes[n]) >= least for n in sensitive)
    # and those the rule sends to Q8_0 that stay BF16 are the small ones
    q8_rule = {n for n in shapes if len(shapes[n]) == 2 and (r := zimage.sensitive_reason(n)) and r.gguf}
    assert q8_rule & got and all(R._numel(shapes[n]) < least for n in q8_rule - got)
    assert got - sensitive == {n for n, s in shapes.items() if policy.decide(n, s).quantize}


def test_a_test_sized_model_is_quantized_not_kept_whole():
    """Every block weight of the 1.1M-parameter micro model has fewer than 2^16 elements; by the
    element rule alone its Q4_0 file would keep them all in BF16. They are quantized."""
    shapes = _shapes(micro.TRANSFORMER_CONFIG)
    assert max(R._numel(s) for n, s in shapes.items() if n.startswith("layers.")) < R.SMALL_NUMEL
    plans = R.plan(shapes, "Q4_0")
    got = _quantized(plans)
    assert {"layers.0.attention.to_q.weight", "layers.0.feed_forward.w2.weight"} <= got
    assert R.bits_per_weight(plans) < 11  # BF16 would be 16
    # an explicit min_elements is taken as given
    assert not {n for n in _quantized(R.plan(shapes, "Q4_0", min_elements=R.SMALL_NUMEL + 1))
                if n.startswith("layers.")}
