"""On CUDA with model offload, a ``free`` text encoder is off the device before the first denoising
step (the plan's denoise stage holds no text encoder), for every batch of a request."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


def test_free_text_encoder_is_off_the_device_while_denoising(tmp_path):
    from zopt.runtime import pipeline as P

    pipe, choice = P.prepare("tiny-base", device="cuda", offload="model", text_encoder="free", attention="auto",
                             width=64, height=64, guidance=4.0)
    assert (choice.offload, choice.text_encoder, choice.variant) == ("model", "free", "base")
    # a torch pre-hook runs before accelerate's offload hook, which would move the encoder out itself
    where: list[str] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a: where.append(next(pipe.text_encoder.parameters()).device.type))
    try:
        out = P.run(pipe, P.GenerateRequest(["a red cube", "fog"], [1], steps=2, height=64, width=64,
                                            guidance_scale=4.0, negative_prompt="blurry"), tmp_path)
    finally:
        hook.remove()
    assert len(out) == 2 and where == ["cpu"] * 4
