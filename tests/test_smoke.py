def test_tiny_forward(tiny_transformer_dir, tiny_reference_inputs):
    import torch

    import zopt

    m = zopt.load(tiny_transformer_dir, dtype=torch.float32)
    x, t, cap = tiny_reference_inputs
    out = m(x, t, cap, return_dict=False)[0]
    assert out[0].shape == x[0].shape
    assert torch.isfinite(out[0]).all()
